"""Checkpoints with `torch.distributed.checkpoint` (DCP): atomic, checksummed, never executed.

Layout of one checkpoint, `<run>/checkpoints/step_<N>/`:

    .metadata, __<rank>_<i>.distcp   DCP: model, optimizer, per-rank RNG states (tensors)
    trainer_state.json               step, data position, config, logger ids (plain JSON)
    complete.json                    size and CRC-32 checksum of every file above

DCP writes into `.step_<N>.tmp/`, each rank hashing its files as it writes them
(`trainer.checkpoint_files`). Once every rank has finished (DCP's save is collective), rank 0
adds `trainer_state.json` and `complete.json` and renames the folder to `step_<N>`: the rename
is the commit, so a `step_<N>` folder is either whole or damaged afterwards, never half-written.

Before a checkpoint is loaded, every file is checked against `complete.json` (the ranks share
the hashing), the JSON is parsed and DCP's pickled index is read by a restricted unpickler.
Which checkpoint a run takes (`resume=auto|none|PATH`, skipping damaged ones, setting aside
an abandoned future) is `trainer.resume`'s business; this module saves, checks and loads.

DCP stores every tensor with its global shape and each rank's piece of it, so a checkpoint
written by any parallel layout loads into any other one (resharding happens on load).
"""

from __future__ import annotations

import io
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from data_prep.files import fsync_file, fsync_folder, write_json_atomic
from trainer import distributed
from trainer.checkpoint_files import (  # noqa: F401 (re-exported: the checkpoint API)
    CHECKSUM,
    COMPLETE_MARK,
    FORMAT_VERSION,
    TRAINER_STATE,
    CheckpointError,
    CheckpointRefused,
    HashingFileSystemWriter,
    SafeFileSystemReader,
    check,
    checksum_file,
    is_complete,
    list_files,
    read_metadata,
    read_trainer_state,
    verify,
)
from trainer.models import spec_of, unwrap
from trainer.parallel.zero1 import local_optimizer
from trainer.run_dir import CHECKPOINTS, named

# DCP warns that it "assumes a single process" when torch.distributed is not initialised:
# that is exactly the single-process case, so the warning only adds noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


_ASYNC_GROUP: list = []


