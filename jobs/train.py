"""`dlt-train`: compose the config, then train here (`cluster=local`) or submit it to SLURM.

- `cluster=local` (default): train in this process, or in each process of a `torchrun` job.
- `cluster=<profile>`: submit from a login node (sbatch or submitit, `jobs/submit.py`), print
  the job id and log paths, return. `dry_run=true` prints what would be submitted.
- `--multirun` (`-m`): a Hydra sweep, e.g. through `hydra/launcher=submitit_slurm`.

Under SLURM, every training process reports how the run ended in `$DLT_OUTCOME_FILE`
(`finished`, `stopped` by a warning signal, or `failed`): the batch script requeues a
stopped run. Rank 0 also appends start/end events to `<run.dir>/jobs.jsonl` (`dlt-status`).
"""

from __future__ import annotations

if __name__ == "__main__":
    # A training process (`python -m jobs.train` under torchrun/srun): catch SLURM's warning
    # signal before the slow imports below, so one that arrives meanwhile is not lost.
    from trainer.preemption import StopOnSignal

    EARLY_SIGNAL: StopOnSignal | None = StopOnSignal()
else:
    EARLY_SIGNAL = None

import os
import socket
import sys
import time
from pathlib import Path

from jobs.cli import (
    compose_config,
    errors_as_one_line,
    given_keys,
    print_help,
    to_schema,
    training_dict,
    wants_help,
)
from jobs.node import prepare_nccl
from jobs.profile import ClusterProfile, check_profile
from jobs.submit import submit_training
from trainer import distributed
from trainer import run_dir as run_files
from trainer.config import Config, ConfigError, resolve_config
from trainer.preemption import StopOnSignal  # noqa: F811 (also imported early, above)
from trainer.train import RunHooks, run

USAGE = (
    "model=<preset> parallel=<preset> data=<preset> train.max_steps=N run.dir=DIR "
    "resume=auto|none|PATH precision=fp32|bf16|fp16 [cluster=local|<profile>] [dry_run=true] "
    "[key=value ...]"
)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print_help("dlt-train", "train", USAGE)
        return
    if "--multirun" in argv or "-m" in argv:
        from jobs.sweep import sweep

        sweep(argv)
        return
    # Catch a warning signal from the start: one that arrives while the config and model are
    # being built stops the run after its first step (it would be lost otherwise).
    early_signal = EARLY_SIGNAL or StopOnSignal()
    try:
        with errors_as_one_line("dlt-train"):
            composed = compose_config("train", argv)
            profile = to_schema(ClusterProfile, composed, "cluster")
            dry_run = bool(composed.get("dry_run", False))
            check_profile(profile, dry_run)
            # The one validation, with the world size the job will have: before anything is
            # submitted (a refused layout never waits in the queue) or written.
            world_size = (
                distributed.world_from_env().size
                if profile.is_local
                else profile.nodes * profile.processes_per_node
            )
            try:
                cfg = resolve_config(
                    training_dict(composed), world_size=world_size, given=given_keys(argv)
                )
            except ConfigError as err:
                if profile.is_local:
                    raise
                raise ConfigError(
                    f"{err} (cluster.nodes={profile.nodes} x {profile.processes_per_node} "
                    "processes per node)"
                ) from None
            if not profile.is_local:
                submit_training(profile, argv, dry_run)
                return
            train_here(cfg, early_signal)
    except KeyboardInterrupt:
        print(
            "dlt-train: interrupted (second Ctrl-C): stopped without a checkpoint; running "
            "the same command again resumes from the last one",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    finally:
        early_signal.restore()
    # Only after success: on an error this rank exits at once (torchrun then stops the others)
    # instead of waiting in a barrier for ranks that are stuck in a collective.
    distributed.shutdown()


class JobRecord(RunHooks):
    """The launcher's bookkeeping: SLURM log lines and `jobs.jsonl`, written only once this
    trainer owns the run directory (another trainer's records are not ours to touch)."""

    def __init__(self, cfg: Config, world: distributed.World):
        self.cfg, self.world, self.owns_run_dir = cfg, world, False

    def locked(self) -> None:
        self.owns_run_dir = True

    def started(self, checkpoint: Path | None, step: int) -> None:
        announce_start(self.cfg, self.world, checkpoint, step)


def train_here(cfg: Config, early_signal: StopOnSignal | None = None) -> None:
    """Train in this process (`cfg` from resolve_config), reporting the start and the outcome
    for SLURM and dlt-status; `early_signal`: the stop-signal handlers installed at start-up."""
    world = distributed.world_from_env()
    if world.size > 1 and distributed.pick_device(cfg.device).type == "cuda":
        prepare_nccl(cfg.run.dir)  # a hung collective ends the job, with a trace of it
    record = JobRecord(cfg, world)
    try:
        result = run(cfg, hooks=record, signals=early_signal)
    except BaseException:
        report_outcome(cfg, world, "failed", None, record=record.owns_run_dir)
        raise
    outcome = "stopped" if result.stopped_early else "finished"
    report_outcome(cfg, world, outcome, result.step)


def slurm_info() -> dict[str, object]:
    env = os.environ
    return {
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "restart_count": int(env.get("SLURM_RESTART_COUNT", 0)),
        "nodes": env.get("SLURM_JOB_NODELIST"),
    }


def announce_start(
    cfg: Config, world: distributed.World, resume_from: Path | None, step: int
) -> None:
    """Under SLURM, one line per node (its first process): which ranks, which restart, where
    it resumes. Rank 0 records the start in `jobs.jsonl` (dlt-status)."""
    info = slurm_info()
    if world.local_rank == 0 and info["slurm_job_id"]:
        last_rank = world.rank + world.local_size - 1
        resumed = f"resuming from step {step}" if resume_from else "starting at step 0"
        print(
            f"dlt-train: node {os.environ.get('GROUP_RANK', 0)}: ranks {world.rank}-{last_rank} "
            f"of {world.size} on {socket.gethostname()}, SLURM job "
            f"{info['slurm_job_id']} restart {info['restart_count']}, {resumed}",
            flush=True,
        )
    if world.is_main:
        append_event(cfg, {"event": "start", "world_size": world.size, "step": step, **info})


def report_outcome(
    cfg: Config, world: distributed.World, outcome: str, step: int | None, record: bool = True
) -> None:
    """The outcome for the batch script (requeue a stopped run) and, if `record`, jobs.jsonl."""
    if outcome == "failed" or world.is_main:
        path = os.environ.get("DLT_OUTCOME_FILE")
        if path:
            Path(path).write_text(outcome + "\n")
    if world.is_main and record:
        append_event(cfg, {"event": "end", "outcome": outcome, "step": step, **slurm_info()})


def append_event(cfg: Config, event: dict[str, object]) -> None:
    event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **event}
    run_files.append_jsonl(Path(cfg.run.dir) / run_files.JOBS, event)


if __name__ == "__main__":
    main()
