"""Where a run starts: which checkpoint (`resume=auto|none|PATH`), and whether it fits.

Resuming is visible and safe: the chosen checkpoint is checked file by file (see
`trainer.checkpoint`), every skipped one is named, and the checkpoint's config is compared with
this run's. A different model shape or tokenizer cannot continue (refused, with a hint); other
data can only be taken up on purpose (`resume=PATH`); everything else that changed — batch,
steps, learning-rate curve, layout, precision — is listed in a few lines and the run goes on.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Any

from trainer import checkpoint
from trainer.checkpoint import ResumeChoice
from trainer.config import Config, ConfigError, to_dict

# A checkpoint's weights fit only a model of the same shape, and its token ids only the same
# tokenizer.
SHAPE_KEYS = ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size")
TOKEN_KEYS = ("model.vocab_size", "data.tokenizer", "data.tokenizer_hash")
DATA_KEYS = {"shards": ("data.kind", "data.path"), "dummy": ("data.kind", "data.dummy_branching")}
# Shown when they change; the run goes on with the new value.
NOTED_KEYS = (
    "train.max_steps",
    "train.lr",
    "train.min_lr",
    "train.warmup_steps",
    "train.weight_decay",
    "train.grad_clip",
    "train.seed",
    "train.micro_batch_size",
    "train.grad_accum",
    "precision",
    "model.dropout",
)


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
        return checkpoint.newest_usable(run_dir)
    return checkpoint.explicit(cfg.resume, run_dir)


def _get(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _same_path(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a == b
    return os.path.abspath(str(a)) == os.path.abspath(str(b))


def compare(cfg: Config, saved: dict[str, Any], path: Path, explicit: bool) -> list[str]:
    """Refuse what cannot continue from checkpoint `path`; return one line per other change."""
    now, then = to_dict(cfg), saved.get("config") or {}
    for key in SHAPE_KEYS + TOKEN_KEYS:
        if _get(now, key) != _get(then, key):
            raise ConfigError(
                f"{key}={_get(now, key)} but checkpoint {path} has {_get(then, key)}: its "
                "weights or token ids do not fit; use another run.dir for a different model or "
                "tokenizer"
            )
    changed_data = [
        key
        for key in DATA_KEYS.get(cfg.data.kind, ("data.kind",))
        if not (_same_path if key == "data.path" else operator.eq)(_get(now, key), _get(then, key))
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
    batch = _global_batch(now), _global_batch(then)
    if batch[0] != batch[1]:
        lines.append(f"global batch {batch[1]} -> {batch[0]} sequences per step")
    layout = _layout(now), _layout(then)
    if layout[0] != layout[1]:
        lines.append(f"layout {layout[1]} -> {layout[0]} (resharded on load)")
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
    dims = ("pp", "dp_replicate", "dp_shard", "tp")
    return " ".join(f"{d}={_get(config, 'parallel.' + d)}" for d in dims)
