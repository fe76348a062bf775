"""The training loop: `run(cfg)`.

One optimizer step = `grad_accum` micro-batches, forward and backward each, gradients summed;
then clipping, the optimizer step and the learning rate for the next step. Around it: resume
from the newest complete checkpoint, periodic validation, logging and checkpointing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from trainer import checkpoint, distributed
from trainer.config import Config, ConfigError, load_config, to_dict
from trainer.data import BatchLoader, build_source, resolve_dataset
from trainer.hf import load_hf
from trainer.loggers import open_sinks
from trainer.metrics import MetricsLogger, peak_memory_gib, peak_tflops, perplexity
from trainer.model import GPT, flops_per_token
from trainer.optim import build_optimizer, lr_at
from trainer.parallel import ParallelModel, build_layout, check_layout, parallelize
from trainer.preemption import StopOnSignal

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


def find_resume_point(cfg: Config) -> Path | None:
    """The checkpoint to resume from, per `resume=auto|none|PATH`."""
    if cfg.resume == "none":
        if checkpoint.latest(cfg.run.dir) is not None:
            raise ConfigError(
                f"resume=none but run.dir={cfg.run.dir} already holds checkpoints: "
                "use resume=auto to continue it, or another run.dir"
            )
        return None
    if cfg.resume == "auto":
        return checkpoint.latest(cfg.run.dir)
    return checkpoint.resolve(cfg.resume)


def check_same_model(cfg: Config, saved: dict[str, Any], path: Path) -> None:
    """A checkpoint continues only with the same model shape and the same tokenizer."""
    saved_model = saved["config"]["model"]
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if saved_model[key] != getattr(cfg.model, key):
            raise ConfigError(
                f"model.{key}={getattr(cfg.model, key)} but checkpoint {path} has "
                f"{saved_model[key]}: resume with the same model"
            )
    saved_data = saved["config"]["data"]
    saved_tok = (saved_data["tokenizer"], saved_data.get("tokenizer_hash"))
    if saved_tok != (cfg.data.tokenizer, cfg.data.tokenizer_hash):
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} (hash {cfg.data.tokenizer_hash}) but checkpoint "
            f"{path} was trained with {saved_tok[0]} (hash {saved_tok[1]}): the token ids differ"
        )


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


def run(
    cfg: Config | Mapping[str, Any], stop_requested: Callable[[int], bool] | None = None
) -> RunResult:
    """Train as `cfg` says; resume first when a checkpoint applies. Returns what happened.

    Runs as one process or as one rank of a `torchrun` job (the layout comes from
    `cfg.parallel`). After every optimizer step the ranks agree whether to stop: on SIGUSR1, SIGUSR2
    or SIGTERM (a scheduler's warning), or when `stop_requested(step)` returns True on any rank,
    every rank saves a checkpoint and returns.
    """
    cfg = load_config(cfg, world_size=distributed.world_from_env().size)
    check_layout(cfg)
    world, device = distributed.init(cfg.device)
    manifest = resolve_dataset(cfg)
    t = cfg.train
    run_dir = Path(cfg.run.dir)
    resume_from = find_resume_point(cfg)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(cfg)))

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

    step, elapsed_before, restarts, logger_ids = 0, 0.0, 0, {}
    if resume_from is not None:
        check_same_model(cfg, checkpoint.read_trainer_state(resume_from), resume_from)
        loading = time.perf_counter()
        saved = checkpoint.load(resume_from, pm.module, optimizer)
        load_s = time.perf_counter() - loading
        step, elapsed_before = saved["step"], saved["elapsed_s"]
        restarts = saved.get("restarts", 0) + 1
        logger_ids = saved.get("logger_ids", {})
        loader.load_state_dict(saved["data"])
        if saved["grad_scaler"] and scaler.is_enabled():
            scaler.load_state_dict(saved["grad_scaler"])

    sinks = []
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
        f"run {run_dir} | model {n_params / 1e6:.2f}M params | {world.size} x {device.type} | "
        f"mesh pp={p.pp} dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp} | "
        f"precision {cfg.precision} | {tokens_per_step:,} tokens/step | "
        + (
            f"resumed from {resume_from} at step {step} (loaded in {load_s:.2f} s)"
            if resume_from
            else "fresh start"
        )
    )
    result = RunResult(run_dir, step, resume_from)
    # A trained tokenizer travels inside every checkpoint, so generation needs nothing else.
    tokenizer_file = manifest and manifest["tokenizer"]["file"]
    extra = [Path(cfg.data.path) / tokenizer_file] if tokenizer_file else []
    start_time = window_start = time.perf_counter()
    window_steps = 0

    pending: checkpoint.PendingSave | None = None
    save_started = 0.0

    def finish_pending_save() -> None:
        nonlocal pending
        if pending is not None:
            result.last_checkpoint = pending.wait()
            took = time.perf_counter() - save_started  # async: includes the steps meanwhile
            how = "async, complete" if cfg.checkpoint.async_save else "written in"
            log.print(f"checkpoint saved: {result.last_checkpoint} ({how} {took:.2f} s)")
            pending = None

    def save() -> None:
        nonlocal pending, save_started
        finish_pending_save()  # one checkpoint in flight at a time
        save_started = time.perf_counter()
        state = {
            "step": step,
            "data": loader.state_dict(),
            "grad_scaler": scaler.state_dict(),
            "elapsed_s": elapsed_before + time.perf_counter() - start_time,
            "config": to_dict(cfg),
            "world_size": world.size,
            "restarts": restarts,
            "logger_ids": logger_ids,
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
    signals = StopOnSignal()  # preemption warning / SIGTERM: checkpoint, then return
    pm.module.train()
    while step < t.max_steps:
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_and_count, grad_norm = train_step(pm, optimizer, scaler, loader, cfg, device, timer)
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
            now = time.perf_counter()  # after the collectives: the window's work is done
            step_time = (now - window_start) / window_steps
            memory = memory_per_rank(pm.module, optimizer, device)
            record |= {
                "tokens_per_s": tokens_per_step / step_time,
                "tokens_per_s_per_device": tokens_per_step / step_time / world.size,
                "mfu": flops_per_step / step_time / world.size / (peak * 1e12) if peak else None,
                **memory,
                "tokens": step * tokens_per_step,
                "elapsed_s": elapsed_before + now - start_time,
                # where a step's time went (averages over the window, this rank's view)
                "time_step_s": step_time,
                "time_data_s": timer["data"] / window_steps,
                "time_optimizer_s": timer["optimizer"] / window_steps,
                "time_checkpoint_s": timer["checkpoint"] / window_steps,
                "restarts": restarts,
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
            stop = distributed.broadcast_flag(stop, device)  # every rank stops at the same step
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
    signals.restore()
    result.step = step
    loader.close()
    log.close()
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
