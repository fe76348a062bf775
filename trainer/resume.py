"""Where a run starts: which checkpoint (`resume=auto|none|PATH`), and whether it fits.

Resuming is visible and safe: the chosen checkpoint is checked file by file (see
`trainer.checkpoint`), every skipped one is named, and the checkpoint's config is compared with
this run's. A different model shape or tokenizer cannot continue (refused, with a hint); other
data can only be taken up on purpose (`resume=PATH`); everything else that changed — batch,
steps, learning-rate curve, layout, precision — is listed in a few lines and the run goes on.
"""

from __future__ import annotations

import dataclasses
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint
from trainer.config import Config, ConfigError, model_config, to_dict
from trainer.models import spec_of
from trainer.run_dir import CONFIG

# A checkpoint's weights fit only a model of the same architecture and shape (its spec's
# shape_keys), and its token ids only the same tokenizer. The vocabulary padding changes the
# embedding's rows: a checkpoint continues only with its own (another one: export it with
# dlt-export format=hf, which drops the padding, and start from that with model.init_from).
TOKEN_KEYS = (
    "model.vocab_size",
    "model.pad_vocab_to_multiple",
    "data.tokenizer",
    "data.tokenizer_hash",
)
DATA_KEYS = {
    "shards": ("data.kind", "data.path", "data.mix"),
    "dummy": ("data.kind", "data.dummy_branching"),
}
# Shown when they change; the run goes on with the new value.
NOTED_KEYS = (
    "train.max_steps",
    "train.lr",
    "train.min_lr",
    "train.warmup_steps",
    "train.lr_schedule",
    "train.decay_fraction",
    "train.decay_shape",
    "train.z_loss",
    "train.skip_spike_factor",
    "train.skip_spike_window",
    "train.max_consecutive_skips",
    "train.weight_decay",
    "train.grad_clip",
    "train.seed",
    "train.micro_batch_size",
    "train.grad_accum",
    "precision",
    "model.dropout",
    "model.layer_norm_eps",
    "model.rope_theta",
    "model.rope_scaling",
    "model.doc_mask",
    "model.doc_positions",
)


@dataclass
class ResumeChoice:
    """The checkpoint to load (None: start fresh) and what was done to get there."""

    path: Path | None
    notes: list[str] = field(default_factory=list)  # one line each, for the run's log
    # This run's checkpoints that an explicit resume=PATH abandons: moved aside by
    # `set_aside()` once the resume has been accepted.
    abandoned: list[Path] = field(default_factory=list)
    origin: str | None = None  # the resume=PATH this run's line of checkpoints started from


