"""AdamW with GPT-2's weight-decay split, and the learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import TrainConfig, wsd_decay_steps
from trainer.parallel.mesh import by_layout
from trainer.parallel.zero1 import local_optimizer, shard_optimizer


def build_optimizer(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    shard_over: dist.ProcessGroup | None = None,
) -> torch.optim.Optimizer:
    """AdamW, weight decay on matrices (linear weights, embeddings), none on biases and norms.

    Fused AdamW on CUDA (one kernel for all parameters of a group), foreach elsewhere (one op
    per group instead of one per parameter): both need each group to hold one kind of tensor,
    so :func:`param_groups` splits the groups by layout. `shard_over`: ZeRO-1, the AdamW state
    split over these ranks (trainer/parallel/zero1.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups([p for p in params if p.dim() >= 2], cfg.weight_decay)
    groups += param_groups([p for p in params if p.dim() < 2], 0.0)
    implementation = implementation_for(device)
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **implementation)
    if shard_over is not None:
        optimizer = shard_optimizer(groups, shard_over, **adamw)
    else:
        optimizer = torch.optim.AdamW(groups, **adamw)
    keep_implementation(local_optimizer(optimizer), implementation)
    return optimizer


def implementation_for(device: torch.device) -> dict[str, bool]:
    """AdamW's kernels on `device`: fused on CUDA, foreach elsewhere."""
    fused = device.type == "cuda"
    return {"fused": fused, "foreach": not fused}


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """`params` as AdamW groups of one kind each: the plain tensors, and the DTensors of each
    (mesh, placements) (FSDP shards, TP's column/row shards and replicated layers). Foreach and
    fused kernels take a list of tensors of one kind: a DTensor next to a plain tensor fails."""
    return [{"params": group, "weight_decay": weight_decay} for group in by_layout(params).values()]


def keep_implementation(optimizer: torch.optim.Optimizer, implementation: dict) -> None:
    """Keep this machine's AdamW kernels after loading a checkpoint: an optimizer state dict
    carries each group's `fused`/`foreach` flags, and one written on another device (or by an
    older version) would otherwise switch them (fused on a CPU, or back to the slow loop)."""

    def restore(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group.update(implementation)

    optimizer.register_load_state_dict_post_hook(restore)


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
