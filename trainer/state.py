"""The run's own counters, saved with every checkpoint and restored on resume.

Like the data loader, the gradient scaler and the model + optimizer, :class:`TrainState` is a
`Stateful` (`state_dict` / `load_state_dict`): the checkpoint manager (`trainer.checkpoint.
Checkpointer`) saves and restores every registered part the same way, so adding a part is
one line where the parts are registered, not a key added by hand in a save and a load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful

from trainer.checkpoint_files import FORMAT_VERSION


@dataclass
class TrainState(Stateful):
    """Where the run is; `elapsed_s` and `tokens` add up over every attempt of the run."""

    step: int = 0  # optimizer steps done
    tokens: int | None = 0  # training tokens seen (None: not recorded by the checkpoint)
    elapsed_s: float = 0.0  # training time before this attempt
    restarts: int = 0  # how often the run was resumed
    logger_ids: dict[str, Any] = field(default_factory=dict)  # e.g. the W&B run id
    origin: str | None = None  # the resume=PATH this run's checkpoints descend from
    format_version: int = FORMAT_VERSION  # of the checkpoint this state was read from

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed_s,
            "restarts": self.restarts,
            "logger_ids": self.logger_ids,
            "origin": self.origin,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's state; this attempt is one more restart. (`format_version` was
        checked when the file was read: another version is refused there.)"""
        self.step = state["step"]
        self.tokens = state.get("tokens")  # None in checkpoints of older versions
        self.elapsed_s = state["elapsed_s"]
        self.restarts = state.get("restarts", 0) + 1
        self.logger_ids = state.get("logger_ids", {})
        # This run's own resume=PATH comes first: a requeue must recognise its checkpoints.
        self.origin = self.origin or state.get("origin")
        self.format_version = state.get("format_version", FORMAT_VERSION)
