"""DistributedDataParallel: every rank holds the whole model and sees different data.

After backward each gradient is averaged across the data-parallel ranks by an all-reduce,
started bucket by bucket while backward is still running (communication overlaps compute).
Memory per rank: the full parameters, gradients and optimizer state.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, bucket_mb: int) -> DistributedDataParallel:
    return DistributedDataParallel(
        model,
        process_group=dp_mesh.get_group(),
        bucket_cap_mb=bucket_mb,
        # A tied output weight is used twice per step; that is fine for DDP. GPT-2 has no
        # buffers; Llama's rotary tables are buffers, identical on every rank, which DDP's
        # default buffer broadcast re-sends before each forward (small; left at the default).
    )


def set_ddp_sync(model: DistributedDataParallel, sync: bool) -> None:
    """Skip the all-reduce on all but the last micro-batch of an accumulated step (what
    `no_sync()` does, without a context manager around forward and backward)."""
    model.require_backward_grad_sync = sync
