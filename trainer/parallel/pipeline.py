"""Pipeline parallelism: consecutive blocks on different ranks, micro-batches flowing through.

Stage 0 holds the embeddings and the first blocks, the last stage the last blocks, the final
LayerNorm and the output layer. Each step's batch is cut into `pp_microbatches` micro-batches;
activations travel forward stage to stage (send/recv) and gradients travel back:

    GPipe: all forwards, then all backwards        (activation memory: every micro-batch)
    1F1B:  after a warm-up, one forward, one backward (activation memory: ~pp micro-batches)

The idle "bubble" is about (pp - 1) / (microbatches + pp - 1) of the step.

A tied output layer (GPT-2's; optional for Llama) shares the token embedding's weight, but
the two now live on the first and the last stage. Each keeps its own copy (equal at the start); after every backward their
gradients are summed across the two stages, so both copies take identical steps.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from trainer.models.loss import lm_loss
from trainer.models.spec import ModelSpec

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_blocks(n_layer: int, pp: int, stage: int) -> list[str]:
    """Names of the blocks of `stage`: an even split, earlier stages taking the remainder."""
    per, extra = divmod(n_layer, pp)
    start = stage * per + min(stage, extra)
    return [str(i) for i in range(start, start + per + (stage < extra))]


def split_model(model: nn.Module, pp: int, stage: int, spec: ModelSpec) -> nn.Module:
    """A copy of `model` with only what `stage` runs; parameter names are unchanged."""
    part = copy.deepcopy(model)
    keep = set(stage_blocks(model.cfg.n_layer, pp, stage))
    blocks = getattr(part, spec.layers)
    for name in list(blocks):
        if name not in keep:
            del blocks[name]
    dropped = (spec.first_stage if stage != 0 else ()) + (
        spec.last_stage if stage != pp - 1 else ()
    )
    for name in dropped:
        setattr(part, name, None)
    return part


def build_schedule(
    stage_module: nn.Module,
    pp_mesh: DeviceMesh,
    device: torch.device,
    microbatches: int,
    schedule: str,
    grad_accum: int,
    z_loss: float,
    z_record: list[torch.Tensor],
):
    """The schedule of this stage. With z-loss on, the last stage's loss function appends each
    training micro-batch's (cross-entropy, z term), divided like the loss, to `z_record`: the
    schedule itself keeps only what backward saw, their sum. Evaluation (no grad) adds no z."""
    stage = PipelineStage(
        stage_module, pp_mesh.get_local_rank(), pp_mesh.size(), device, group=pp_mesh.get_group()
    )

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

    return SCHEDULES[schedule](stage, microbatches, loss_fn=loss_fn, scale_grads=False)


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
