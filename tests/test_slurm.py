"""Training on a real SLURM cluster (`dlt-cluster up`: slurmctld + two slurmd on this host).

Every job is a 2-node torchrun job (c10d rendezvous across the nodes). The reference is the
same job run without interruption; interrupted jobs (warning signal, preemption by a
high-priority job, time limit, kill -9 during a checkpoint; sbatch and submitit routes) must
produce bitwise the same per-step losses.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
import slurm_helpers as slurm
import yaml
from slurm_helpers import STEPS, TRAIN, dlt, events, losses, submitted_job, wait_for_job

from trainer.run_dir import CHECKPOINTS, CONFIG

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

PROFILE = ["cluster=dlt_local", "cluster.launcher=sbatch"]


def submit_training(tmp: Path, name: str, extra: list[str] = (), layout: str = "ddp") -> tuple:
    run_dir = tmp / name
    out = dlt(
        "train",
        [*PROFILE, f"cluster.log_dir={tmp}/logs", f"cluster.job_name={name}", *TRAIN,
         f"parallel={layout}", f"run.dir={run_dir}", *extra],
        cwd=tmp,
    )  # fmt: skip
    job = submitted_job(out)
    return job, run_dir, tmp / "logs" / f"{name}-{job}.out"


def finished(job: str, run_dir: Path, log: Path, timeout_s: float = 240) -> dict[int, float]:
    info = wait_for_job(job, timeout_s, log)
    assert info["JobState"] == "COMPLETED", f"job {job}: {info}\n{log.read_text()[-3000:]}"
    assert events(run_dir)[-1]["outcome"] == "finished", log.read_text()[-3000:]
    return losses(run_dir)


def assert_resumed_exactly(
    reference: dict, run_dir: Path, log: Path, got: dict, steps: int = STEPS
) -> None:
    starts = [e for e in events(run_dir) if e["event"] == "start"]
    assert len(starts) >= 2, f"never restarted:\n{log.read_text()[-3000:]}"
    assert starts[-1]["restart_count"] > 0  # SLURM_RESTART_COUNT as the job saw it
    assert 0 < starts[1]["step"] < steps  # resumed from a mid-run checkpoint
    assert sorted(got) == list(range(1, steps + 1))
    assert got == reference  # bitwise: the same floats at every step


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted 2-node DDP job's per-step losses."""
    tmp = tmp_path_factory.mktemp("reference")
    job, run_dir, log = submit_training(tmp, "reference")
    got = finished(job, run_dir, log)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [e["event"] for e in events(run_dir)] == ["start", "end"]  # finished: no requeue
    assert job_info_restarts(job) == 0
    assert "node 0: ranks 0-0 of 2" in log.read_text()
    assert "node 1: ranks 1-1 of 2" in log.read_text()
    return got


def job_info_restarts(job: str) -> int:
    return int(slurm.job_info(job)["Restarts"])


def test_a_failing_run_is_retried_a_bounded_number_of_times_then_fails(tmp_path):
    # An exception is not a preemption: torchrun restarts the processes cluster.max_restarts
    # times, then the job fails instead of being requeued forever.
    bad = ["cluster.max_restarts=2", "resume=/nonexistent/checkpoint"]
    job, run_dir, log = submit_training(tmp_path, "failing", bad)
    info = wait_for_job(job, 180, log)
    text = log.read_text()
    assert info["JobState"] == "FAILED", text[-3000:]
    assert job_info_restarts(job) == 0  # never requeued
    # Each node's torchrun runs its processes at most 1 + max_restarts times.
    assert 3 <= text.count("dlt-train: error: ") <= 2 * 3, text[-3000:]
    assert "training failed" in text


def local_torchrun(tmp: Path, layout: str, extra: list[str] = ()) -> dict[int, float]:
    run_dir = tmp / f"local-{layout}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "jobs.train", *TRAIN, f"parallel={layout}", f"run.dir={run_dir}", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(run_dir)


def test_two_node_ddp_matches_the_same_layout_run_locally(reference, tmp_path):
    assert local_torchrun(tmp_path, "ddp") == reference


def test_sbatch_script_submitted_by_hand_trains_on_two_nodes(reference, tmp_path):
    """`sbatch --nodes=2 sbatch/train.sbatch <overrides>`: the script as users submit it."""
    script = resources.files("sbatch").joinpath("train.sbatch")
    (tmp_path / "logs").mkdir()
    run_dir = tmp_path / "by-hand"
    job = slurm.run(
        ["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1",
         f"--export=ALL,DLT_PYTHON={sys.executable}", str(script), *TRAIN, "parallel=ddp",
         f"run.dir={run_dir}"],
        cwd=tmp_path,
    ).strip()  # fmt: skip
    log = tmp_path / "logs" / f"dlt-train-{job}.out"
    assert finished(job, run_dir, log) == reference


