"""Run a function on N local processes joined into one gloo process group (CPU), as torchrun
would start them. Used by test_distributed.py.

    spawn(2, train_worker, cfg)   # train_worker(rank, cfg) runs on ranks 0 and 1

The function must live at module level in an importable module (this one): the children are
started with the `spawn` method, which imports it afresh. Results come back through files.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessContext, ProcessException

TESTS_DIR = str(Path(__file__).resolve().parent)
DEFAULT_TIMEOUT_S = 300.0  # a hung collective fails the test instead of hanging the suite


def free_port() -> int:
    """A TCP port that is free now (the OS picks it; it is released for the store to take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    """Entry point of each spawned process: torchrun's environment, then `fn(rank, *args)`."""
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from trainer import distributed

    try:
        fn(rank, *args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:
        # DCP's CheckpointException is a BaseException, which torch's spawn wrapper would not
        # hand to the parent: make it an Exception (the traceback keeps the original).
        if isinstance(err, Exception):
            raise
        raise RuntimeError(f"{type(err).__name__}: {err}") from err
    finally:
        distributed.shutdown()


def spawn(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: Callable[[], int] | None = None,
) -> None:
    """Run `fn(rank, *args)` on `world_size` processes; re-raise the first child's failure.

    The children are killed after `timeout_s` seconds, counted afresh whenever `progress()`
    (if given) returns a new value."""
    ctx = mp.spawn(
        _child,
        args=(world_size, free_port(), fn, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    try:
        deadline = time.monotonic() + timeout_s
        seen = progress() if progress else None
        # On a failure, join() raises ProcessRaisedException and stops the other children: SIGTERM
        # after 1 s, SIGKILL 1 s later (SIGTERM alone only asks a rank to checkpoint, which a
        # rank stuck in a collective with the dead one never finishes).
        while not ctx.join(timeout=0.5, grace_period=1.0):
            if progress is not None and (now := progress()) != seen:
                seen, deadline = now, time.monotonic() + timeout_s
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} on {world_size} processes: over {timeout_s}s")
    except ProcessException as err:
        raise RuntimeError(f"{err}\n{child_errors(ctx)}") from None
    finally:  # never leave a child behind (one stuck in a collective would block exit)
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def child_errors(ctx: ProcessContext) -> str:
    """Every failed child's exit code and traceback: the first to exit is not always the one
    whose error explains the failure (a rank dies; its peers then fail in a collective)."""
    lines = []
    for rank, (process, error_file) in enumerate(zip(ctx.processes, ctx.error_files, strict=True)):
        if process.exitcode not in (0, None):
            lines.append(f"--- rank {rank}: exit code {process.exitcode}")
            if os.path.exists(error_file) and os.path.getsize(error_file):
                with open(error_file, "rb") as f:
                    lines.append(pickle.load(f))
    return "\n".join(lines)


# --- workers (run in the children) ---------------------------------------------------------


def train_worker(rank: int, cfg: Mapping[str, Any], stop_at: int | None = None) -> None:
    """`trainer.train.run(cfg)`, stopping (and saving) after step `stop_at` if given."""
    from trainer.train import run

    run(cfg, stop_requested=None if stop_at is None else (lambda step: step >= stop_at))


def train_jobs_worker(rank: int, jobs: list[tuple[str, dict, int | None]], status: str) -> None:
    """Several `train_worker` runs one after the other in the same process group. Rank 0
    marks each job started/done in folder `status`, so the parent knows which one failed."""
    marks = Path(status)
    for name, cfg, stop_at in jobs:
        if rank == 0:
            (marks / f"{name}.started").touch()
        train_worker(rank, cfg, stop_at)
        if rank == 0:
            (marks / f"{name}.done").touch()


def run_jobs(
    world_size: int,
    jobs: list[tuple[str, dict, int | None]],
    status: Path,
    timeout_per_job_s: float = 120.0,
    worker: Callable[[int, list, str], None] = train_jobs_worker,
) -> dict[str, str]:
    """Run training jobs `(name, cfg, stop_at)` on `world_size` processes, paying the start-up
    of the processes (importing torch, ~3 s each on 2 cores) once for all of them.

    A failing (or hung) job is recorded and the processes are restarted for the jobs after it,
    so one broken layout does not take the others down. Returns {name: error} of the failures.
    `worker` runs the jobs in each process (a `train_jobs_worker` that also records more).
    """
    status.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    pending = list(jobs)
    while pending:
        try:
            spawn(
                world_size,
                worker,
                pending,
                str(status),
                timeout_s=timeout_per_job_s,
                progress=lambda: len(list(status.iterdir())),
            )
        except Exception as err:  # reported per job below
            done = [j for j in pending if (status / f"{j[0]}.done").exists()]
            failed = next(
                (j for j in pending if j not in done and (status / f"{j[0]}.started").exists()),
                pending[len(done)],
            )
            failures[failed[0]] = f"{type(err).__name__}: {err}"
            pending = pending[pending.index(failed) + 1 :]
            continue
        break
    return failures


def build_training_state(cfg: Mapping[str, Any]):
    """Model + optimizer laid out as `cfg.parallel` says, as `trainer.train.run` builds them.

    Returns (config, parallel model, optimizer); joins the process group when there is one."""
    from trainer import distributed
    from trainer.config import resolve_config
    from trainer.optim import build_optimizer
    from trainer.parallel import build_layout, parallelize
    from trainer.parallel.zero1 import zero1_group
    from trainer.train import build_model

    config = resolve_config(cfg, world_size=distributed.world_from_env().size)  # layout too
    world, device = distributed.init(config.device)
    layout = build_layout(config, device.type, world.size)
    pm = parallelize(build_model(config, device), config, layout, device)
    shard_over = zero1_group(config.parallel, layout)  # ZeRO-1: the AdamW state split
    optimizer = build_optimizer(pm.module, config.train, device, shard_over)
    return config, pm, optimizer


def reshard_worker(rank: int, cfg: Mapping[str, Any], source: str, dest_run_dir: str) -> str:
    """Load checkpoint `source` into this layout's model and optimizer and save it again,
    unchanged, as a checkpoint of `dest_run_dir` (same step). Returns the new folder."""
    from trainer import checkpoint

    _, pm, optimizer = build_training_state(cfg)
    checkpoint.load(source, pm.module, optimizer)
    state = checkpoint.read_trainer_state(source)
    return str(checkpoint.save(dest_run_dir, state["step"], pm.module, optimizer, state, keep=1))
