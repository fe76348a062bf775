"""`torch.compile` per transformer block (as torchtitan does), under any layout.

Each block of `blocks` is compiled in place (`block.compile()`): parameter names and the
module tree stay as they are, so checkpoints, FSDP2 units and optimizer state see the same
model as eagerly. It runs after the pipeline split, tensor parallelism and activation
checkpointing, and before FSDP2 / DDP wrap the blocks; what the compiled graph holds then
depends on the layout:

- DDP: only the block's compute. The gradient all-reduce runs in DDP's autograd hooks,
  outside the graph, bucket by bucket as eagerly (no DDPOptimizer or compiled autograd: the
  DDP module itself is never compiled).
- FSDP2 (full shard, ZeRO-2 style, HSDP): dynamo compiles the block's `forward`; FSDP's
  hooks around it (all-gather before, reshard after, reduce-scatter in backward) run eagerly.
- TP: the DTensor input/output hooks of `parallelize_module` are traced into the graph, so the
  block's all-reduces are graph nodes (functional collectives), not graph breaks.
- PP: each stage compiles the blocks it kept; the schedule's send/recv stay outside.
- Activation checkpointing: `torch.utils.checkpoint` inside a compiled block is traced as one
  region whose forward is recomputed in the backward.

Blocks share one graph (same code, parameters are graph inputs); evaluation (no grad) compiles
a second one. See docs/parallelism.md ("Compile under every layout").

`train.compile_loss` compiles the output head too: the model's `head_loss` (final norm,
output layer, fp32 cross-entropy and z-loss, or the chunked loss; trainer/models/head.py) is
replaced on the instance by `torch.compile(head_loss, fullgraph=True)`, so a graph break in it
fails loudly instead of silently running half of it eagerly. It runs inside the model's
forward, where FSDP2's root unit has gathered the output weight (the root's hooks stay
outside, as the blocks' do). It stays eager, by design, where the head holds DTensors whose
layout hooks and `loss_parallel()` context were not tested compiled (TP's sequence parallel
and loss parallel), and under pipeline parallel, whose schedule calls the loss on the logits
the last stage returns (`head_compiled` says which).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import Config
from trainer.models.head import head_loss


def apply_compile(blocks: nn.ModuleDict) -> None:
    for block in blocks.values():
        block.compile()  # in place: parameter names stay the same


def head_compiled(cfg: Config) -> bool:
    """Whether `train.compile_loss` compiles the head in this layout (see the module doc)."""
    t, p = cfg.train, cfg.parallel
    eager_layout = p.pp > 1 or p.loss_parallel or p.sequence_parallel
    return t.compile and t.compile_loss and not eager_layout


def compile_head(model: nn.Module) -> None:
    """The model's final norm + output layer + loss as one compiled graph (its instance's
    `head_loss`; the class keeps the eager one).

    With compilation switched off for the process (`TORCH_COMPILE_DISABLE=1`, a debugging
    switch) the head stays eager like the blocks: a `fullgraph=True` function that dynamo may
    not trace raises instead of running eagerly."""
    if torch._dynamo.config.disable:
        return
    model.head_loss = torch.compile(head_loss, fullgraph=True)
