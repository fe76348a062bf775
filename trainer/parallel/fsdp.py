"""FSDP2 (`fully_shard`): every parameter is split across the data-parallel ranks.

Each transformer block is one unit: before its forward (and again before its backward) the
block's full parameters are gathered from all ranks (all-gather), used, and freed again; after
its backward the gradients are reduce-scattered so each rank keeps only its shard. The
optimizer then updates only the local shard.

- full shard (ZeRO-3): parameters, gradients and optimizer state all sharded: memory per rank
  ~ (P + G + O) / N, plus one block's full parameters at a time.
- `reshard_after_forward=False` (ZeRO-2 style): blocks stay gathered between forward and
  backward (no second all-gather; more memory). The root unit (embeddings, final norm,
  output layer) always stays gathered: backward needs it first.
- hybrid (HSDP): a 2-D mesh: shard within `dp_shard` (e.g. a node), replicate across
  `dp_replicate` (nodes): gradients are reduce-scattered in the node, all-reduced across.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)


def apply_fsdp(
    model: nn.Module,
    blocks: nn.ModuleDict,
    dp_mesh: DeviceMesh,
    reshard_after_forward: bool,
    param_dtype: torch.dtype | None,
    cpu_offload: bool,
) -> nn.Module:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    options = dict(mesh=dp_mesh, mp_policy=mp, offload_policy=offload)
    for block in blocks.values():  # the FSDP units: one per repeated block
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    # The root holds what is left: embeddings, the final norm, the output layer. Its
    # reshard_after_forward is left to fully_shard (None): False for the root, since backward
    # starts with the output layer, right after forward; resharding it would only gather it
    # again at once.
    fully_shard(model, **options)
    return model


def set_fsdp_sync(model: nn.Module, sync: bool) -> None:
    """Accumulate unsharded gradients locally and reduce-scatter only on the last micro-batch."""
    model.set_requires_gradient_sync(sync)
