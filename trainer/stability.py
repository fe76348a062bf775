"""Skipping bad updates: a step whose loss or gradient norm is not finite (always), or spikes
far above its recent values (`train.skip_spike_factor`), does not change the model.

A skipped step still counts: the step counter advances and its batch is consumed (so a resume
stays exact), its gradients are dropped and the optimizer state is left as it was (AdamW's
moments and step count too). The decision uses values that are the same on every rank (the
loss averaged over all ranks, the gradient norm of the whole model), so every rank skips the
same steps. :class:`UpdateGuard` is `Stateful`: its rolling statistics are in every
checkpoint, so a resumed run skips exactly the steps the uninterrupted run would.

Cost: deciding needs the step's loss and gradient norm on the host, one small all-reduce and
one device-to-host sync per step (fp16's GradScaler pays the same sync for its overflow check).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from trainer import distributed
from trainer.config import TrainConfig
from trainer.errors import TrainingError


@dataclass(frozen=True)
class Skip:
    """Why the update of `step` (1-based: the step being taken) was skipped."""

    step: int
    what: str  # "loss" or "grad norm"
    value: float
    threshold: float | None  # None: the value is not finite

    def describe(self) -> str:
        if self.threshold is None:
            return f"step {self.step}: update skipped: {self.what} {self.value} is not finite"
        return (
            f"step {self.step}: update skipped: {self.what} {self.value:.4g} > threshold "
            f"{self.threshold:.4g} (train.skip_spike_factor x rolling mean)"
        )


def global_loss_and_norm(
    loss_and_count: torch.Tensor, grad_norm: torch.Tensor, world_size: int
) -> tuple[float, float]:
    """The step's loss averaged over every rank and the gradient norm, identical on every rank
    (one all-reduce; `.tolist()` is the host sync). The norm is already global; averaging it
    over the ranks makes it bitwise the same everywhere.

    Deliberately the one host sync of a step: skipping a bad update must be decided before the
    optimizer runs, on every rank alike. What it costs on a GPU: the CPU waits for the whole
    forward/backward (and this tiny NCCL all-reduce) to finish before it queues the optimizer
    step, so the GPU idles while the optimizer's and the next forward's first kernels are
    launched (tens of microseconds to a few milliseconds a step; less under CUDA graphs)."""
    sums = torch.stack([loss_and_count[0], loss_and_count[1], grad_norm.float() / world_size])
    loss_sum, count, norm = distributed.all_reduce_sum(sums).tolist()
    return loss_sum / count, norm


class UpdateGuard(Stateful):
    """Judges each step before the optimizer applies it; keeps the rolling statistics.

    Spike skipping (a factor above 1; 0 is off) compares the loss and the gradient norm with
    `factor` times their mean over the last `window` accepted steps, once `window` steps have
    been accepted (until then nothing is known about what is normal). Skipped steps do not
    enter the mean.
    Under fp16 a non-finite gradient norm is the GradScaler's to handle (it skips the step
    and lowers the scale), so only a non-finite loss counts there.
    """

    def __init__(self, cfg: TrainConfig, fp16: bool):
        self.factor = cfg.skip_spike_factor  # 0: only non-finite steps are skipped
        self.max_consecutive = cfg.max_consecutive_skips
        self.fp16 = fp16
        self.losses: deque[float] = deque(maxlen=cfg.skip_spike_window)
        self.norms: deque[float] = deque(maxlen=cfg.skip_spike_window)
        self.consecutive = 0  # skipped steps in a row, up to the last step
        self.skipped = 0  # skipped steps of the whole run
        self.streak_start: int | None = None  # the first step of the current run of skips

    def judge(self, step: int, loss: float, grad_norm: float) -> Skip | None:
        """The verdict on update `step`: a :class:`Skip`, or None to apply it."""
        skip = self._reason(step, loss, grad_norm)
        if skip is None:
            self.consecutive, self.streak_start = 0, None
            if math.isfinite(grad_norm):  # fp16 overflow steps: the scaler's, not normal
                self.losses.append(loss)
                self.norms.append(grad_norm)
        else:
            self.consecutive += 1
            self.skipped += 1
            self.streak_start = self.streak_start or step
        return skip

    def _reason(self, step: int, loss: float, grad_norm: float) -> Skip | None:
        if not math.isfinite(loss):
            return Skip(step, "loss", loss, None)
        if not math.isfinite(grad_norm):  # fp16: the scaler skips it (an overflow)
            return None if self.fp16 else Skip(step, "grad norm", grad_norm, None)
        if self.factor == 0 or len(self.losses) < (self.losses.maxlen or 0):
            return None
        for what, value, history in (
            ("loss", loss, self.losses),
            ("grad norm", grad_norm, self.norms),
        ):
            threshold = self.factor * sum(history) / len(history)
            if value > threshold:
                return Skip(step, what, value, threshold)
        return None

    @property
    def gave_up(self) -> bool:
        """True after `max_consecutive_skips` skipped steps in a row: the run cannot recover."""
        return self.consecutive >= self.max_consecutive

    def stop_error(self, skip: Skip, last_saved: Path | None) -> TrainingError:
        """The one-line error once `gave_up`: the streak, its last skip, the last checkpoint."""
        over = "" if skip.threshold is None else f" > {skip.threshold:.4g}"
        return TrainingError(
            f"{self.consecutive} updates in a row skipped (train.max_consecutive_skips="
            f"{self.max_consecutive}; steps {self.streak_start}-{skip.step}, the last: "
            f"{skip.what} {skip.value:.4g}{over}; too high a train.lr?): stopped without writing "
            f"a checkpoint from it; the last good one is {last_saved or 'none'} (the weights "
            f"since step {(self.streak_start or 1) - 1} are unchanged)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses),
            "norms": list(self.norms),
            "consecutive": self.consecutive,
            "skipped": self.skipped,
            "streak_start": self.streak_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's statistics (a changed window keeps the newest values that fit)."""
        self.losses.clear()
        self.losses.extend(state["losses"])
        self.norms.clear()
        self.norms.extend(state["norms"])
        self.consecutive = state["consecutive"]
        self.skipped = state["skipped"]
        self.streak_start = state["streak_start"]
