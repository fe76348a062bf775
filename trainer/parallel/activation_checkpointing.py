"""Activation checkpointing, applied from outside the model: each repeated block keeps only
its input in the forward pass and recomputes its activations during the backward pass
(memory for compute: roughly one extra forward per step).

The block's `forward` is wrapped in place, so parameter names (and checkpoints) are unchanged.
Generation (a KV cache) and evaluation (no gradients) run the plain forward.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(blocks: nn.ModuleDict) -> None:
    for block in blocks.values():
        block.forward = _checkpointed(block, block.forward)


def _checkpointed(block: nn.Module, forward):
    @functools.wraps(forward)
    def run(x: torch.Tensor, cache=None, docs=None):
        if cache is None and block.training and torch.is_grad_enabled():
            return checkpoint(forward, x, None, docs, use_reentrant=False)
        return forward(x, cache, docs)

    return run
