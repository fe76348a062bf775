"""AdamW with GPT-2's weight-decay split, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import TrainConfig


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device, foreach: bool | None = None
) -> torch.optim.AdamW:
    """Weight decay on matrices (linear weights, embeddings); none on biases and LayerNorms.

    `foreach=False` is needed under tensor parallelism, where sharded (DTensor) and replicated
    (plain) parameters sit in the same group."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        fused=device.type == "cuda" and foreach is None,
        foreach=foreach,
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`.

    A pure function of the step, so the schedule's whole state is the step counter.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
