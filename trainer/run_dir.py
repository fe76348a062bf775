"""The run directory: the one place that knows its file names, reads its JSONL files, and
locks it so that only one trainer writes into it at a time.

    <run.dir>/
      config.yaml        the resolved config
      metrics.jsonl      one JSON object per logged step
      train.log          the console lines
      jobs.jsonl         one start/end event per attempt (dlt-train)
      checkpoints/       step_<N>/ folders (trainer.checkpoint)
      .lock              held (flock) by the trainer writing here; names the holder
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_prep.errors import UserError
from data_prep.files import atomic_output

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TRAIN_LOG = "train.log"
JOBS = "jobs.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
LOCK = ".lock"


class RunDirError(UserError, RuntimeError):
    """A run directory that cannot be used: locked by another trainer, unwritable, ..."""

    same_on_every_rank = True  # rank 0 asks for the lock and tells the others


def read_jsonl(
    path: str | Path, on_bad_line: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, in order ([] when it does not exist).

    A line that is not a JSON object — torn by a crash or a full disk in mid-write, or edited
    by hand — is skipped and described to `on_bad_line` as `path:N: why`. Every reader of a
    run's JSONL files (trainer, dlt-status, dlt-plot, benchmarks, tests) goes through here.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record, why = None, "not JSON (a torn or edited line)"
            else:
                why = "not a JSON object"
            if isinstance(record, dict):
                records.append(record)
            elif on_bad_line is not None:
                on_bad_line(f"{path}:{number}: {why}, skipped")
    return records


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record as one line (a single write, so a crash tears at most this line).
    A failed write (a full disk) raises an OSError that names the file."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise named(err, path) from None


def rewrite_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace a JSONL file with `records` atomically (temporary file, fsync, rename)."""
    with atomic_output(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def named(err: OSError, path: str | Path) -> OSError:
    """`err` with the file it is about (a failed write() does not say which file)."""
    if err.filename is None:
        return type(err)(err.errno, err.strerror or str(err), str(path))
    return err


class RunDirLock:
    """An exclusive lock on a run directory, held for as long as a trainer writes into it.

    `flock` is released by the kernel when the holding process dies, so the lock of a job that
    was killed (kill -9, a node lost, a preemption) never blocks the requeued job; the file's
    content only names the holder for the error message. Needs a file system with working
    `flock` (local disks, NFSv4, Lustre mounted with `-o flock`, GPFS).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirError(
                f"run.dir {self.path.parent} is in use by another trainer ({holder}); "
                "wait for it to end, or use another run.dir"
            ) from None
        self._fd = fd  # held: release() lets go, also if naming the holder fails below
        try:
            os.ftruncate(fd, 0)
            os.write(fd, describe_holder().encode())
        except OSError:
            self.release()
            raise

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # no holder named any more
            except OSError:
                pass  # e.g. the disk went read-only: the lock still goes with the descriptor
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(folder: str | Path) -> None:
    """Create `folder` and write a file into it now, so that a read-only or full disk is
    found before the first step instead of at the first checkpoint."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    with open(probe, "wb") as f:
        f.write(b"0" * 4096)
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()


def describe_holder() -> str:
    """Who holds a lock: host, pid, SLURM job (when there is one), since when."""
    job = os.environ.get("SLURM_JOB_ID")
    return (
        f"pid {os.getpid()} on {socket.gethostname()}"
        + (f", SLURM job {job}" if job else "")
        + f", since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
