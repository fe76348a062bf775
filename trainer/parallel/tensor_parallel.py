"""Tensor parallelism (Megatron-style) with DTensor: each layer's matrices split across ranks.

In every block (GPT-2's plan; each architecture states its own, `trainer/models/<arch>/`):

    attention: q, k, v  ColwiseParallel  -> each rank computes n_head / tp heads
               o_proj   RowwiseParallel  -> partial sums, all-reduced into the full output
    MLP:       fc       ColwiseParallel  -> each rank computes 4*d / tp hidden units
               proj     RowwiseParallel  -> all-reduce

So one all-reduce after attention and one after the MLP per block in forward; in backward
the gradient of each column-parallel layer's input is all-reduced too (q, k and v are separate
layers, so four per block). Embeddings, LayerNorms and the (tied) output layer stay replicated: every rank
computes them in full, and their gradients come out identical on every rank.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from trainer.models.spec import ModelSpec


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, spec: ModelSpec) -> nn.Module:
    """Each block split as its architecture's plan says (`spec.tp_block_plan`)."""
    plan = spec.tp_block_plan(model.cfg)
    for block in getattr(model, spec.layers).values():
        parallelize_module(block, tp_mesh, plan)
    return model