def _async_group() -> dist.ProcessGroup | None:
    """A process group of its own for background saves: their collectives must not interleave
    with the training's on the default group (that deadlocks)."""
    if not dist.is_initialized():
        return None
    if not _ASYNC_GROUP:
        _ASYNC_GROUP.append(dist.new_group(backend="gloo"))
    return _ASYNC_GROUP[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class ModelAndOptimizer(Stateful):
    """Model (+ optimizer) state with fully-qualified parameter names, for any layout.

    `get_state_dict` keys optimizer state by parameter name instead of by position and
    handles sharded (FSDP/TP) parameters, which is what makes checkpoints portable. Flattened,
    even the hyper-parameters are stored per parameter name, so pipeline stages (each holding
    other parameters) never overwrite each other's entries. A tied weight's optimizer state is
    stored under both of its names, so a pipeline stage that holds only one copy finds it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        # ZeRO-1: the AdamW over this rank's share of the parameters (trainer/parallel/zero1.py)
        self.model = model
        self.optimizer = None if optimizer is None else local_optimizer(optimizer)
        self._aliases: list[str] = []
        # Parameters that are one tensor in a whole model but two copies under pipeline
        # parallelism (a tied output layer and the token embedding live on different stages).
        cfg = unwrap(model).cfg
        self.tied = spec_of(cfg).tied(cfg)

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=OPTIONS)
        self._aliases = add_tied_aliases(optim_sd, self.tied)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=True))
            return
        optim_sd = {k: v for k, v in state["optim"].items() if k not in self._aliases}
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=optim_sd,
            options=OPTIONS,
        )


def add_tied_aliases(optim_sd: dict[str, Any], tied: tuple[tuple[str, str], ...]) -> list[str]:
    """Copy a tied weight's flattened optimizer entries to its other name; returns the keys
    added (they are dropped again before loading into this optimizer)."""
    added = []
    for a, b in tied:
        for have, want in ((a, b), (b, a)):
            mine = [k for k in optim_sd if k.split(".", 1)[1].startswith(have + ".")]
            if mine and not any(k.split(".", 1)[1].startswith(want + ".") for k in optim_sd):
                for key in mine:
                    section, rest = key.split(".", 1)
                    alias = f"{section}.{want}{rest[len(have) :]}"
                    optim_sd[alias] = optim_sd[key]
                    added.append(alias)
    return added


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP unpickles non-tensor values with `weights_only=False`; we never do."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's random number generator states (as tensors, so DCP stores them)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_of(path: Path) -> int:
    """N of a checkpoint folder `step_<N>`."""
    number = path.name.removeprefix("step_")
    if not path.name.startswith("step_") or not number.isdigit():
        raise CheckpointError(f"{path}: a checkpoint folder is named step_<N>")
    return int(number)


def step_folders(run_dir: str | Path) -> list[Path]:
    """Every `step_<N>` folder of a run, complete or not, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=step_of)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (sizes checked, not the content), or None."""
    found = list_complete(run_dir)
    return found[-1] if found else None


def list_complete(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [p for p in step_folders(run_dir) if is_complete(p)]


def move_aside(paths: list[Path], why: str) -> Path:
    """Move checkpoint folders into a new `checkpoints/<why>-<time>/` (the work is rank 0's;
    the callers hold a barrier after it). Returns that folder."""
    root = checkpoints_root(paths[0].parent.parent)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    where, n = root / f"{why}-{stamp}", 1
    while where.exists():  # twice in one second
        n += 1
        where = root / f"{why}-{stamp}-{n}"
    if _rank() == 0:
        where.mkdir(parents=True)
        for p in paths:
            os.replace(p, where / p.name)
        fsync_folder(where)
        fsync_folder(root)
    return where


# --- saving -----------------------------------------------------------------------------


@dataclass
class PendingSave:
    """A checkpoint being written; `wait()` finishes it (collective: every rank calls it)."""

    run_dir: Path
    step: int
    tmp: Path
    final: Path
    trainer_state: dict[str, Any]
    keep: int
    extra_files: list[Path]
    writer: HashingFileSystemWriter | None = None  # None: this step was already on disk
    future: Any = None  # from dcp.async_save; None once written

    @property
    def already_saved(self) -> bool:
        return self.writer is None

    def wait(self) -> Path:
        if self.writer is None:
            return self.final
        if self.future is not None:
            _result(self.future, self.tmp)  # this rank's files are written
            self.future = None
        digests = distributed.all_gather_objects(self.writer.digests)  # ... and every rank's
        if _rank() == 0:
            self._commit({k: v for d in digests for k, v in d.items()})
            prune(self.run_dir, self.keep)
        _barrier()
        return self.final

    def _commit(self, digests: dict[str, str | None]) -> None:
        """Rank 0: add the small files and the checksum list, then rename (the commit)."""
        write_json_atomic(
            self.tmp / TRAINER_STATE, {"format_version": FORMAT_VERSION, **self.trainer_state}
        )
        for extra in self.extra_files:
            copy = self.tmp / Path(extra).name
            shutil.copyfile(extra, copy)
            fsync_file(copy)
        files = {
            name: {"size": size, CHECKSUM: digests.get(name) or checksum_file(self.tmp / name)}
            for name, size in list_files(self.tmp).items()
        }
        write_json_atomic(self.tmp / COMPLETE_MARK, {"step": self.step, "files": files})
        os.replace(self.tmp, self.final)
        fsync_folder(self.final.parent)


def _result(future: Any, folder: Path) -> None:
    try:
        future.result()
    except CheckpointException as err:
        raise _one_line(err, folder, "writing") from None


def _one_line(err: CheckpointException, folder: Path, doing: str) -> BaseException:
    """DCP's multi-rank exception as one line (an OSError stays one, e.g. a full disk)."""
    cause = next(iter(err.failures.values()))[0] if err.failures else err
    if isinstance(cause, OSError):
        return named(cause, folder)
    if isinstance(cause, KeyboardInterrupt):  # a second Ctrl-C: abort, as asked
        return cause
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return CheckpointError(f"{folder}: {doing} the checkpoint failed: {first}")


def start_save(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
    extra_files: list[Path] = (),
    asynchronous: bool = False,
) -> PendingSave:
    """Begin checkpoint `step_<step>` (collective). With `asynchronous`, DCP copies the state
    to CPU memory now and writes the files in a background thread while training goes on;
    the checkpoint becomes visible only when `wait()` has run on every rank.

    `extra_files` (e.g. the tokenizer) are copied in next to the state. A step that is
    already on disk (preempted again right after resuming from it) is not written again:
    `already_saved` says so.
    """
    root = checkpoints_root(run_dir)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    pending = PendingSave(Path(run_dir), step, tmp, final, trainer_state, keep, list(extra_files))
    if is_complete(final):
        return pending
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists():  # damaged (a complete one would have been returned above)
            move_aside([final], "broken")
        tmp.mkdir(parents=True)
    _barrier()
    pending.writer = HashingFileSystemWriter(tmp)
    state = {"app": ModelAndOptimizer(model, optimizer), f"rng_rank{_rank()}": rng_state()}
    try:
        if asynchronous:
            pending.future = dcp.async_save(
                state,
                checkpoint_id=tmp,
                storage_writer=pending.writer,
                process_group=_async_group(),
            )
        else:
            dcp.save(state, checkpoint_id=tmp, storage_writer=pending.writer)
    except CheckpointException as err:
        raise _one_line(err, tmp, "writing") from None
    return pending


