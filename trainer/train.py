"""The training loop: `run(cfg)`.

One optimizer step = `grad_accum` micro-batches, forward and backward each, gradients summed;
then clipping, the optimizer step and the learning rate for the next step. Around it: resume
from the newest complete checkpoint, periodic validation, logging and checkpointing.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from data_prep.shards import DatasetError
from trainer import checkpoint, distributed, resume
from trainer import run_dir as run_files
from trainer.config import Config, ConfigError, load_config, to_dict
from trainer.data import BatchLoader, build_source, resolve_dataset
from trainer.errors import TrainingError
from trainer.hf import check_hf_folder, load_hf
from trainer.loggers import open_sinks
from trainer.metrics import MetricsLogger, log_line, peak_memory_gib, peak_tflops, perplexity
from trainer.model import GPT, flops_per_token
from trainer.optim import build_optimizer, lr_at
from trainer.parallel import ParallelModel, build_layout, check_layout, parallelize
from trainer.preemption import StopOnSignal
from trainer.run_dir import RunDirError, RunDirLock

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunResult:
    run_dir: Path
    step: int  # optimizer steps completed
    resumed_from: Path | None
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss
    last_checkpoint: Path | None = None
    stopped_early: str | None = None  # why the run returned before max_steps


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 compute with fp32 master weights; fp32 runs without autocast."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[cfg.precision])


def build_model(cfg: Config, device: torch.device) -> GPT:
    """The whole model, identically initialised on every rank (same seed)."""
    torch.manual_seed(cfg.train.seed)
    model = load_hf(cfg.model.init_from, cfg.model) if cfg.model.init_from else GPT(cfg.model)
    return model.to(device)


@torch.no_grad()
def evaluate(pm: ParallelModel, cfg: Config, device: torch.device) -> float:
    """Mean loss over the first `eval.steps` validation batches (the same ones every time)."""
    loader = BatchLoader(
        build_source(cfg, "val"),
        cfg.train.micro_batch_size,
        pm.layout.dp_rank,
        cfg.parallel.dp_size,
    )
    pm.module.eval()
    total = torch.zeros(2, device=device)  # (sum of losses, number of losses)
    for _ in range(cfg.eval.steps):
        x, y = (t.to(device) for t in loader.next_batch())
        loss = pm.eval_loss(x, y, autocast(cfg, device))
        if loss is not None:
            total += torch.stack([loss.float(), torch.ones((), device=device)])
    pm.module.train()
    loss_sum, count = distributed.all_reduce_sum(total).tolist()
    return loss_sum / count


def train_step(
    pm: ParallelModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: BatchLoader,
    cfg: Config,
    device: torch.device,
    timer: dict[str, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over `grad_accum` micro-batches; adds the time spent waiting for
    data to `timer["data"]`.

    Returns (this rank's summed micro-batch losses and how many there were, grad norm)."""
    t = cfg.train
    loss_and_count = torch.zeros(2, device=device)
    for micro in range(t.grad_accum):
        waited = time.perf_counter()
        x, y = (b.to(device, non_blocking=True) for b in loader.next_batch())
        timer["data"] += time.perf_counter() - waited
        # Gradients are synchronised across data-parallel ranks on the last micro-batch only.
        loss = pm.forward_backward(x, y, micro == t.grad_accum - 1, scaler, autocast(cfg, device))
        if loss is not None:
            loss_and_count += torch.stack([loss.float(), torch.ones((), device=device)])
    stepping = time.perf_counter()
    scaler.unscale_(optimizer)  # fp16: clip the true gradients, not the scaled ones
    pm.after_backward()
    grad_norm = pm.clip_grad_norm(t.grad_clip if t.grad_clip > 0 else float("inf"))
    scaler.step(optimizer)  # fp16: skipped when gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    timer["optimizer"] += time.perf_counter() - stepping
    return loss_and_count, grad_norm


@dataclass
class Start:
    """Where the run starts: step 0, or a checkpoint's state."""

    step: int = 0
    path: Path | None = None
    elapsed_s: float = 0.0
    restarts: int = 0
    logger_ids: dict[str, Any] = field(default_factory=dict)
    origin: str | None = None  # the resume=PATH this run's checkpoints descend from


