"""ZeRO-1: DDP with the optimizer state sharded over the data-parallel ranks.

Every rank still holds the whole model and its whole gradient (DDP all-reduces it), but each
rank keeps AdamW's moments only for its own share of the parameters and updates only those:

    backward      all-reduce of the gradients (DDP, bucketed, overlapping backward)  2N values
    clip          the global gradient norm: every rank has every gradient, no communication
    step          each rank runs AdamW on its own parameters only
    sync          each parameter is broadcast from the rank that updated it           N values

Memory per rank (fp32, AdamW): 4N params + 4N grads + 8N/dp optimizer state, against 16N for
DDP. The pieces are PyTorch's: `ZeroRedundancyOptimizer` assigns whole parameters to ranks
(sorted-greedy, largest first, so the shares are close to N/dp but not exact) and wraps a
local AdamW over this rank's share.

Checkpoints: ZeroRedundancyOptimizer's own `state_dict()` gathers everything on one rank. We
do not use it. The local AdamW is a plain optimizer over some of the model's parameters, so
`get_state_dict(model, local_optimizer(...))` keys its state by parameter name like any other
layout; each rank writes the entries of its own parameters (disjoint keys, as pipeline stages
do), and on load each rank asks DCP for the entries of its own share, whichever layout wrote
them. That is what lets a ZeRO-1 checkpoint resume on one process or under FSDP, and back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from trainer.config import ParallelConfig
from trainer.parallel.mesh import Layout


def zero1_group(p: ParallelConfig, layout: Layout) -> dist.ProcessGroup | None:
    """The ranks to shard the optimizer state over: the DDP replicas under `parallel.zero1`
    (None: an ordinary optimizer, e.g. in a world of one)."""
    if not p.zero1 or layout.mesh is None or p.dp_replicate == 1:
        return None
    return layout.mesh["dp_replicate"].get_group()


def shard_optimizer(
    groups: list[dict[str, Any]], group: dist.ProcessGroup, **adamw: Any
) -> ZeroRedundancyOptimizer:
    """AdamW over `groups` (weight decay groups kept) with its state split over `group`."""
    return ZeroRedundancyOptimizer(
        groups, optimizer_class=torch.optim.AdamW, process_group=group, **adamw
    )


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer over the parameters this rank updates: what checkpoints and memory
    figures see (under ZeRO-1 this rank's share, else the optimizer itself)."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


# The ZeRO stages as this trainer runs them: stage -> parallel preset (docs/fsdp.md).
STAGE_PRESETS = {"zero1": "zero1", "zero2": "zero2", "zero3": "fsdp"}


def theory_bytes(stage: str, n: int, dp: int) -> dict[str, float]:
    """Bytes per rank in fp32 with AdamW (4 bytes a value, 2 moments) for `n` parameters over
    `dp` ranks, each at its largest during a step: parameters between forward and backward,
    gradients after backward, optimizer state after the step.

        stage    params   grads    optimizer
        zero1    4N       4N       8N/dp
        zero2    4N       4N/dp    8N/dp      (gathered from forward until backward)
        zero3    4N/dp    4N/dp    8N/dp      (+ one block gathered at a time, transient)
    """
    shard = 4 * n / dp
    params = {"zero1": 4 * n, "zero2": 4 * n, "zero3": shard}
    grads = {"zero1": 4 * n, "zero2": shard, "zero3": shard}
    return {"params": params[stage], "grads": grads[stage], "optimizer": 2 * shard}
