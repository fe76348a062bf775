"""DistributedDataParallel: every rank holds the whole model and sees different data.

After backward each gradient is averaged across the data-parallel ranks by an all-reduce,
started bucket by bucket while backward is still running (communication overlaps compute).
Memory per rank: the full parameters, gradients and optimizer state.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(
    model: nn.Module, dp_mesh: DeviceMesh, bucket_mb: int, static_graph: bool
) -> DistributedDataParallel:
    """Wrap `model`; `static_graph`: the same parameters are used the same way every step
    (see :func:`static_graph_valid` for when that can be promised)."""
    return DistributedDataParallel(
        model,
        process_group=dp_mesh.get_group(),
        bucket_cap_mb=bucket_mb,
        # The gradients are views into the all-reduce buckets: no copy between the two after
        # every backward, and one gradient-sized buffer less in memory.
        gradient_as_bucket_view=True,
        # A static graph lets DDP record, on the first step, the order in which gradients
        # become ready, and skip its per-step search for unused parameters after that.
        static_graph=static_graph,
        # A tied output weight is used twice per step; that is fine for DDP. GPT-2 has no
        # buffers; Llama's rotary tables are buffers, identical on every rank, which DDP's
        # default buffer broadcast re-sends before each forward (small; left at the default).
    )


def static_graph_valid(grad_accum: int, compiled: bool) -> bool:
    """Whether DDP's `static_graph=True` is safe for this run. Not with gradient accumulation:
    a backward without sync (`no_sync`) breaks its first-step bookkeeping (an internal assert,
    then gradients silently not all-reduced: pytorch/pytorch#143580, fix pending in #187732).
    Not with torch.compile: dynamo's DDPOptimizer (which splits the compiled graph at bucket
    boundaries) does not support it (pytorch/pytorch#109261)."""
    return grad_accum == 1 and not compiled


def set_ddp_sync(model: DistributedDataParallel, sync: bool) -> None:
    """Skip the all-reduce on all but the last micro-batch of an accumulated step (what
    `no_sync()` does, without a context manager around forward and backward)."""
    model.require_backward_grad_sync = sync
