"""The device mesh: every rank's place in the (pp, dp_replicate, dp_shard, cp, tp) grid.

    world size = pp x dp_replicate x dp_shard x cp x tp

Ranks that differ only in `tp` hold different slices of the same layers and see the same data;
ranks that differ only in `cp` see the same samples but different parts of each sequence;
ranks that differ in `dp_*` see different data; ranks that differ in `pp` hold different
layers. The innermost dimension (tp) gets neighbouring ranks, i.e. the fastest links on a node
(then cp: it communicates every layer too).

For the parameters, cp ranks are data-parallel ranks (each computes gradients from other
tokens): with cp > 1 FSDP shards them over dp_shard x cp (with dp_shard=1: over cp) and
averages the gradients there, as torchtitan does; DDP is not used with cp.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from trainer.config import Config, ParallelConfig

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
T = TypeVar("T", bound=torch.Tensor)


def by_layout(tensors: Iterable[T]) -> dict[tuple | None, list[T]]:
    """`tensors` grouped by how they are laid out: the plain ones under None, the DTensors
    under their (mesh, placements). Foreach/fused kernels take one kind of tensor per call,
    and DTensor reduces a norm across the shards of one layout at a time."""
    groups: dict[tuple | None, list[T]] = {}
    for t in tensors:
        key = (t.device_mesh, t.placements) if isinstance(t, DTensor) else None
        groups.setdefault(key, []).append(t)
    return groups


@dataclass(frozen=True)
class Layout:
    """This rank's coordinates and the mesh (None in a world of one)."""

    mesh: DeviceMesh | None
    pp_rank: int = 0
    dp_rank: int = 0  # which samples this rank reads (the same on every cp and tp rank)
    tp_rank: int = 0
    cp_rank: int = 0


def build_layout(cfg: Config, device_type: str, world_size: int) -> Layout:
    if world_size == 1:
        return Layout(None)
    p = cfg.parallel
    sizes = (p.pp, p.dp_replicate, p.dp_shard, p.cp, p.tp)
    mesh = init_device_mesh(device_type, sizes, mesh_dim_names=DIMS)
    pp, rep, shard, cp, tp = mesh.get_coordinate()
    return Layout(mesh, pp_rank=pp, dp_rank=rep * p.dp_shard + shard, tp_rank=tp, cp_rank=cp)


def fsdp_mesh(mesh: DeviceMesh, p: ParallelConfig) -> DeviceMesh:
    """What FSDP shards over: dp_shard (x cp), replicated over dp_replicate when > 1 (HSDP)."""
    if p.cp == 1:
        return mesh["dp_replicate", "dp_shard"] if p.dp_replicate > 1 else mesh["dp_shard"]
    flat = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")  # one dimension: dp_shard * cp ranks
    # (HSDP: sliced from the root mesh beside dp_replicate, which torch 2.13 warns about)
    return mesh["dp_replicate", "dp_shard_cp"] if p.dp_replicate > 1 else flat
