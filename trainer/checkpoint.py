"""Checkpoints with `torch.distributed.checkpoint` (DCP), atomic and verifiable.

Layout of one checkpoint, `<run>/checkpoints/step_<N>/`:

    .metadata, __<rank>_<i>.distcp   DCP: model, optimizer, per-rank RNG states (tensors)
    trainer_state.json               step, data position, config, logger ids (plain JSON)
    complete.json                    written last: the size of every file above

DCP writes into `.step_<N>.tmp/`; once every rank has finished (DCP's save is collective),
rank 0 adds `trainer_state.json`, renames the folder to `step_<N>` and writes `complete.json`.
A folder without a valid `complete.json` (a crash mid-save, a truncated file) is never picked
by `resume=auto`, and loading it explicitly fails with a clear error.

DCP stores every tensor with its global shape and each rank's piece of it, so a checkpoint
written by any parallel layout loads into any other one (resharding happens on load).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
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

from data_prep.shards import write_json_atomic

COMPLETE_MARK = "complete.json"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 1

# DCP warns that it "assumes a single process" when torch.distributed is not initialised:
# that is exactly the single-process case, so the warning only adds noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt."""


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


# Parameters that are one tensor in a whole model but two copies under pipeline parallelism
# (GPT-2's output layer is tied to the token embedding; the two live on different stages).
TIED = (("tok_emb.weight", "lm_head.weight"),)
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
        self.model, self.optimizer = model, optimizer
        self._aliases: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=OPTIONS)
        self._aliases = add_tied_aliases(optim_sd)
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


def add_tied_aliases(optim_sd: dict[str, Any]) -> list[str]:
    """Copy a tied weight's flattened optimizer entries to its other name; returns the keys
    added (they are dropped again before loading into this optimizer)."""
    added = []
    for a, b in TIED:
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
    return Path(run_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _list_files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARK
    }


def verify(path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless `path` is a complete, untruncated checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    mark = path / COMPLETE_MARK
    if not mark.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE_MARK})")
    try:
        expected = json.loads(mark.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{mark}: unreadable completion mark ({err})") from None
    actual = _list_files(path)
    for name, size in expected.items():
        if name not in actual:
            raise CheckpointError(f"{path}: file {name} is missing")
        if actual[name] != size:
            raise CheckpointError(
                f"{path}: file {name} has {actual[name]} bytes, expected {size} (truncated?)"
            )


def is_complete(path: Path) -> bool:
    try:
        verify(path)
    except CheckpointError:
        return False
    return True


def list_complete(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.name[5:].isdigit() and is_complete(p)]
    return sorted(found, key=step_of)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_complete(run_dir)
    return found[-1] if found else None


def resolve(path: str | Path) -> Path:
    """A run directory (its newest complete checkpoint) or one checkpoint folder, verified."""
    path = Path(path)
    if checkpoints_root(path).is_dir() or (path / "config.yaml").is_file():
        newest = latest(path)
        if newest is None:
            raise CheckpointError(f"{path}: run directory has no complete checkpoint")
        return newest
    verify(path)
    return path


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


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
    future: Any = None  # from dcp.async_save; None once written

    def wait(self) -> Path:
        if self.future is not None:
            self.future.result()  # this rank's files are written
            self.future = None
        _barrier()  # ... and every other rank's
        if _rank() == 0 and not is_complete(self.final):
            state = {"format_version": FORMAT_VERSION, **self.trainer_state}
            write_json_atomic(self.tmp / TRAINER_STATE, state)
            for extra in self.extra_files:
                shutil.copyfile(extra, self.tmp / Path(extra).name)
            os.replace(self.tmp, self.final)
            files = _list_files(self.final)
            write_json_atomic(self.final / COMPLETE_MARK, {"step": self.step, "files": files})
            prune(self.run_dir, self.keep)
        _barrier()
        return self.final


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

    `extra_files` (e.g. the tokenizer) are copied in next to the state.
    """
    root = checkpoints_root(run_dir)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    pending = PendingSave(Path(run_dir), step, tmp, final, trainer_state, keep, list(extra_files))
    if is_complete(final):  # e.g. preempted again right after resuming from this step
        return pending
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover
        tmp.mkdir(parents=True)
    _barrier()
    state = {"app": ModelAndOptimizer(model, optimizer), f"rng_rank{_rank()}": rng_state()}
    if asynchronous:
        pending.future = dcp.async_save(state, checkpoint_id=tmp, process_group=_async_group())
    else:
        dcp.save(state, checkpoint_id=tmp)
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


def load(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load a verified checkpoint into `model` (and `optimizer`, and this rank's RNG).

    Returns the trainer state (step, data position, config, ...).
    """
    path = Path(path)
    verify(path)
    state: dict[str, Any] = {"app": ModelAndOptimizer(model, optimizer)}
    rng_key = f"rng_rank{_rank()}"
    saved_keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved_rng = {k: v for k, v in rng_state().items() if f"{rng_key}.{k}" in saved_keys}
    if optimizer is not None and saved_rng:  # RNG only matters when training continues
        state[rng_key] = saved_rng
    dcp.load(state, checkpoint_id=path, planner=WeightsOnlyLoadPlanner())
    if rng_key in state:
        set_rng_state(state[rng_key])
    return read_trainer_state(path)