def choose_start(cfg: Config, note: Callable[[str], None]) -> tuple[Start, dict[str, Any] | None]:
    """The checkpoint this run continues (collective), compared with the config; returns the
    start and the checkpoint's trainer state. What was skipped or moved goes to `note` at once
    (before a refusal can end the run)."""
    choice = resume.choose(cfg)
    for line in choice.notes:
        note(line)
    start = Start(origin=choice.origin)
    if choice.path is None:
        return start, None
    saved = checkpoint.read_trainer_state(choice.path)
    changes = resume.compare(cfg, saved, choice.path, explicit=cfg.resume not in ("auto", "none"))
    if changes:
        note("resuming with changes: " + "; ".join(changes))
    moved = resume.set_aside(choice, cfg.run.dir)  # only once the resume is accepted
    if moved:
        note(moved)
    start.origin = choice.origin or saved.get("origin")
    start.step, start.path = saved["step"], choice.path
    start.elapsed_s, start.restarts = saved["elapsed_s"], saved.get("restarts", 0) + 1
    start.logger_ids = saved.get("logger_ids", {})
    return start, saved


def check_inputs(cfg: Config) -> None:
    """What would otherwise fail only once the run has started (the starting weights) or at
    its first evaluation, after the work is done (the validation split)."""
    if cfg.model.init_from:
        check_hf_folder(cfg.model.init_from, cfg.model)
    if cfg.eval.interval > 0:
        try:
            build_source(cfg, "val")
        except (DatasetError, ConfigError) as err:
            raise ConfigError(
                f"eval.interval={cfg.eval.interval}: {err} (eval.interval=0 trains without "
                "validation)"
            ) from None


