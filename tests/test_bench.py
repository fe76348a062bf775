"""The benchmark entry point: quick by default, writes results.md only when asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import suite

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results.md"


@pytest.mark.slow
def test_dlt_bench_runs_every_suite_at_smoke_size_by_default_without_writing(tmp_path):
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for header in (
        "=== [1/7] train (size=smoke)",
        "=== [2/7] layouts (size=smoke)",
        "=== [3/7] prep (size=smoke)",
        "=== [4/7] checkpoint (size=smoke)",
        "=== [5/7] loader (size=smoke)",
        "=== [6/7] loss (size=smoke)",
        "=== [7/7] init (size=smoke)",
    ):
        assert header in done.stdout
    for row in (
        "| tiny | fp32 |",
        "| 2 | FSDP x2 |",
        "| 2 | PP x2 (1F1B) |",
        "dlt-prep: chunked pool",
        "training stall per checkpoint, async",
        "| random windows/s, 3:1 mixture of two |",
        "| head + loss, chunked 24, compiled | 1024 |",
        "| FSDP | meta | 2 |",
    ):
        assert row in done.stdout
    assert done.stdout.count(suite.SMOKE_CAVEAT) == 7  # after every table
    after = RESULTS.read_bytes() if RESULTS.exists() else None
    assert before == after  # smoke timings never land in results.md


def test_the_default_is_smoke_size_and_no_writing(calls, capsys):
    suite.main([])
    assert list(calls) == ["train", "layouts", "prep", "checkpoint", "loader", "loss", "init"]
    for name, args in calls.items():
        assert args == ["--no-write", *suite.SIZES["smoke"][name]]
    assert capsys.readouterr().out.count(suite.SMOKE_CAVEAT) == 7


def test_full_size_writes_only_when_asked(calls, capsys):
    suite.main(["suite=layouts", "size=full"])
    assert calls == {"layouts": ["--no-write", *suite.SIZES["full"]["layouts"]]}
    suite.main(["suite=layouts", "size=full", "write=true"])
    assert calls == {"layouts": suite.SIZES["full"]["layouts"]}
    assert suite.SMOKE_CAVEAT not in capsys.readouterr().out


def test_dlt_bench_help(capsys):
    suite.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: dlt-bench [suite=") and "size=full" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["suite=everything"], "suite=everything"),
        (["size=huge"], "size=huge"),
        (["write=yes"], "write=yes"),
        (["write=true"], "write=true needs size=full"),
        (["size=smoke", "write=true"], "write=true needs size=full"),
        (["--all"], "'--all'"),
    ],
)
def test_dlt_bench_rejects_bad_arguments_in_one_line(args, message, calls, capsys):
    with pytest.raises(SystemExit) as exit_info:
        suite.main(args)
    assert exit_info.value.code == 2 and not calls
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dlt-bench: error: ") and message in err