def test_two_node_fsdp_matches_the_same_layout_run_locally(tmp_path):
    short = ["train.max_steps=30"]
    job, run_dir, log = submit_training(tmp_path, "fsdp", short, layout="fsdp")
    assert finished(job, run_dir, log) == local_torchrun(tmp_path, "fsdp", short)


def test_warning_signal_checkpoints_requeues_and_resumes_exactly(reference, tmp_path):
    job, run_dir, log = submit_training(tmp_path, "signalled")
    slurm.wait_for_step(run_dir, random.randint(20, STEPS // 2))
    # What SLURM does at --signal=USR1@N (our script asks for the job steps, not B:).
    slurm.run(["scancel", "--signal=USR1", job])
    got = finished(job, run_dir, log)
    assert "training stopped" in log.read_text()
    assert_resumed_exactly(reference, run_dir, log, got)


def test_preemption_by_a_high_priority_job_requeues_and_resumes_exactly(reference, tmp_path):
    job, run_dir, log = submit_training(tmp_path, "preempted", ["cluster.partition=low"])
    slurm.wait_for_step(run_dir, random.randint(20, STEPS // 2))
    high = slurm.run(
        ["sbatch", "--parsable", "-p", "high", "-N", "2", "--exclusive", "-o", "/dev/null",
         "--wrap", "sleep 2"]
    ).strip()  # fmt: skip
    assert wait_for_job(high, 120)["JobState"] == "COMPLETED"
    got = finished(job, run_dir, log)
    assert_resumed_exactly(reference, run_dir, log, got)


def test_time_limit_signal_stops_requeues_and_resumes_exactly(tmp_path):
    # A 1-minute limit with the warning 20 s ahead. SLURM looks at limits every 30 s and
    # sends the warning 20 to 50 s before the limit, i.e. 10 to 40 s into each attempt: a
    # run of ~60 s is stopped, requeued and resumed one or more times before it finishes.
    # Reference: the same layout run locally (bitwise equal to the 2-node job, see above).
    steps = 3 * STEPS
    longer = [f"train.max_steps={steps}", "checkpoint.interval=1000"]
    limit = ["cluster.time_min=1", "cluster.signal_lead_s=20"]
    job, run_dir, log = submit_training(tmp_path, "time-limited", longer + limit)
    reference = local_torchrun(tmp_path, "ddp", longer)
    got = finished(job, run_dir, log, timeout_s=500)
    assert_resumed_exactly(reference, run_dir, log, got, steps)


def test_submitit_route_preempt_and_resume(reference, tmp_path):
    run_dir = tmp_path / "submitit"
    out = dlt(
        "train",
        ["cluster=dlt_local", "cluster.launcher=submitit", f"cluster.log_dir={tmp_path}/logs",
         *TRAIN, "parallel=ddp", f"run.dir={run_dir}"],
        cwd=tmp_path,
    )  # fmt: skip
    job = submitted_job(out)
    slurm.wait_for_step(run_dir, random.randint(20, STEPS // 2))
    # submitit asks SLURM for USR2 before the limit / on preemption, sent to the job steps.
    slurm.run(["scancel", "--signal=USR2", job])
    info = wait_for_job(job, 240)
    folder = tmp_path / "logs" / "submitit" / job
    log = next(folder.glob("*_0_log.out"))
    assert info["JobState"] == "COMPLETED", (
        log.read_text() + next(folder.glob("*_0_log.err")).read_text()
    )[-4000:]
    err = next(folder.glob("*_0_log.err")).read_text()
    assert f"Requeued job {job}" in log.read_text(), err[-3000:]  # submitit's own requeue
    assert_resumed_exactly(reference, run_dir, log, losses(run_dir))


def test_kill_9_of_a_rank_during_a_checkpoint_resumes_from_the_previous_one(reference, tmp_path):
    # torchrun (--max-restarts=1 in the profile) restarts both nodes' processes; the half-
    # written checkpoint is never loaded: training resumes from the previous complete one.
    # Restarts race on a busy machine (a node's new processes may start before the other
    # node's old ones are gone, and gloo gives up connecting): allow a few.
    job, run_dir, log = submit_training(tmp_path, "killed", ["cluster.max_restarts=3"])
    slurm.wait_for_step(run_dir, 10)
    rank0 = training_pid(run_dir, rank=0)  # rank 0 is the one that would publish the checkpoint
    ckpts = run_dir / CHECKPOINTS
    for step in (500, 750):  # the first checkpoint caught while it is being written
        deadline = time.monotonic() + 120
        while not (ckpts / f".step_{step}.tmp").exists():
            assert time.monotonic() < deadline, f"never saw checkpoint {step} being written"
            time.sleep(0.001)
        os.kill(rank0, signal.SIGSTOP)  # freeze it mid-write, then make sure it was mid-write
        if not (ckpts / f"step_{step}").exists():
            break
        os.kill(rank0, signal.SIGCONT)  # too late: published already; catch the next one
    else:
        raise AssertionError("could not catch a checkpoint in the middle of its write")
    os.kill(rank0, signal.SIGKILL)
    previous = step - 250
    got = finished(job, run_dir, log)
    text = log.read_text()
    assert f"resuming from step {previous}" in text, text[-3000:]
    starts = [e["step"] for e in events(run_dir) if e["event"] == "start"]
    assert starts[0] == 0 and len(starts) >= 2
    assert set(starts[1:]) == {previous}  # every restart (one per node group) loaded it
    assert got == reference


def training_pid(run_dir: Path, rank: int) -> int:
    """The PID of training process `rank` of the job whose run.dir is `run_dir`."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"jobs.train" in cmd
            and b"torch.distributed.run" not in cmd
            and f"run.dir={run_dir}".encode() in cmd
            and f"RANK={rank}".encode() in environ
        ):
            return int(proc.name)
    raise AssertionError(f"no training process of rank {rank} for {run_dir}")


def test_hydra_multirun_through_the_submitit_launcher_lands_two_jobs(tmp_path):
    short = [a for a in TRAIN if not a.startswith("train.max_steps")] + ["train.max_steps=20"]
    out = dlt(
        "train",
        ["--multirun", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=normal",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
         "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}/multirun", *short,
         "train.lr=1e-3,3e-4", f"run.dir={tmp_path}/sweep/lr${{train.lr}}"],
        cwd=tmp_path,
    )  # fmt: skip
    runs = sorted((tmp_path / "sweep").iterdir())
    assert [r.name for r in runs] == ["lr0.0003", "lr0.001"], out
    job_ids = set()
    for run_dir in runs:
        assert events(run_dir)[-1]["outcome"] == "finished"
        assert sorted(losses(run_dir)) == list(range(1, 21))
        job_ids.add(events(run_dir)[0]["slurm_job_id"])
    assert len(job_ids) == 2  # two SLURM jobs (tasks of one array)
    assert losses(runs[0]) != losses(runs[1])  # each job trained its own config


def manifest_and_shards(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*.npy")}
    return {"splits": manifest["splits"], "tokenizer": manifest["tokenizer"], "shards": shards}


def test_prep_array_with_a_killed_task_completes_on_resubmission(tmp_path):
    prep = ["data=sample", "data.chunk_mb=0.5", "workers=1"]
    clean = dlt("prep", [*prep, f"data.out={tmp_path}/clean"], cwd=tmp_path)
    assert "wrote" in clean
    profile = ["cluster=dlt_local", "cluster.array_tasks=4", f"cluster.log_dir={tmp_path}/logs"]
    out_dir = tmp_path / "array"
    first = dlt("prep", [*profile, *prep, f"data.out={out_dir}"], cwd=tmp_path)
    plan, array, final = re.search(r"plan (\d+) -> array (\d+) .* finalize (\d+)", first).groups()
    slurm.run(["scancel", f"{array}_1"])  # one task of the array dies
    assert wait_for_job(final, 180)["JobState"] == "CANCELLED"  # afterok never satisfied
    assert not (out_dir / "manifest.json").exists()  # no manifest, no dataset
    second = dlt("prep", [*profile, *prep, f"data.out={out_dir}"], cwd=tmp_path)
    final = re.search(r"finalize (\d+)", second).group(1)
    assert wait_for_job(final, 180)["JobState"] == "COMPLETED"
    assert manifest_and_shards(out_dir) == manifest_and_shards(tmp_path / "clean")


def test_hostile_values_reach_slurm_and_the_trainer_as_plain_text(tmp_path):
    """Quotes, $(), backticks, ; and spaces in a profile value and an override: SLURM and the
    trainer get them literally, and no shell ever runs them."""
    hostile = "x'\"$(touch CANARY)`touch CANARY`;touch CANARY y"
    as_hydra_string = '"' + hostile.replace('"', '\\"') + '"'
    job, run_dir, _ = submit_training(
        tmp_path,
        "hostile",
        [f"cluster.job_name={as_hydra_string}", f"run.name={as_hydra_string}",
         "train.max_steps=3"],
    )  # fmt: skip
    info = wait_for_job(job, 120)
    assert info["JobState"] == "COMPLETED", info
    assert slurm.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%j"]).strip() == hostile
    config = yaml.safe_load((run_dir / CONFIG).read_text())
    assert config["run"]["name"] == hostile
    assert not list(tmp_path.rglob("CANARY"))
