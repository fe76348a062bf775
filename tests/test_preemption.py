"""A signal (SLURM's warning, SIGTERM) stops training at a step boundary with a checkpoint;
running the same command again continues exactly where it stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.checkpoint_files import COMPLETE_MARK
from trainer.run_dir import CHECKPOINTS, METRICS, read_jsonl

TRAIN = [
    "data=dummy",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "train.micro_batch_size=2",
    "train.max_steps=150",
    "train.warmup_steps=2",
    "log.interval=1",
    "eval.interval=0",
    "checkpoint.interval=0",
    "log.progress=false",
]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / METRICS)}


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(read_jsonl(run_dir / METRICS)) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("training did not reach the expected step in time")


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the processes torchrun started (read from /proc: only our children)."""
    pids = {}
    for tid in os.listdir(f"/proc/{launcher_pid}/task"):
        for child in Path(f"/proc/{launcher_pid}/task/{tid}/children").read_text().split():
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
            if ranks:
                pids[int(ranks[0])] = int(child)
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_and_the_rerun_continues_exactly(tmp_path, sig):
    whole = tmp_path / "whole"
    subprocess.run(
        [sys.executable, "-m", "jobs.train", *TRAIN, f"run.dir={whole}"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    split = tmp_path / "split"
    command = [sys.executable, "-m", "jobs.train", *TRAIN, f"run.dir={split}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(split, proc, 5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = max(losses(split))
    assert 5 <= stopped < 150, "the signal must stop the run early"
    assert f"stopping at step {stopped} (signal {sig.name})" in out
    assert (split / CHECKPOINTS / f"step_{stopped}" / COMPLETE_MARK).is_file()
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    assert losses(split) == losses(whole)  # bitwise: the same run, interrupted or not


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    run_dir = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "jobs.train",
        *TRAIN,
        "parallel=ddp",
        "train.micro_batch_size=1",
        f"run.dir={run_dir}",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(run_dir, proc, 5)
    os.kill(worker_pids(proc.pid)[1], signal.SIGUSR1)  # rank 1 only
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = max(losses(run_dir))
    assert stopped < 150
    # one complete checkpoint holding both ranks' state, written at the agreed step
    ckpt = run_dir / CHECKPOINTS / f"step_{stopped}"
    assert (ckpt / COMPLETE_MARK).is_file()
    assert {p.name for p in ckpt.glob("__*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
