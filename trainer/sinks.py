"""Where metrics go besides the console and metrics.jsonl: TensorBoard and Weights & Biases.

Only global rank 0 creates sinks. Both continue across restarts: TensorBoard writes into the
same `<run>/tensorboard/` folder and purges anything logged after the resumed step (so a
reader sees one series, no duplicated steps); W&B reuses the run id stored in the checkpoint
(`resume="allow"`), so a requeued job continues the same run instead of starting a new one.
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path
from typing import Any, Protocol

from trainer.config import Config, to_dict
from trainer.run_dir import TENSORBOARD

NUMERIC = (int, float)


class Sink(Protocol):
    def log(self, record: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def flat(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested values as `key/sub` scalars (e.g. tokens_per_source/web), as TensorBoard groups
    them."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


class TensorBoardSink:
    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at or after it (from an attempt that died before checkpointing)
        # are dropped by TensorBoard's reader, so the resumed series continues without repeats.
        self.writer = SummaryWriter(
            log_dir=str(run_dir / TENSORBOARD), purge_step=start_step + 1 if start_step else None
        )

    def log(self, record: dict[str, Any], step: int) -> None:
        for key, value in flat(record).items():
            if key != "step" and isinstance(value, NUMERIC) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None):
        import wandb

        w = cfg.log.wandb
        self.run = wandb.init(
            project=w.project,
            entity=w.entity,
            group=w.group,
            tags=list(w.tags),
            name=w.name or cfg.run.name,
            id=run_id,
            resume="allow",
            mode=w.mode,
            dir=str(run_dir),
            config=to_dict(cfg),
        )
        self.id = self.run.id

    def log(self, record: dict[str, Any], step: int) -> None:
        values = {k: v for k, v in record.items() if k != "step" and v is not None}
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def new_wandb_id() -> str:
    """A W&B run id (8 lowercase letters/digits), made here so it can be stored up front."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def open_sinks(
    cfg: Config, run_dir: Path, start_step: int, saved_ids: dict[str, str]
) -> tuple[list[Sink], dict[str, str]]:
    """The configured sinks, and the ids to store in checkpoints (to continue them later)."""
    sinks: list[Sink] = []
    ids = dict(saved_ids)
    if cfg.log.tensorboard:
        sinks.append(TensorBoardSink(run_dir, start_step))
    if cfg.log.wandb.mode != "disabled":
        ids.setdefault("wandb", new_wandb_id())
        sinks.append(WandbSink(cfg, run_dir, ids["wandb"]))
    return sinks, ids
