"""Parallelism as small functions applied to one model on one device mesh.

`parallelize()` applies, in this order, whatever the `parallel` config asks for:

    pipeline split (pp) -> tensor parallel (tp) -> activation checkpointing -> compile
    -> FSDP2 (dp_shard, with dp_replicate: HSDP) -> storage and values
    -> DDP (dp_replicate only)

(the model is built on the meta device: it gets storage only once it is split and sharded,
each rank for the stage and the shards it holds, trainer/models/init.py)
    (context parallel (cp) changes no module: each micro-batch runs on this rank's tokens)

and returns a :class:`ParallelModel`: the training loop calls `forward_backward` per
micro-batch and `clip_grad_norm`, whatever the layout. See docs/parallelism.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.config import Config, ConfigError
from trainer.models import spec_of
from trainer.models.init import on_meta
from trainer.models.loss import LossTerms
from trainer.models.spec import ModelSpec
from trainer.parallel.activation_checkpointing import apply_activation_checkpointing
from trainer.parallel.compile import apply_compile, compile_head, head_compiled
from trainer.parallel.context_parallel import ContextParallel
from trainer.parallel.ddp import apply_ddp, set_ddp_sync, static_graph_valid
from trainer.parallel.fsdp import apply_fsdp, set_fsdp_sync
from trainer.parallel.mesh import Layout, build_layout, by_layout, fsdp_mesh
from trainer.parallel.pipeline import (
    build_schedule,
    rank_stages,
    split_model,
    stage_view,
    sync_tied_grads,
    tied_weight,
    tied_weight_group,
)
from trainer.parallel.tensor_parallel import apply_tp, loss_context

__all__ = ["Layout", "ParallelModel", "build_layout", "parallelize"]


@dataclass
class ParallelModel:
    """The model as this rank holds it, and how to run a micro-batch through it."""

    module: nn.Module  # what the optimizer and checkpoints see (no DDP wrapper)
    layout: Layout
    wrapped: nn.Module  # what forward runs (DDP-wrapped, or the same module)
    spec: ModelSpec | None = None  # the architecture (where its parts are)
    schedule: object | None = None  # pipeline schedule (pp > 1)
    tied_group: dist.ProcessGroup | None = None  # pp > 1 with a tied output layer
    runs_first_stage: bool = True  # pp > 1: this rank runs the first / the last stage
    runs_last_stage: bool = True
    grad_accum: int = 1  # losses are divided by it, so accumulated gradients are a mean
    pp_microbatches: int = 1
    set_sync: Callable[[bool], None] = field(default=lambda sync: None)
    z_loss: float = 0.0  # train.z_loss: the weight of the z term in the training loss
    z_record: list[torch.Tensor] = field(default_factory=list)  # pp: (ce, z) per micro-batch
    cp: ContextParallel | None = None  # cp > 1: each sequence split over the cp group
    loss_parallel: bool = False  # parallel.loss_parallel: the loss runs in its context

    def forward_backward(self, x, y, sync: bool, scaler, autocast) -> LossTerms | None:
        """One micro-batch: forward, backward, gradients accumulate. Returns the mean loss
        terms (cross-entropy, z term when z-loss is on) on ranks that compute them (all but
        the non-last pipeline stages), else None.

        `sync=False` skips the gradient all-reduce / reduce-scatter (accumulation steps)."""
        self.set_sync(sync)
        if self.schedule is None:
            x, y, sequence = self._local_tokens(x, y)
            # around backward too: activation checkpointing recomputes there, and the sharded
            # logits' loss needs its context for its gradient
            with sequence, loss_context(self.loss_parallel):
                with autocast:
                    terms = self.wrapped(x, y, z_loss=self.z_loss)
                scaler.scale(terms.objective(self.z_loss) / self.grad_accum).backward()
            return LossTerms(*(t if t is None else t.detach() for t in terms))
        losses: list[torch.Tensor] = []
        self.z_record.clear()
        with autocast:
            self._run_pipeline(x, y, losses, train=True)
        if not losses:
            return None
        if self.z_loss == 0:
            return LossTerms(torch.stack(losses).mean().detach() * self.loss_divisor, None)
        # The last pp_microbatches calls: on its first step a schedule also calls the loss
        # function once on placeholder tensors (inferring the backward's shapes).
        ce, z = torch.stack(self.z_record[-self.pp_microbatches :]).mean(0) * self.loss_divisor
        return LossTerms(ce, z)

    @torch.no_grad()
    def eval_loss(self, x, y, autocast) -> torch.Tensor | None:
        if self.schedule is None:
            x, y, sequence = self._local_tokens(x, y)
            with sequence, loss_context(self.loss_parallel), autocast:
                return self.wrapped(x, y).detach()
        losses: list[torch.Tensor] = []
        with autocast:
            self._run_pipeline(x, y, losses, train=False)
        return torch.stack(losses).mean() * self.loss_divisor if losses else None

    def _local_tokens(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, contextlib.AbstractContextManager]:
        """The tokens this rank computes, and the context to run them in: under context
        parallel its part of every sequence (the loss is then the mean over its tokens, and
        the mean of those over the cp group is the whole sequence's)."""
        if self.cp is None:
            return x, y, contextlib.nullcontext()
        local_x, local_y = self.cp.split(x, y)
        return local_x, local_y, self.cp.running(x.size(1), x.device)

    @property
    def loss_divisor(self) -> float:
        """What the pipeline's loss function divided each micro-batch loss by."""
        return self.pp_microbatches * self.grad_accum

    def _run_pipeline(self, x, y, losses: list, train: bool) -> None:
        run = self.schedule.step if train else self.schedule.eval
        args = (x,) if self.runs_first_stage else ()
        target = y if self.runs_last_stage else None
        run(*args, target=target, losses=losses)

    def after_backward(self) -> None:
        """Work between the last backward and the optimizer step (tied-weight gradients)."""
        if self.tied_group is not None:
            sync_tied_grads(self.module, self.tied_group, self.spec)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the *whole* model's gradient, whichever rank holds which part;
        returns that norm. `max_norm=inf`: clipping off, only the norm (it is logged, and
        trainer/stability.py skips non-finite updates by it)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if self.tied_group is not None and not self.runs_first_stage:
            # The last stage's copy of the tied weight was counted on the first stage already.
            tied = tied_weight(self.module, self.spec)
            counted = [g for g in grads if tied is None or g is not tied.grad]
        else:
            counted = grads
        pp = self.layout.mesh["pp"] if self.layout.mesh is not None else None
        total = grad_norm(counted, pp.get_group() if pp is not None and pp.size() > 1 else None)
        if math.isfinite(max_norm):
            scale_grads(grads, max_norm, total)
        return total


def grad_norm(grads: list[torch.Tensor], pp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """The 2-norm of all `grads` of the model (fp32, on their device, no host sync).

    Foreach norms, one kernel per group rather than per parameter: plain tensors (single,
    DDP, TP's replicated layers) in one group; DTensors (FSDP/TP shards) in one group per
    (mesh, placements), whose norm DTensor reduces across the shards. Pipeline stages hold
    different parameters: their squared norms are summed over the pp group."""
    sharded = by_layout(grads)
    plain = sharded.pop(None, [])
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), device=device)
    if plain:
        squares = squares + torch.nn.utils.get_total_norm(plain).float() ** 2
    for group in sharded.values():
        norm = torch.nn.utils.get_total_norm(group, foreach=True)
        squares = squares + norm.full_tensor().float() ** 2
    if pp_group is not None:
        dist.all_reduce(squares, group=pp_group)
    return squares.sqrt()


