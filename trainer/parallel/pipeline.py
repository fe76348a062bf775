"""Pipeline parallelism: consecutive blocks on different ranks, micro-batches flowing through.

The model is cut into `pp x pp_virtual_stages` stages of consecutive blocks. The first stage
holds the embeddings, the last one the final norm and the output layer. Each step's batch is
cut into `pp_microbatches` micro-batches; activations travel forward stage to stage
(send/recv) and gradients travel back. `pp_schedule` picks the order of the work:

    gpipe:            all forwards, then all backwards     (activations of every micro-batch)
    1f1b:             after a warm-up, one forward, one backward   (~pp micro-batches)
    interleaved_1f1b: 1F1B over V stages per rank, "looped": rank r runs stages r, r+pp, ...
                      (the bubble shrinks V times; V times more sends)
    zero_bubble:      interleaved (or one stage per rank), with each backward split into the
                      input gradient (needed by the previous stage now) and the weight
                      gradient (any time later: it fills the bubble)

The idle "bubble" is about (pp - 1) / (microbatches + pp - 1) of the step with one stage per
rank, V times less when interleaved (docs/pipeline_parallel.md measures it).

A tied output layer (GPT-2's; optional for Llama) shares the token embedding's weight, but the
first stage (rank 0) and the last (rank pp-1, also when looped) live on different ranks. Each
keeps its own copy (equal at the start); after every backward their gradients are summed
across the two ranks, so both copies take identical steps.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from trainer.config import SINGLE_STAGE_SCHEDULES
from trainer.models.loss import lm_loss
from trainer.models.spec import ModelSpec

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}


def rank_stages(pp: int, virtual: int, pp_rank: int) -> list[int]:
    """The stages `pp_rank` runs, in order, "looped": r, r+pp, r+2pp, ... (so the first stage
    is on rank 0 and the last on rank pp-1, whatever `virtual` is)."""
    return [pp_rank + k * pp for k in range(virtual)]


def stage_blocks(n_layer: int, n_stages: int, stage: int) -> list[str]:
    """Names of the blocks of `stage`: an even split, earlier stages taking the remainder."""
    per, extra = divmod(n_layer, n_stages)
    start = stage * per + min(stage, extra)
    return [str(i) for i in range(start, start + per + (stage < extra))]


def split_model(model: nn.Module, n_stages: int, stages: list[int], spec: ModelSpec) -> nn.Module:
    """`model` cut down, in place, to what `stages` run (one rank's part): no copy, so a
    model on the meta device stays there and the rank later allocates only its part.
    Parameter names are unchanged, so its state dict holds the full model's names for
    checkpoints."""
    part = model
    keep = {b for s in stages for b in stage_blocks(model.cfg.n_layer, n_stages, s)}
    blocks = getattr(part, spec.layers)
    for name in list(blocks):
        if name not in keep:
            del blocks[name]
    dropped = (spec.first_stage if 0 not in stages else ()) + (
        spec.last_stage if n_stages - 1 not in stages else ()
    )
    for name in dropped:
        setattr(part, name, None)
    return part


def stage_view(part: nn.Module, n_stages: int, stage: int, spec: ModelSpec) -> nn.Module:
    """One stage of a rank's `part` as a module of its own: the same model class and forward,
    seeing only that stage's blocks (and embeddings / output layer if it is the first / last).
    It shares the part's submodules, so training a view trains the part."""
    view = copy.copy(part)  # a shallow copy: same submodules ...
    view._modules = dict(part._modules)  # ... in a table of its own
    blocks = getattr(part, spec.layers)
    setattr(
        view,
        spec.layers,
        nn.ModuleDict({b: blocks[b] for b in stage_blocks(part.cfg.n_layer, n_stages, stage)}),
    )
    dropped = (spec.first_stage if stage != 0 else ()) + (
        spec.last_stage if stage != n_stages - 1 else ()
    )
    for name in dropped:
        setattr(view, name, None)
    return view


def build_schedule(
    stage_modules: list[nn.Module],
    stages: list[int],
    n_stages: int,
    pp_mesh: DeviceMesh,
    device: torch.device,
    microbatches: int,
    schedule: str,
    grad_accum: int,
    z_loss: float,
    z_record: list[torch.Tensor],
):
    """The schedule of this rank's stages (`stage_modules[i]` runs stage `stages[i]` of
    `n_stages`). With z-loss on, the last stage's loss function appends each training
    micro-batch's (cross-entropy, z term), divided like the loss, to `z_record`: the
    schedule itself keeps only what backward saw, their sum. Evaluation (no grad) adds no z."""
    pipeline_stages = [
        PipelineStage(module, index, n_stages, device, group=pp_mesh.get_group())
        for module, index in zip(stage_modules, stages, strict=True)
    ]

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        terms = lm_loss(logits, targets, z_loss if torch.is_grad_enabled() else 0.0)
        # Gradients become a mean over every micro-batch of the step, as one big batch's would.
        # (Not the schedule's scale_grads: it rescales all of .grad after each schedule step,
        # including what earlier accumulation steps left there.)
        divisor = microbatches * grad_accum
        if terms.z is None:
            return terms.ce / divisor
        ce, z = terms.ce / divisor, terms.z / divisor
        z_record.append(torch.stack([ce, z]).detach())
        return ce + z_loss * z

    if schedule in SINGLE_STAGE_SCHEDULES:
        (only,) = pipeline_stages
        return SCHEDULES[schedule](only, microbatches, loss_fn=loss_fn, scale_grads=False)
    return SCHEDULES[schedule](pipeline_stages, microbatches, loss_fn=loss_fn, scale_grads=False)


def tied_weight_group(mesh: DeviceMesh) -> dist.ProcessGroup | None:
    """The group of this rank's first and last pipeline stage (for the tied embedding)."""
    grid = mesh.mesh  # ranks, shaped (pp, dp_replicate, dp_shard, tp)
    mine = None
    for column in grid.flatten(1).t().tolist():  # one column per (replicate, shard, tp)
        group = dist.new_group([column[0], column[-1]])  # every rank creates every group
        if dist.get_rank() in (column[0], column[-1]):
            mine = group
    return mine


def tied_weight(stage_module: nn.Module, spec: ModelSpec) -> nn.Parameter | None:
    """This stage's copy of the tied embedding / output weight (None on the middle stages)."""
    for name in (spec.embedding, spec.output):
        if getattr(stage_module, name) is not None:
            return getattr(stage_module, name).weight
    return None


def sync_tied_grads(
    stage_module: nn.Module, group: dist.ProcessGroup | None, spec: ModelSpec
) -> None:
    """Sum the tied embedding's gradient over the first and last stage."""
    weight = tied_weight(stage_module, spec)
    if group is None or weight is None or weight.grad is None:
        return
    grad = weight.grad
    local = grad.to_local() if hasattr(grad, "to_local") else grad
    dist.all_reduce(local, group=group)
