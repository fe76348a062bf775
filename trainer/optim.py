"""AdamW with GPT-2's weight-decay split, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import TrainConfig, wsd_decay_steps
from trainer.parallel.zero1 import shard_optimizer


def build_optimizer(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    foreach: bool | None = None,
    shard_over: dist.ProcessGroup | None = None,
) -> torch.optim.Optimizer:
    """Weight decay on matrices (linear weights, embeddings); none on biases and LayerNorms.

    `foreach=False` is needed under tensor parallelism, where sharded (DTensor) and replicated
    (plain) parameters sit in the same group. `shard_over`: ZeRO-1, the AdamW state split over
    these ranks (trainer/parallel/zero1.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    adamw = dict(
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda" and foreach is None,
        foreach=foreach,
    )
    if shard_over is not None:
        return shard_optimizer(groups, shard_over, **adamw)
    return torch.optim.AdamW(groups, **adamw)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of update `step + 1` (`step` updates done): `train.lr_schedule`.

    Every schedule starts with a linear warmup to `lr` over `warmup_steps`; then

        cosine    cosine decay to `min_lr`, reached at `max_steps`
        wsd       warmup-stable-decay: `lr` until the last `decay_fraction` of `max_steps`,
                  then `decay_shape` (linear or 1-sqrt) down to `min_lr`, reached at `max_steps`
        constant  `lr` to the end

    A pure function of the step, so the schedule's whole state is the step counter.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":
        return wsd_lr(step, cfg)
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def wsd_lr(step: int, cfg: TrainConfig) -> float:
    """After the warmup: stable at `lr`, then the decay over the last `wsd_decay_steps`.

    The stable phase does not depend on when it ends, so a run can be extended (a larger
    max_steps on resume) while it is stable, and decays can branch off any stable checkpoint
    (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    Durations"; MiniCPM)."""
    decay = wsd_decay_steps(cfg)
    decay_start = cfg.max_steps - decay
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / decay)
    remaining = 1.0 - progress if cfg.decay_shape == "linear" else 1.0 - math.sqrt(progress)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * remaining
