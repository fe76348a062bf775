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
"""

from __future__ import annotations

from torch import nn


def apply_compile(blocks: nn.ModuleDict) -> None:
    for block in blocks.values():
        block.compile()  # in place: parameter names stay the same