def scale_grads(grads: list[torch.Tensor], max_norm: float, total: torch.Tensor) -> None:
    """Multiply every gradient by min(1, max_norm / total) in place: each rank scales its own
    pieces (a DTensor's local shard), with one foreach kernel per device and dtype."""
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for g in local:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), group in by_kind.items():
        torch._foreach_mul_(group, coef.to(device))


def parallelize(
    model: nn.Module,
    cfg: Config,
    layout: Layout,
    device: torch.device,
    materialize: Callable[[nn.Module], None] | None = None,
) -> ParallelModel:
    """Apply the configured parallelism to `model` for this rank; where its parts are comes
    from its architecture's spec (`trainer/models/`). `model` is changed in place.

    A model on the meta device (trainer/models/init.py) is split and sharded there and then
    given storage by `materialize(part)`, after FSDP2 (so each rank allocates its shards
    only) and before DDP (which broadcasts real tensors). A model already on `device` needs
    no `materialize`."""
    if materialize is None and on_meta(model):
        raise ValueError("parallelize: a model on the meta device needs `materialize`")
    p, t = cfg.parallel, cfg.train
    spec = spec_of(cfg.model)
    mesh = layout.mesh
    pipelined = mesh is not None and p.pp > 1
    if pipelined:
        n_stages = p.pp * p.pp_virtual_stages
        stages = rank_stages(p.pp, p.pp_virtual_stages, layout.pp_rank)
        model = split_model(model, n_stages, stages, spec)
    if mesh is not None and p.tp > 1:
        apply_tp(model, mesh["tp"], spec, p.sequence_parallel, p.loss_parallel)
    blocks = getattr(model, spec.layers)
    if t.activation_checkpointing:
        apply_activation_checkpointing(blocks)
    if t.compile:
        apply_compile(blocks)
    if head_compiled(cfg):
        compile_head(model)
    wrapped: nn.Module = model
    set_sync: Callable[[bool], None] = lambda sync: None  # noqa: E731
    if p.fsdp_cpu_offload and device.type != "cuda":
        raise ConfigError("parallel.fsdp_cpu_offload=true needs GPUs: it offloads GPU memory")
    if mesh is not None and p.dp_shard * p.cp > 1:  # cp: FSDP over dp_shard x cp
        dp_mesh = fsdp_mesh(mesh, p)
        param_dtype = torch.bfloat16 if cfg.precision == "bf16" else None
        apply_fsdp(
            model, blocks, dp_mesh, p.fsdp_reshard_after_forward, param_dtype, p.fsdp_cpu_offload
        )
        set_sync = lambda sync: set_fsdp_sync(model, sync)  # noqa: E731
    if materialize is not None:
        materialize(model)  # storage for what this rank holds, then its values
    if mesh is not None and p.dp_shard * p.cp == 1 and p.dp_replicate > 1:
        static = static_graph_valid(t.grad_accum, t.compile)
        wrapped = apply_ddp(model, mesh["dp_replicate"], p.ddp_bucket_mb, static)
        set_sync = lambda sync: set_ddp_sync(wrapped, sync)  # noqa: E731
    result = ParallelModel(
        model,
        layout,
        wrapped,
        spec=spec,
        grad_accum=t.grad_accum,
        pp_microbatches=p.pp_microbatches,
        set_sync=set_sync,
        z_loss=t.z_loss,
        cp=ContextParallel(mesh["cp"]) if mesh is not None and p.cp > 1 else None,
        loss_parallel=p.loss_parallel,
    )
    if pipelined:
        add_pipeline(result, cfg, stages, n_stages, device)
    return result


def add_pipeline(
    pm: ParallelModel, cfg: Config, stages: list[int], n_stages: int, device: torch.device
) -> None:
    """The pipeline schedule of this rank's `stages` and, for a tied output layer, the group
    that sums the gradients of its two copies."""
    p, t, mesh = cfg.parallel, cfg.train, pm.layout.mesh
    # One stage: the (wrapped) part itself; several: one view of the part per stage.
    modules = (
        [pm.wrapped]
        if len(stages) == 1
        else [stage_view(pm.module, n_stages, s, pm.spec) for s in stages]
    )
    pm.schedule = build_schedule(
        modules,
        stages,
        n_stages,
        mesh["pp"],
        device,
        p.pp_microbatches,
        p.pp_schedule,
        t.grad_accum,
        t.z_loss,
        pm.z_record,
    )
    pm.runs_first_stage, pm.runs_last_stage = 0 in stages, n_stages - 1 in stages
    if pm.spec.tied(cfg.model):
        pm.tied_group = tied_weight_group(mesh)
