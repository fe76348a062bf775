"""The device mesh: every rank's place in the (pp, dp_replicate, dp_shard, tp) grid.

    world size = pp x dp_replicate x dp_shard x tp

Ranks that differ only in `tp` hold different slices of the same layers and see the same data;
ranks that differ in `dp_*` see different data; ranks that differ in `pp` hold different
layers. The innermost dimension (tp) gets neighbouring ranks, i.e. the fastest links on a node.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import Config, ConfigError

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


def check_layout(cfg: Config) -> None:
    """Layouts that cannot work, as one-line errors, before anything is built."""
    p, m = cfg.parallel, cfg.model
    if m.n_head % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide model.n_head={m.n_head}")
    if (4 * m.n_embd) % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide the MLP width 4*model.n_embd")
    if p.pp > m.n_layer:
        raise ConfigError(f"parallel.pp={p.pp} is larger than model.n_layer={m.n_layer}")
    if p.pp > 1 and p.pp_microbatches < p.pp:
        raise ConfigError(
            f"parallel.pp_microbatches={p.pp_microbatches} must be at least parallel.pp={p.pp}"
        )
    if p.pp > 1 and cfg.train.micro_batch_size % p.pp_microbatches:
        raise ConfigError(
            f"parallel.pp_microbatches={p.pp_microbatches} must divide "
            f"train.micro_batch_size={cfg.train.micro_batch_size}"
        )
    if p.tp > 1 and p.dp_replicate > 1 and p.dp_shard == 1:
        raise ConfigError(
            "parallel: tensor parallel with plain DDP (dp_replicate>1, dp_shard=1) is not "
            "supported; shard instead (dp_shard>1, i.e. FSDP or HSDP)"
        )
    if p.pp > 1 and p.dp_replicate > 1 and p.dp_shard == 1:
        raise ConfigError(
            "parallel: pipeline parallel with plain DDP (dp_replicate>1, dp_shard=1) is not "
            "supported; use dp_shard (FSDP) for the data-parallel part"
        )
    sharded = p.dp_shard > 1 or p.tp > 1 or p.pp > 1
    if cfg.precision == "fp16" and sharded:
        raise ConfigError("precision=fp16 works with single/DDP layouts only; use bf16")
    if cfg.train.compile and p.pp > 1:
        raise ConfigError("train.compile=true is not supported with pipeline parallel (pp>1)")


def build_layout(cfg: Config, device_type: str, world_size: int) -> Layout:
    if world_size == 1:
        return Layout(None)
    p = cfg.parallel
    mesh = init_device_mesh(
        device_type, (p.pp, p.dp_replicate, p.dp_shard, p.tp), mesh_dim_names=DIMS
    )
    pp, rep, shard, tp = mesh.get_coordinate()
    return Layout(mesh, pp_rank=pp, dp_rank=rep * p.dp_shard + shard, tp_rank=tp)
