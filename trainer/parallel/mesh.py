"""The device mesh: every rank's place in the (pp, dp_replicate, dp_shard, tp) grid.

    world size = pp x dp_replicate x dp_shard x tp

Ranks that differ only in `tp` hold different slices of the same layers and see the same data;
ranks that differ in `dp_*` see different data; ranks that differ in `pp` hold different
layers. The innermost dimension (tp) gets neighbouring ranks, i.e. the fastest links on a node.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import Config

DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Layout:
    """This rank's coordinates and the mesh (None in a world of one)."""

    mesh: DeviceMesh | None
    pp_rank: int = 0
    dp_rank: int = 0
    tp_rank: int = 0

    @property
    def is_last_stage(self) -> bool:
        return self.mesh is None or self.pp_rank == self.mesh["pp"].size() - 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0


def build_layout(cfg: Config, device_type: str, world_size: int) -> Layout:
    if world_size == 1:
        return Layout(None)
    p = cfg.parallel
    mesh = init_device_mesh(
        device_type, (p.pp, p.dp_replicate, p.dp_shard, p.tp), mesh_dim_names=DIMS
    )
    pp, rep, shard, tp = mesh.get_coordinate()
    return Layout(mesh, pp_rank=pp, dp_rank=rep * p.dp_shard + shard, tp_rank=tp)
