"""What a run reports: throughput, MFU, memory, and where it writes them.

`metrics.jsonl` in the run directory gets one JSON object per logged step; the console gets one
plain line per logged step (readable in a SLURM log file), also appended to `train.log` in the
run directory; a progress bar is drawn only when stderr is a terminal. Only global rank 0
writes.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trainer.run_dir import METRICS, TRAIN_LOG, append_jsonl, read_jsonl, rewrite_jsonl

# Dense bf16 peak TFLOP/s of common accelerators (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """The device's peak for MFU: the configured value, a known GPU's datasheet value, or None."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # VmHWM: this process's own peak (ru_maxrss also counts a parent's from before exec)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Writes `metrics.jsonl` and console lines (rank 0 only)."""

    def __init__(
        self,
        run_dir: Path,
        max_steps: int,
        start_step: int,
        enabled: bool,
        progress: bool,
        sinks: list | None = None,
    ):
        self.enabled = enabled
        self.sinks = sinks or []  # TensorBoard / W&B (trainer.loggers)
        self.max_steps = max_steps
        self.path = run_dir / METRICS
        self.text_log = run_dir / TRAIN_LOG
        self.bar = None
        if not enabled:
            return
        self._drop_records_after(start_step)
        if progress and sys.stderr.isatty():
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _drop_records_after(self, step: int) -> None:
        """On resume, forget steps logged after the checkpoint: they are about to be redone.
        A torn last line (a crash or a full disk mid-write) goes too."""
        if self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
            rewrite_jsonl(self.path, kept)

    def print(self, text: str) -> None:
        if self.enabled:
            log_line(self.text_log.parent, text, self.bar.write if self.bar else None)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, record)
        for sink in self.sinks:
            sink.log(record, record["step"])
        self.print(format_line(record, self.max_steps))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()


def log_line(run_dir: Path, text: str, show: Any = None) -> None:
    """One time-stamped line on the console (or through `show`) and in `train.log`."""
    line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}"
    with open(Path(run_dir) / TRAIN_LOG, "a") as f:
        f.write(line + "\n")
    if show is not None:
        show(line)
    else:
        print(line, flush=True)


def format_line(r: dict[str, Any], max_steps: int) -> str:
    parts = [f"step {r['step']}/{max_steps}"]
    if "loss" in r:
        parts.append(f"loss {r['loss']:.4f}")
    if "val_loss" in r:
        parts.append(f"val_loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.1f})")
    if "lr" in r:
        parts.append(f"lr {r['lr']:.2e}")
    if "grad_norm" in r:
        parts.append(f"gnorm {r['grad_norm']:.2f}")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if "memory_gib" in r:
        parts.append(f"mem {r['memory_gib']:.2f} GiB")
    return " | ".join(parts)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
