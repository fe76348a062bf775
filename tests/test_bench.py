"""The benchmark entry point runs end to end at smoke size (timings are not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results.md"


@pytest.mark.slow
def test_dlt_bench_smoke_runs_every_suite_without_writing_results(tmp_path):
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "size=smoke"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for header in (
        "=== [1/4] train",
        "=== [2/4] layouts",
        "=== [3/4] prep",
        "=== [4/4] checkpoint",
    ):
        assert header in done.stdout
    for row in (
        "| tiny | fp32 |",
        "| 2 | FSDP x2 |",
        "| 2 | PP x2 (1F1B) |",
        "dlt-prep: chunked pool",
        "training stall per checkpoint, async",
    ):
        assert row in done.stdout
    after = RESULTS.read_bytes() if RESULTS.exists() else None
    assert before == after  # smoke timings never land in results.md


def test_dlt_bench_rejects_unknown_arguments(capsys):
    from benchmarks.suite import main

    with pytest.raises(SystemExit) as exit_info:
        main(["suite=everything"])
    assert exit_info.value.code == 2
    assert "suite=everything" in capsys.readouterr().err