def scan(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of a run that passes :func:`checkpoint.check`, and each newer,
    damaged one with why (collective: the folders are listed before any collective, so alike
    on every rank). Raises on a checkpoint that must be refused, not skipped."""
    damaged = []
    for path in checkpoint.step_folders(run_dir)[::-1]:
        problem = checkpoint.check(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def newest_usable(run_dir: str | Path, move_damaged: bool = True) -> ResumeChoice:
    """The newest checkpoint of a run that passes :func:`checkpoint.check` (collective).

    Each newer one that is damaged is named with why and, with `move_damaged` (the trainer,
    which holds the run's lock), moved aside so that it is neither pruned nor mistaken for the
    run's history. Raises when the run has checkpoint folders but none passes (a run directory
    is never silently started afresh), and on a checkpoint that must be refused, not skipped.
    """
    path, damaged = scan(run_dir)
    choice = ResumeChoice(path, [f"skipping checkpoint {p.name}: {why}" for p, why in damaged])
    if path is None and damaged:
        raise checkpoint.CheckpointError(
            f"run.dir {run_dir}: none of its {len(damaged)} checkpoint(s) can be resumed ("
            + "; ".join(f"{p.name}: {why}" for p, why in damaged)
            + "): move checkpoints/ away to start afresh, or use another run.dir"
        )
    if damaged and move_damaged:
        folders = [p for p, _ in damaged]
        where = checkpoint.move_aside(folders, "broken")
        checkpoint._barrier()
        choice.notes.append(f"moved {', '.join(p.name for p in folders)} aside to {where}")
    return choice


def explicit(path: str | Path, run_dir: str | Path) -> ResumeChoice:
    """`resume=PATH`: that checkpoint (or a run directory's newest usable one), checked.

    This run's checkpoints at or after its step are to be set aside (they belong to the
    abandoned future). A job that is requeued or restarted repeats the same `resume=PATH`:
    when this run's newest checkpoint already descends from PATH, the run continues from it.
    """
    origin = str(Path(path).resolve())
    own = checkpoint.step_folders(run_dir)  # listed before any collective: alike on every rank
    if own:
        try:
            mine = newest_usable(run_dir)
        except checkpoint.CheckpointRefused:
            raise
        except checkpoint.CheckpointError:
            mine = ResumeChoice(None)  # all damaged: PATH decides
        if (
            mine.path is not None
            and checkpoint.read_trainer_state(mine.path).get("origin") == origin
        ):
            mine.origin = origin
            mine.notes.append(
                f"resume={path}: continuing this run from {mine.path.name}, which descends "
                "from it (a restarted job)"
            )
            return mine
    choice = resolve_choice(path)
    assert choice.path is not None
    choice.origin = origin
    step = checkpoint.step_of(choice.path)
    chosen = choice.path.resolve()
    choice.abandoned = [p for p in own if checkpoint.step_of(p) >= step and p.resolve() != chosen]
    return choice


def set_aside(choice: ResumeChoice, run_dir: str | Path) -> str | None:
    """Move the checkpoints an accepted explicit resume abandons (collective); one line."""
    alive = [p for p in choice.abandoned if p.exists()]
    if not choice.abandoned:
        return None
    where = checkpoint.move_aside(alive, "abandoned") if alive else None
    checkpoint._barrier()
    step = checkpoint.step_of(choice.path) if choice.path else 0
    return (
        f"resume={choice.origin}: this run continues from step {step}; its checkpoints "
        f"{', '.join(p.name for p in choice.abandoned)} moved aside to {where}"
    )


def resolve_choice(path: str | Path) -> ResumeChoice:
    """A run directory (its newest usable checkpoint) or one checkpoint folder, checked.
    Reads only: a damaged checkpoint of that run is named, not moved."""
    path = Path(path)
    if checkpoint.checkpoints_root(path).is_dir() or (path / CONFIG).is_file():
        choice = newest_usable(path, move_damaged=False)
        if choice.path is None:
            raise checkpoint.CheckpointError(f"{path}: run directory has no checkpoint")
        return choice
    if not path.is_dir():
        raise checkpoint.CheckpointError(f"{path}: no such checkpoint folder or run directory")
    checkpoint.step_of(path)  # a folder must be named step_<N>
    problem = checkpoint.check(path)
    if problem is not None:
        raise checkpoint.CheckpointError(problem)
    return ResumeChoice(path)


def resolve(path: str | Path, log: Callable[[str], None] | None = None) -> Path:
    """:func:`resolve_choice`'s checkpoint; its notes (skipped checkpoints) go to `log`."""
    choice = resolve_choice(path)
    for note in choice.notes:
        (log or print)(note)
    assert choice.path is not None
    return choice.path


def choose(cfg: Config) -> ResumeChoice:
    """The checkpoint to start from (collective: the ranks share the checksum work)."""
    run_dir = Path(cfg.run.dir)
    if cfg.resume == "none":
        existing = checkpoint.step_folders(run_dir)
        if existing:
            raise ConfigError(
                f"resume=none but run.dir={run_dir} already holds checkpoints "
                f"({', '.join(p.name for p in existing)}): use resume=auto to continue it, "
                "or another run.dir"
            )
        return ResumeChoice(None)
    if cfg.resume == "auto":
        return newest_usable(run_dir)
    return explicit(cfg.resume, run_dir)


def _get(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _same_path(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a == b
    return os.path.abspath(str(a)) == os.path.abspath(str(b))


def _same_mix(a: Any, b: Any) -> bool:
    """Two `data.mix` lists name the same datasets (as absolute paths) with the same weights
    (a checkpoint from before mixtures has none)."""

    def key(mix: Any) -> list[tuple[str, float]]:
        return [(os.path.abspath(str(s["path"])), float(s["weight"])) for s in mix or []]

    return key(a) == key(b)


SAME_DATA = {"data.path": _same_path, "data.mix": _same_mix}


def compare(cfg: Config, saved: dict[str, Any], path: Path, explicit: bool) -> list[str]:
    """Refuse what cannot continue from checkpoint `path`; return one line per other change."""
    now, then = to_dict(cfg), dict(saved.get("config") or {})
    # A checkpoint of an older version lacks newer model keys: they had today's defaults.
    then["model"] = dataclasses.asdict(model_config(then.get("model") or {}))
    for key in ("model.arch", *spec_of(cfg.model).shape_keys, *TOKEN_KEYS):
        if _get(now, key) != _get(then, key):
            instead = (  # a preset's padding changed under a run (1 before it existed)
                f"add {key}={_get(then, key)} to continue this checkpoint"
                if key == "model.pad_vocab_to_multiple"
                else "use another run.dir for a different model or tokenizer"
            )
            raise ConfigError(
                f"{key}={_get(now, key)} but checkpoint {path} has {_get(then, key)}: its "
                f"weights or token ids do not fit; {instead}"
            )
    changed_data = [
        key
        for key in DATA_KEYS.get(cfg.data.kind, ("data.kind",))
        if not (key == "data.path" and cfg.data.mix)  # a mixture's paths are its sources'
        and not SAME_DATA.get(key, operator.eq)(_get(now, key), _get(then, key))
    ]
    if changed_data and not explicit:
        first = changed_data[0]
        raise ConfigError(
            f"{first}={_get(now, first)} but run.dir={cfg.run.dir} was trained on "
            f"{_get(then, first)}: to continue this checkpoint on other data, start a new run "
            f"from it (run.dir=<new> resume={path})"
        )
    lines = [f"{key} {_get(then, key)} -> {_get(now, key)}" for key in changed_data]
    lines += [
        f"{key} {_get(then, key)} -> {_get(now, key)}"
        for key in NOTED_KEYS
        if _get(now, key) != _get(then, key)
    ]
    if saved.get("torch_version") not in (None, torch.__version__):
        lines.append(f"torch {saved['torch_version']} -> {torch.__version__}")
    batch = _global_batch(now), _global_batch(then)
    if batch[0] != batch[1]:
        lines.append(f"global batch {batch[1]} -> {batch[0]} sequences per step")
    layout = _layout(now), _layout(then)
    if layout[0] != layout[1]:
        ranks = f" from {saved['world_size']} ranks" if "world_size" in saved else ""
        lines.append(f"layout {layout[1]} -> {layout[0]} (resharded on load{ranks})")
    return lines


def _global_batch(config: dict[str, Any]) -> int | None:
    sizes = [
        _get(config, k)
        for k in (
            "train.micro_batch_size",
            "train.grad_accum",
            "parallel.dp_replicate",
            "parallel.dp_shard",
        )
    ]
    return None if None in sizes else sizes[0] * sizes[1] * sizes[2] * sizes[3]


def _layout(config: dict[str, Any]) -> str:
    dims = ("pp", "pp_virtual_stages", "dp_replicate", "dp_shard", "cp", "tp")
    # A size a config does not name (cp, in checkpoints from before it existed) was 1.
    layout = " ".join(f"{d}={_get(config, 'parallel.' + d) or 1}" for d in dims)
    return layout + (" zero1" if _get(config, "parallel.zero1") else "")
