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

Two extensions (docs/tensor_parallel.md):

- sequence parallel (`parallel.sequence_parallel`): between the TP regions, i.e. in the
  norms, dropouts and residual adds, each rank holds only T / tp positions of the sequence.
  Each all-reduce becomes a reduce-scatter (into sequence shards) followed, at the next TP
  region's entry, by an all-gather: the same bytes on the wire, 1/tp of those activations.
- loss parallel (`parallel.loss_parallel`): the output layer is split by vocabulary and its
  logits are never gathered (each rank holds V / tp of them); the cross-entropy reduces a
  max and a sum per token across ranks. The token embedding is split by vocabulary too.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

from trainer.models.spec import ModelSpec


def apply_tp(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    spec: ModelSpec,
    sequence_parallel: bool = False,
    loss_parallel: bool = False,
) -> nn.Module:
    """Each block split as its architecture's plan says (`spec.tp_block_plan`), the layers
    around them as `spec.tp_model_plan` says (only a pipeline stage's own parts)."""
    plan = spec.tp_block_plan(model.cfg, sequence_parallel)
    for block in getattr(model, spec.layers).values():
        parallelize_module(block, tp_mesh, plan)
    around = spec.tp_model_plan(model.cfg, sequence_parallel, loss_parallel)
    around = {name: style for name, style in around.items() if getattr(model, name) is not None}
    if around:
        parallelize_module(model, tp_mesh, around)
    retie(model, spec)
    return model


def retie(model: nn.Module, spec: ModelSpec) -> None:
    """Parallelizing replaces each weight by a new DTensor parameter, so a tied pair becomes
    two: point the output layer at the embedding's again (under loss parallel both are the
    same Shard(0) over vocabulary rows, so one tensor serves both)."""
    if not spec.tied(model.cfg):
        return
    embedding, output = getattr(model, spec.embedding), getattr(model, spec.output)
    if embedding is not None and output is not None and output.weight is not embedding.weight:
        output.weight = embedding.weight


def loss_context(enabled: bool) -> contextlib.AbstractContextManager:
    """Around forward and backward under loss parallel: DTensor's cross-entropy over
    vocabulary shards (its backward needs the context too); otherwise nothing."""
    return loss_parallel() if enabled else contextlib.nullcontext()