def save(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
    extra_files: list[Path] = (),
) -> Path:
    """Write checkpoint `step_<step>` now (collective) and prune old ones."""
    pending = start_save(run_dir, step, model, optimizer, trainer_state, keep, extra_files)
    return pending.wait()


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and abandoned temporary folders."""
    root = checkpoints_root(run_dir)
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_complete(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --- loading ----------------------------------------------------------------------------


def load(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    checked: bool = False,
) -> None:
    """Load a checkpoint into `model` (and `optimizer`, and this rank's RNG), after checking
    every file against its checksum (collective) unless the caller just `checked` it. The
    trainer state (`read_trainer_state`) is the caller's to read, once."""
    path = Path(path)
    problem = None if checked else check(path)
    if problem is not None:
        raise CheckpointError(problem)
    state: dict[str, Any] = {"app": ModelAndOptimizer(model, optimizer)}
    rng_key = f"rng_rank{_rank()}"
    saved_keys = read_metadata(path).state_dict_metadata
    saved_rng = {k: v for k, v in rng_state().items() if f"{rng_key}.{k}" in saved_keys}
    if optimizer is not None and saved_rng:  # RNG only matters when training continues
        state[rng_key] = saved_rng
    try:
        dcp.load(
            state,
            checkpoint_id=path,
            storage_reader=SafeFileSystemReader(path),
            planner=WeightsOnlyLoadPlanner(),
        )
    except CheckpointException as err:
        raise _one_line(err, path, "loading") from None
    if rng_key in state:
        set_rng_state(state[rng_key])


# --- the manager ------------------------------------------------------------------------


def saves_in_background(async_save: bool | str, device: torch.device) -> bool:
    """`checkpoint.async_save`: true | false, or auto: in the background on CUDA, where the
    training stalls only for the copy of the state to CPU memory (measured ~6x shorter than a
    synchronous save), and synchronous on CPU, where that copy is most of the work and the
    writer thread would compete with training for the same cores."""
    if async_save == "auto":
        return device.type == "cuda"
    return bool(async_save)


class Checkpointer:
    """What a run saves and restores, and when: the one place that knows.

    DCP gets the tensors (model + optimizer state and each rank's RNG); `trainer_state.json`
    gets the config and the `state_dict()` of every other registered part (the run's
    counters at the top level, the data loader, the gradient scaler, ... under their names):
    small plain JSON, readable without torch. One checkpoint is in flight at a time; when
    :func:`saves_in_background` says so for `cfg.async_save` on `device`, it is written in the
    background and committed before the next one starts.
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: Any,  # trainer.config.CheckpointConfig
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        counters: Stateful,
        parts: Mapping[str, Stateful],
        config: dict[str, Any],
        extra_files: list[Path],
        log: Callable[[str], None],
        before_save: Callable[[int, Path | None], None] | None = None,
        *,
        device: torch.device,  # where training runs: decides checkpoint.async_save=auto
    ):
        self.run_dir, self.cfg, self.log = run_dir, cfg, log
        self.asynchronous = saves_in_background(cfg.async_save, device)
        self.model, self.optimizer = model, optimizer
        self.counters, self.parts = counters, dict(parts)
        self.config, self.extra_files = config, extra_files
        self.last: Path | None = None  # the newest checkpoint on disk
        self.before_save = before_save  # may refuse the save (e.g. non-finite weights)
        self._pending: PendingSave | None = None
        self._started = 0.0

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        """Save after this step? At the end, when stopping, and every `checkpoint.interval`."""
        every = self.cfg.interval
        return last or stopping or bool(every and step % every == 0)

    def restore(self, path: Path, saved: dict[str, Any]) -> float:
        """Load checkpoint `path` (already checked; `saved` is its trainer state) into every
        registered part; returns the seconds it took."""
        started = time.perf_counter()
        load(path, self.model, self.optimizer, checked=True)
        self.counters.load_state_dict(saved)
        for name, part in self.parts.items():
            if saved.get(name):  # e.g. a disabled gradient scaler saved nothing
                part.load_state_dict(saved[name])
        self.last = path
        return time.perf_counter() - started

    def save(self, step: int) -> None:
        """Begin checkpoint `step` (collective); unless asynchronous it is on disk on return."""
        self.finish()  # one checkpoint in flight at a time
        if self.before_save is not None:
            self.before_save(step, self.last)
        self._started = time.perf_counter()
        state = {
            **self.counters.state_dict(),
            **{name: part.state_dict() for name, part in self.parts.items()},
            "config": self.config,
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "torch_version": torch.__version__,  # a resume under another version says so
        }
        self._pending = start_save(
            self.run_dir,
            step,
            self.model,
            self.optimizer,
            state,
            self.cfg.keep,
            self.extra_files,
            asynchronous=self.asynchronous,
        )
        if not self.asynchronous:
            self.finish()

    def finish(self) -> None:
        """Commit the checkpoint in flight, if any (collective), and say so."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        self.last = pending.wait()
        took = time.perf_counter() - self._started  # async: includes the steps meanwhile
        if pending.already_saved:
            self.log(f"checkpoint {self.last} is already on disk (kept as is)")
        else:
            how = "async, complete" if self.asynchronous else "written in"
            self.log(f"checkpoint saved: {self.last} ({how} {took:.2f} s)")