def finite_or_stop(
    non_finite: torch.Tensor, module: torch.nn.Module, step: int, last_saved: Path | None
) -> None:
    """Raise :class:`TrainingError` on every rank if any rank saw a non-finite loss since the
    last call, or holds a non-finite weight: such a state must never become a checkpoint."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]
    weights_ok = torch.stack([torch.isfinite(p).all() for p in local]).all()
    bad = torch.stack([non_finite, ~weights_ok.to(non_finite.device)]).any().float().reshape(1)
    if distributed.all_reduce_max(bad).item() > 0:
        raise TrainingError(
            f"the loss or the weights are no longer finite at step {step} (too high a train.lr? "
            f"a model.layer_norm_eps <= 0?): stopped without writing a checkpoint from it; the "
            f"last good one is {last_saved or 'none'}"
        )
    non_finite.zero_()


class RunHooks:
    """What a launcher hears from :func:`run` on every rank (jobs/train.py keeps `jobs.jsonl`
    and the SLURM log lines with it); the defaults do nothing."""

    def locked(self) -> None:
        """This trainer now owns the run directory (its records are ours to write)."""

    def started(self, checkpoint: Path | None, step: int) -> None:
        """The start point is known: fresh (None, 0) or a checkpoint and its step."""


def run(
    cfg: Config | Mapping[str, Any],
    stop_requested: Callable[[int], bool] | None = None,
    hooks: RunHooks | None = None,
) -> RunResult:
    """Train as `cfg` says; resume first when a checkpoint applies. Returns what happened.

    Runs as one process or as one rank of a `torchrun` job (the layout comes from
    `cfg.parallel`). The run directory is locked while it runs. After every optimizer step the
    ranks agree whether to stop: on SIGINT (Ctrl-C), SIGUSR1, SIGUSR2 or SIGTERM (a scheduler's
    warning), or when `stop_requested(step)` returns True on any rank, every rank saves a
    checkpoint and returns. `hooks` hears when the run directory is ours and where the run
    starts.
    """
    cfg = load_config(cfg, world_size=distributed.world_from_env().size)
    check_layout(cfg)
    world, device = distributed.init(cfg.device, cfg.train.cpu_threads)
    manifest = resolve_dataset(cfg)
    check_inputs(cfg)
    run_dir = Path(cfg.run.dir)
    hooks = hooks or RunHooks()
    lock = run_dir_lock(run_dir, world)
    try:
        hooks.locked()
        return _run(cfg, world, device, manifest, run_dir, stop_requested, hooks)
    finally:
        lock.release()


def run_dir_lock(run_dir: Path, world: distributed.World) -> RunDirLock:
    """Rank 0 locks the run directory; every rank gets the same answer, so a refused job ends
    on every rank with the same one line."""
    lock = RunDirLock(run_dir)
    refusal = None
    if world.is_main:
        try:
            lock.acquire()
        except (RunDirError, OSError) as err:
            refusal = err
    refusals = distributed.all_gather_objects(str(refusal) if refusal else None)
    if refusal is not None:
        raise refusal
    if refusals[0] is not None:
        raise RunDirError(refusals[0])
    return lock


def _run(
    cfg: Config,
    world: distributed.World,
    device: torch.device,
    manifest: dict[str, Any] | None,
    run_dir: Path,
    stop_requested: Callable[[int], bool] | None,
    hooks: RunHooks,
) -> RunResult:
    t = cfg.train

    def note(text: str) -> None:
        if world.is_main:
            log_line(run_dir, text)

    start, saved = choose_start(cfg, note)
    hooks.started(start.path, start.step)
    if start.step >= t.max_steps:
        note(
            f"run.dir {run_dir} is already complete: step {start.step} of "
            f"train.max_steps={t.max_steps} ({start.path}); nothing to do (raise "
            "train.max_steps to train further, or use another run.dir)"
        )
        return RunResult(run_dir, start.step, start.path, last_checkpoint=start.path)
    if world.is_main:  # a read-only or full disk shows now, not at the first checkpoint
        run_files.check_writable(run_dir / run_files.CHECKPOINTS)
        (run_dir / run_files.CONFIG).write_text(OmegaConf.to_yaml(to_dict(cfg)))

    layout = build_layout(cfg, device.type, world.size)
    full_model = build_model(cfg, device)
    n_params = full_model.num_params()
    pm = parallelize(full_model, cfg, layout, device)
    optimizer = build_optimizer(
        pm.module, t, device, foreach=False if cfg.parallel.tp > 1 else None
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    loader = BatchLoader(
        build_source(cfg, "train"),
        t.micro_batch_size,
        layout.dp_rank,
        cfg.parallel.dp_size,
        prefetch=2,
        pin_memory=device.type == "cuda",
    )

    step, load_s = start.step, 0.0
    if saved is not None:
        loading = time.perf_counter()
        checkpoint.load(start.path, pm.module, optimizer, checked=True)
        load_s = time.perf_counter() - loading
        loader.load_state_dict(saved["data"])
        if saved["grad_scaler"] and scaler.is_enabled():
            scaler.load_state_dict(saved["grad_scaler"])

    sinks, logger_ids = [], start.logger_ids
    if world.is_main:  # only rank 0 writes; the ids go into every checkpoint
        sinks, logger_ids = open_sinks(cfg, run_dir, step, logger_ids)
    log = MetricsLogger(run_dir, t.max_steps, step, world.is_main, cfg.log.progress, sinks=sinks)
    tokens_per_step = (
        t.micro_batch_size * t.grad_accum * cfg.parallel.dp_size * cfg.model.block_size
    )
    flops_per_step = flops_per_token(cfg.model, n_params) * tokens_per_step
    peak = peak_tflops(device, cfg.log.peak_tflops)
    p = cfg.parallel
    log.print(
        f"run {run_dir} | model {n_params / 1e6:.2f}M params | {world.size} x {device.type}"
        + (f" ({torch.get_num_threads()} threads each)" if device.type == "cpu" else "")
        + f" | mesh pp={p.pp} dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp} | "
        f"precision {cfg.precision} | {tokens_per_step:,} tokens/step | "
        + (
            f"resumed from {start.path} at step {step} (loaded in {load_s:.2f} s)"
            if start.path
            else "fresh start"
        )
    )
    result = RunResult(run_dir, step, start.path, last_checkpoint=start.path)
    # A trained tokenizer travels inside every checkpoint, so generation needs nothing else.
    tokenizer_file = manifest and manifest["tokenizer"]["file"]
    extra = [Path(cfg.data.path) / tokenizer_file] if tokenizer_file else []
    start_time = window_start = time.perf_counter()
    window_steps = 0
    non_finite = torch.zeros((), dtype=torch.bool, device=device)  # since the last check

    pending: checkpoint.PendingSave | None = None
    save_started = 0.0

    def finish_pending_save() -> None:
        nonlocal pending
        if pending is not None:
            result.last_checkpoint = pending.wait()
            took = time.perf_counter() - save_started  # async: includes the steps meanwhile
            if pending.already_saved:
                log.print(f"checkpoint {result.last_checkpoint} is already on disk (kept as is)")
            else:
                how = "async, complete" if cfg.checkpoint.async_save else "written in"
                log.print(f"checkpoint saved: {result.last_checkpoint} ({how} {took:.2f} s)")
            pending = None

    def save() -> None:
        nonlocal pending, save_started
        finish_pending_save()  # one checkpoint in flight at a time
        finite_or_stop(non_finite, pm.module, step, result.last_checkpoint)
        save_started = time.perf_counter()
        state = {
            "step": step,
            "data": loader.state_dict(),
            "grad_scaler": scaler.state_dict(),
            "elapsed_s": start.elapsed_s + time.perf_counter() - start_time,
            "config": to_dict(cfg),
            "world_size": world.size,
            "restarts": start.restarts,
            "logger_ids": logger_ids,
            "origin": start.origin,
            "torch_version": torch.__version__,
        }
        pending = checkpoint.start_save(
            run_dir,
            step,
            pm.module,
            optimizer,
            state,
            cfg.checkpoint.keep,
            extra,
            asynchronous=cfg.checkpoint.async_save,
        )
        if not cfg.checkpoint.async_save:
            finish_pending_save()

    timer = {"data": 0.0, "optimizer": 0.0, "checkpoint": 0.0}  # seconds in this log window
    signals = StopOnSignal()  # Ctrl-C, preemption warning, SIGTERM: checkpoint, then return
    pm.module.train()
    try:
        while step < t.max_steps:
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_and_count, grad_norm = train_step(
                pm, optimizer, scaler, loader, cfg, device, timer
            )
            non_finite |= ~torch.isfinite(loss_and_count[0])
            step += 1
            window_steps += 1
            log.advance()

            last = step == t.max_steps
            eval_due = cfg.eval.interval > 0 and (step % cfg.eval.interval == 0 or last)
            if step % cfg.log.interval == 0 or last or eval_due:
                loss_sum, count = distributed.all_reduce_sum(loss_and_count).tolist()
                record = {
                    "step": step,
                    "loss": loss_sum / count,
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                }
                if not math.isfinite(record["loss"]):
                    finish_pending_save()  # a checkpoint in flight was checked when it began
                    finite_or_stop(non_finite, pm.module, step, result.last_checkpoint)
                now = time.perf_counter()  # after the collectives: the window's work is done
                step_time = (now - window_start) / window_steps
                memory = memory_per_rank(pm.module, optimizer, device)
                record |= {
                    "tokens_per_s": tokens_per_step / step_time,
                    "tokens_per_s_per_device": tokens_per_step / step_time / world.size,
                    "mfu": flops_per_step / step_time / world.size / (peak * 1e12)
                    if peak
                    else None,
                    **memory,
                    "tokens": step * tokens_per_step,
                    "elapsed_s": start.elapsed_s + now - start_time,
                    # where a step's time went (averages over the window, this rank's view)
                    "time_step_s": step_time,
                    "time_data_s": timer["data"] / window_steps,
                    "time_optimizer_s": timer["optimizer"] / window_steps,
                    "time_checkpoint_s": timer["checkpoint"] / window_steps,
                    "restarts": start.restarts,
                }
                result.losses[step] = record["loss"]
                if eval_due:
                    record["val_loss"] = evaluate(pm, cfg, device)
                    record["val_ppl"] = perplexity(record["val_loss"])
                log.log(record)
                window_start, window_steps = time.perf_counter(), 0
                timer = dict.fromkeys(timer, 0.0)

            stop = signals(step) or (stop_requested is not None and stop_requested(step))
            if world.size > 1:
                stop = distributed.broadcast_flag(stop, device)  # every rank stops together
            if last or stop or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0):
                saving = time.perf_counter()
                save()  # the training stall; with async_save only the copy to CPU memory
                timer["checkpoint"] += time.perf_counter() - saving
            if stop:
                received = signals.received or getattr(stop_requested, "received", None)
                why = f"signal {received.name}" if received else "stop requested"
                result.stopped_early = why
                log.print(f"stopping at step {step} ({why}); run again to resume from here")
                break
        finish_pending_save()
    finally:
        signals.restore()
        loader.close()
        log.close()
    result.step = step
    return result


def memory_per_rank(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict[str, float]:
    """Peak device memory and the bytes of parameters + gradients + optimizer state held by
    this rank during a step (sharded tensors count only their local shard); max over ranks."""

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(module.parameters())
    state = sum(local_bytes(p) for p in params)
    # Gradients (freed by zero_grad before we get here) are as large as their parameters.
    state += sum(local_bytes(p) for p in params if p.requires_grad)
    state += sum(
        local_bytes(v)
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )
    per_rank = distributed.all_gather_floats([peak_memory_gib(device), state / 2**30], device)
    return {
        "memory_gib": max(r[0] for r in per_rank),
        "state_gib": max(r[1] for r in per_rank),
        "memory_gib_per_device": [round(r[0], 4) for r in per_rank],
    }
