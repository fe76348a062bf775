"""Preempt-and-resume on SLURM: how long each part of a restart takes.

For each model, a 2-node DDP job is submitted with the sbatch route of a cluster profile;
once it has trained a few steps it gets the warning signal (`scancel --signal=USR1`, what
SLURM sends before the time limit), checkpoints, requeues itself and resumes. Measured from
this (the login) side, by watching the run directory:

- submit -> first step: sbatch, scheduling, torchrun rendezvous, model build, first step;
- signal -> checkpoint complete: the step in flight, the agreement, writing the checkpoint;
- checkpoint -> running again: the job's end, `scontrol requeue`, scheduling;
- running again -> first step after resume: start-up plus loading the checkpoint;
- and, from the job's log, the checkpoint's own write and load times.

Needs a SLURM cluster (`dlt-cluster up` for the local one) and `SLURM_CONF` if not default.

    python -m benchmarks.slurm_restart --models tiny gpt2_small [--profile dlt_local]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import append_results
from jobs.status import last_step
from trainer.checkpoint_files import COMPLETE_MARK
from trainer.run_dir import CHECKPOINTS


def wait_until(condition, timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return time.monotonic()


def job_state(job: str) -> str:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], capture_output=True, text=True
    ).stdout
    match = re.search(r"JobState=(\S+)", out)
    return match.group(1) if match else "UNKNOWN"


def measure(model: str, profile: str, work: Path, steps_before: int) -> dict[str, float]:
    run_dir = work / model
    args = [
        f"cluster={profile}", "cluster.launcher=sbatch", f"cluster.log_dir={work}/logs",
        f"cluster.job_name=bench-{model}", "cluster.mem=6000M", f"model={model}", "parallel=ddp",
        "data=dummy",
        "train.micro_batch_size=1", "train.max_steps=100000", "log.interval=1",
        "log.progress=false", "eval.interval=0", "checkpoint.interval=0", "device=cpu",
        f"run.dir={run_dir}",
    ]  # fmt: skip
    t_submit = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "jobs.train", *args], capture_output=True, text=True, check=True
    ).stdout
    job = re.search(r"submitted job (\d+)", out).group(1)
    try:
        t_first = wait_until(lambda: last_step(run_dir) >= 1, 600, "the first step")
        wait_until(lambda: last_step(run_dir) >= steps_before, 600, "more steps")
        t_signal = time.monotonic()
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        ckpts = run_dir / CHECKPOINTS
        t_saved = wait_until(lambda: any(ckpts.glob(f"step_*/{COMPLETE_MARK}")), 600, "checkpoint")
        saved_step = max(int(p.parent.name[5:]) for p in ckpts.glob(f"step_*/{COMPLETE_MARK}"))
        wait_until(lambda: job_state(job) != "RUNNING", 600, "the job to stop")
        t_running = wait_until(lambda: job_state(job) == "RUNNING", 600, "the requeued job")
        t_resumed = wait_until(lambda: last_step(run_dir) > saved_step, 900, "a resumed step")
    finally:
        subprocess.run(["scancel", job])
    log = (work / "logs" / f"bench-{model}-{job}.out").read_text()
    write_s = re.search(rf"checkpoint saved: \S*step_{saved_step} \(written in ([\d.]+) s\)", log)
    load_s = re.search(r"loaded in ([\d.]+) s", log)
    return {
        "write_s": float(write_s.group(1)) if write_s else float("nan"),
        "load_s": float(load_s.group(1)) if load_s else float("nan"),
        "submit_to_first_step_s": t_first - t_submit,
        "signal_to_checkpoint_s": t_saved - t_signal,
        "checkpoint_to_running_s": t_running - t_saved,
        "running_to_resumed_step_s": t_resumed - t_running,
        "checkpoint_gib": sum(f.stat().st_size for f in ckpts.rglob("*") if f.is_file()) / 2**30,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "gpt2_small"])
    parser.add_argument("--profile", default="dlt_local")
    parser.add_argument("--steps-before", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlt-bench-slurm-") as tmp:
        for model in args.models:
            r = measure(model, args.profile, Path(tmp), args.steps_before)
            rows.append(
                f"| {model} | {r['checkpoint_gib']:.3f} | {r['submit_to_first_step_s']:.1f} | "
                f"{r['signal_to_checkpoint_s']:.1f} | {r['checkpoint_to_running_s']:.1f} | "
                f"{r['running_to_resumed_step_s']:.1f} | {r['write_s']:.2f} | {r['load_s']:.2f} |"
            )
            print(rows[-1], flush=True)
    table = (
        "| model | checkpoint GiB | submit → first step s | signal → checkpoint complete s | "
        "checkpoint → running again s | running again → first resumed step s | "
        "checkpoint write s | checkpoint load s |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    print(table)
    if not args.no_write:
        append_results(
            "Preempt and resume on SLURM",
            "python -m benchmarks.slurm_restart " + " ".join(argv or sys.argv[1:]),
            f"2-node DDP job (profile {args.profile}, sbatch route), fp32, micro-batch 1; "
            "warning signal with scancel --signal=USR1 after a few steps; times seen from "
            "the submitting side by watching the run directory and squeue",
            table,
        )


if __name__ == "__main__":
    main()
