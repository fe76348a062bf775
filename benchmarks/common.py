"""What every benchmark shares: the machine description and appending to results.md."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from data_prep.files import write_text_atomic

RESULTS = Path(__file__).with_name("results.md")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cores = len(os.sched_getaffinity(0))
    return f"CPU {platform.machine()}, {cores} cores, {torch.get_num_threads()} torch threads"


def append_results(title: str, command: str, details: str, table: str) -> None:
    """Append a dated section (machine, versions, command, details, table) to results.md."""
    header = (
        f"\n## {title} — {time.strftime('%Y-%m-%d')}\n\n"
        f"- device: {device_name()}; torch {torch.__version__}; "
        f"Python {platform.python_version()}\n"
        f"- command: `{command}`\n"
        f"- {details}\n\n"
    )
    if RESULTS.exists():
        text = RESULTS.read_text(encoding="utf-8")
    else:
        text = "# Benchmark results\n\nAppended by the scripts in `benchmarks/`.\n"
    write_text_atomic(RESULTS, text + header + table + "\n")  # whole sections only
