"""Helpers for tests against the real one-machine SLURM cluster of `dlt-cluster up`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from jobs.status import last_step
from trainer.run_dir import JOBS, METRICS, read_jsonl

CLUSTER_DIR = os.environ.get("DLT_CLUSTER_DIR", "/tmp/dlt-cluster")
SLURM_CONF = f"{CLUSTER_DIR}/slurm.conf"
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

# A small DDP job of ~1000 steps (~20 s on two CPU cores): long enough to be interrupted at a
# random step, short enough to run many times. Losses are logged at every step.
STEPS = 1000
TRAIN = [
    "model=tiny",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.block_size=64",
    "data=dummy",
    "train.micro_batch_size=4",
    "train.warmup_steps=5",
    f"train.max_steps={STEPS}",
    "log.interval=1",
    "log.progress=false",
    "eval.interval=0",
    "checkpoint.interval=250",
    "device=cpu",
]


def env() -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": SLURM_CONF, "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], cwd: Path | None = None, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=cwd, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def dlt(command: str, args: list[str], cwd: Path) -> str:
    """Run `dlt-<command> args` (as `python -m jobs.<command>`) in `cwd`."""
    return run([sys.executable, "-m", f"jobs.{command}", *args], cwd=cwd)


def submitted_job(output: str) -> str:
    match = re.search(r"submitted job (\d+)", output)
    assert match, f"no job id in: {output}"
    return match.group(1)


def job_info(job_id: str) -> dict[str, str]:
    out = run(["scontrol", "show", "job", "-o", job_id], check=False)
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_for_job(job_id: str, timeout_s: float = 240, log: Path | None = None) -> dict[str, str]:
    """Block until the job has ended for good (requeued jobs run again first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in DONE_STATES:
            return info
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"job {job_id} did not end in {timeout_s} s: {job_info(job_id)}\n{tail}")


def wait_for_step(run_dir: Path, step: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if last_step(run_dir) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run_dir} did not reach step {step} in {timeout_s} s")


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss; a step logged twice (redone after a crash) keeps its last."""
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / METRICS) if "loss" in r}


def events(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / JOBS)
