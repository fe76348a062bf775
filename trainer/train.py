"""The training loop: `run(cfg)`.

One optimizer step = `grad_accum` micro-batches, forward and backward each, gradients summed;
then clipping, the optimizer step and the learning rate for the next step. Around it, each
concern has one owner, registered once:

- `trainer.config.resolve_config`: the one validation (run() trusts a Config it gets);
- `trainer.state.TrainState`: the run's counters, a `Stateful` like the loader and the scaler;
- `trainer.checkpoint.Checkpointer`: what is saved where and when, restores every part;
- `trainer.metrics.StepMeter`: throughput, MFU, memory, the record of each log step;
- `trainer.logger.MetricsLogger`: metrics.jsonl, the console, train.log, TensorBoard/W&B;
- `trainer.preemption.StopController`: signals and the ranks' agreement to stop;
- `trainer.stability.UpdateGuard`: which updates are skipped (non-finite, spikes), a `Stateful`.
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

from data_prep.files import write_text_atomic
from data_prep.shards import read_manifest
from trainer import distributed, resume
from trainer import run_dir as run_files
from trainer.checkpoint import Checkpointer, read_trainer_state
from trainer.config import Config, resolve_config, to_dict
from trainer.data import BatchLoader, SampleSource, build_source, has_split, tokenizer_folder
from trainer.errors import TrainingError
from trainer.evals import hellaswag
from trainer.garbage import StepCollector
from trainer.hangs import timeouts_end_the_run
from trainer.hf import hf_values
from trainer.logger import MetricsLogger, log_line
from trainer.metrics import BuildMemory, StepMeter, perplexity
from trainer.mixture import MixtureSource
from trainer.models import build_on_meta, spec_of
from trainer.models.init import Values, materialize, seeded_values
from trainer.optim import build_optimizer, lr_at
from trainer.parallel import Layout, ParallelModel, build_layout, parallelize
from trainer.parallel.zero1 import zero1_group
from trainer.preemption import StopController, StopOnSignal
from trainer.profiling import StepProfiler
from trainer.run_dir import RunDirError, RunDirLock
from trainer.sinks import open_sinks
from trainer.stability import Skip, UpdateGuard, global_loss_and_norm
from trainer.state import TrainState

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunResult:
    run_dir: Path
    step: int  # optimizer steps completed
    resumed_from: Path | None
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss
    last_checkpoint: Path | None = None
    stopped_early: str | None = None  # why the run returned before max_steps


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
    signals: StopOnSignal | None = None,
) -> RunResult:
    """Train as `cfg` says; resume first when a checkpoint applies. Returns what happened.

    Runs as one process or as one rank of a `torchrun` job (the layout comes from
    `cfg.parallel`). A mapping is resolved and validated first; a :class:`Config` is trusted
    (it comes from `resolve_config`). The run directory is locked while it runs. After every
    optimizer step the ranks agree whether to stop: on SIGINT (Ctrl-C), SIGUSR1, SIGUSR2 or
    SIGTERM (a scheduler's warning; `signals`: handlers the launcher installed early), or when
    `stop_requested(step)` returns True on any rank, every rank saves a checkpoint and
    returns. `hooks` hears when the run directory is ours and where the run starts. A
    collective that waits longer than `dist.timeout_s` raises `CollectiveTimeout`.
    """
    if not isinstance(cfg, Config):
        cfg = resolve_config(cfg, world_size=distributed.world_from_env().size)
    world, device = distributed.init(cfg.device, cfg.train.cpu_threads, cfg.dist.timeout_s)
    hooks = hooks or RunHooks()
    lock = run_dir_lock(Path(cfg.run.dir), world)
    try:
        hooks.locked()
        stop = StopController(world.size, stop_requested, signals)
        try:
            with timeouts_end_the_run(cfg.dist.timeout_s, lambda: stop.last_step):
                return train(cfg, world, device, stop, hooks)
        finally:
            stop.close()
    finally:
        lock.release()


def train(
    cfg: Config,
    world: distributed.World,
    device: torch.device,
    stop: StopController,
    hooks: RunHooks,
) -> RunResult:
    """The run once its directory is ours: start point, parts, then the loop."""
    t, run_dir = cfg.train, Path(cfg.run.dir)
    start = choose_start(cfg, lambda text: log_line(run_dir, text) if world.is_main else None)
    hooks.started(start.path, start.step)
    result = RunResult(run_dir, start.step, start.path, last_checkpoint=start.path)
    if start.step >= t.max_steps:
        if world.is_main:
            log_line(run_dir, already_complete(cfg, start))
        return result
    if world.is_main:
        prepare_run_dir(cfg, run_dir)

    questions = hellaswag.examples_for_run(cfg)  # None: eval.hellaswag is off
    parts = build_parts(cfg, world, device, resuming=start.path is not None)
    module, optimizer = parts.pm.module, parts.optimizer
    state = TrainState(origin=start.origin)
    log = MetricsLogger(run_dir, t.max_steps, start.step, world.is_main, cfg.log.progress)
    guard = FiniteGuard(module, device)
    updates = UpdateGuard(t, fp16=cfg.precision == "fp16")
    checkpointer = build_checkpointer(cfg, parts, state, log, guard, updates)
    load_s = checkpointer.restore(start.path, start.saved) if start.path else 0.0
    if world.is_main:  # only rank 0 writes; the ids go into every checkpoint
        log.sinks, state.logger_ids = open_sinks(cfg, run_dir, state.step, state.logger_ids)
    meter = StepMeter(cfg, parts.n_params, device, world.size, state, parts.init_memory_gib)
    log.print(banner(cfg, world, device, parts.n_params, meter, start, load_s))
    if cfg.eval.interval > 0 and parts.val_source is None:
        log.print(f"validation off: {no_validation_split(cfg)}")
    verified = VerifyReport(parts.loader.source)
    profiler = StepProfiler(cfg.profile, run_dir, world.rank, device, state.step, log.print)

    module.train()
    collector = StepCollector()  # no automatic garbage collection inside a step
    try:
        while state.step < t.max_steps:
            lr = lr_at(state.step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            profiler.before(state.step + 1)
            loss_and_count, grad_norm, skip = train_step(
                parts, cfg, device, meter, updates, state.step + 1
            )
            state.step += 1
            profiler.after(state.step)
            if skip is not None:
                log.print(skip.describe())
                if updates.gave_up:
                    checkpointer.finish()  # a checkpoint in flight was checked when it began
                    raise updates.stop_error(skip, checkpointer.last)
            meter.step_done()
            log.advance()

            last = state.step == t.max_steps
            eval_due = cfg.eval.interval > 0 and (state.step % cfg.eval.interval == 0 or last)
            if state.step % cfg.log.interval == 0 or last or eval_due:
                record = meter.record(lr, loss_and_count, grad_norm, module, optimizer)
                record["skipped"] = updates.skipped
                if eval_due and parts.val_source is not None:
                    record["val_loss"] = evaluate(parts.pm, cfg, device, parts.val_source)
                    record["val_ppl"] = perplexity(record["val_loss"])
                if eval_due and questions:
                    record |= evaluate_hellaswag(parts.pm, questions, cfg, device)
                if isinstance(parts.loader.source, MixtureSource):
                    consumed = parts.loader.samples_consumed
                    record["tokens_per_source"] = parts.loader.source.tokens_per_source(consumed)
                result.losses[state.step] = record["loss"]
                log.log(record)
                meter.new_window()
                verified.report(log.print)
                collector.collect()

            stopping = stop(state.step)
            if checkpointer.due(state.step, last, stopping):
                state.elapsed_s = meter.elapsed_s()  # this step's evaluation included
                with meter.timing("checkpoint"):  # the stall; async: only the copy to memory
                    checkpointer.save(state.step)
                collector.collect(full=True)
            if stopping:
                result.stopped_early = stop.reason
                log.print(
                    f"stopping at step {state.step} ({stop.reason}); run again to resume from here"
                )
                break
        checkpointer.finish()
    finally:
        profiler.close()
        collector.restore()
        parts.close()
        log.close()
    result.step, result.last_checkpoint = state.step, checkpointer.last
    return result


# ---------------------------------------------------------------------------- the parts


@dataclass
class TrainingParts:
    """What one rank trains with: the parallelised model, optimizer, scaler and loader."""

    pm: ParallelModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: BatchLoader
    val_source: SampleSource | None  # None: the data has no validation split
    n_params: int  # of the whole model
    init_memory_gib: float = 0.0  # this rank's peak memory of building the model

    def close(self) -> None:
        """Stop the loader's prefetching and the sources' shard verification."""
        self.loader.close()
        for source in (self.loader.source, self.val_source):
            if source is not None:
                source.close()


def initial_values(cfg: Config, model: torch.nn.Module) -> Values:
    """Where a fresh run's weights come from: the Hugging Face folder of `model.init_from`,
    else the architecture's rule, each parameter seeded from (train.seed, its name)."""
    if cfg.model.init_from:
        return hf_values(cfg.model.init_from, cfg.model, model)
    spec = spec_of(cfg.model)
    return seeded_values(lambda name: spec.init_rule(name, cfg.model), cfg.train.seed)


def build_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    """The whole model of `model.arch` on `device`, initialised as every layout initialises
    its part of it (the reference the layouts' parts are slices of)."""
    torch.manual_seed(cfg.train.seed)  # the dropout RNG (the weights do not draw from it)
    model = build_on_meta(cfg.model)
    materialize(model, device, initial_values(cfg, model), spec_of(cfg.model).tied(cfg.model))
    return model


def build_parallel_model(
    cfg: Config, layout: Layout, device: torch.device, resuming: bool = False
) -> tuple[ParallelModel, int, float]:
    """This rank's part of the model, parallelised, with storage only for what it holds.

    Built on meta, split and sharded there, then materialised on `device` and initialised
    (or left for the checkpoint restore to fill: `resuming`). Returns the parallel model,
    the whole model's parameter count and the peak memory of the build in GiB
    (:class:`trainer.metrics.BuildMemory`)."""
    torch.manual_seed(cfg.train.seed)  # the dropout RNG (the weights do not draw from it)
    # FSDP2's CPU offload keeps the shards in (pinned) host memory
    home = torch.device("cpu") if cfg.parallel.fsdp_cpu_offload else device
    with BuildMemory(device) as memory:
        model = build_on_meta(cfg.model)
        n_params = model.num_params()
        values = None if resuming else initial_values(cfg, model)
        tied = spec_of(cfg.model).tied(cfg.model)
        pm = parallelize(
            model, cfg, layout, device, lambda part: materialize(part, home, values, tied)
        )
    return pm, n_params, memory.gib


def build_parts(
    cfg: Config, world: distributed.World, device: torch.device, resuming: bool = False
) -> TrainingParts:
    """Model, optimizer, scaler and loaders of this rank; `resuming`: a checkpoint restore
    fills the weights (they are not initialised)."""
    layout = build_layout(cfg, device.type, world.size)
    pm, n_params, init_gib = build_parallel_model(cfg, layout, device, resuming)
    optimizer = build_optimizer(
        pm.module, cfg.train, device, shard_over=zero1_group(cfg.parallel, layout)
    )
    loader = BatchLoader(
        build_source(cfg, "train", verify=True),
        cfg.train.micro_batch_size,
        layout.dp_rank,
        cfg.parallel.dp_size,
        prefetch=2,
        pin_memory=device.type == "cuda",
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    val_source = None
    if cfg.eval.interval > 0 and has_split(cfg, "val"):
        val_source = build_source(cfg, "val", verify=True)
    return TrainingParts(pm, optimizer, scaler, loader, val_source, n_params, init_gib)


def build_checkpointer(
    cfg: Config,
    parts: TrainingParts,
    state: TrainState,
    log: MetricsLogger,
    guard: FiniteGuard,
    updates: UpdateGuard,
) -> Checkpointer:
    """Every part that a checkpoint holds, registered once."""
    return Checkpointer(
        Path(cfg.run.dir),
        cfg.checkpoint,
        parts.pm.module,
        parts.optimizer,
        counters=state,
        parts={"data": parts.loader, "grad_scaler": parts.scaler, "stability": updates},
        config=to_dict(cfg),
        extra_files=tokenizer_files(cfg),
        log=log.print,
        before_save=guard.check,  # a non-finite state never becomes a checkpoint
        device=guard.device,  # checkpoint.async_save=auto: in the background on CUDA only
    )


def prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    """Rank 0: a read-only or full disk shows now, not at the first checkpoint; the config
    the run trains with goes to `config.yaml`."""
    run_files.check_writable(run_dir / run_files.CHECKPOINTS)
    write_text_atomic(run_dir / run_files.CONFIG, OmegaConf.to_yaml(to_dict(cfg)))


def tokenizer_files(cfg: Config) -> list[Path]:
    """A trained tokenizer travels inside every checkpoint, so generation needs nothing else
    (a mixture's datasets share one tokenizer: the first one's file)."""
    if cfg.data.kind != "shards":
        return []
    folder = tokenizer_folder(cfg)
    name = read_manifest(folder)["tokenizer"]["file"]
    return [Path(folder) / name] if name else []


def no_validation_split(cfg: Config) -> str:
    """Why a run with eval.interval > 0 does not validate."""
    if cfg.data.mix:
        what = "none of the datasets of data.mix has a validation split"
    else:
        what = f"dataset {cfg.data.path} has no validation split"
    return f"{what} (dlt-prep makes one with data.val_fraction or data.val_input)"


class VerifyReport:
    """One line once every shard of `source` matched its sha256 (a run's evidence that its
    data is what dlt-prep wrote), with the rate it was hashed at."""

    def __init__(self, source: SampleSource):
        parts = source.sources if isinstance(source, MixtureSource) else [source]
        self.verifiers = [s.verifier for s in parts if getattr(s, "verifier", None)]
        self.started = time.perf_counter()
        self.pending = bool(self.verifiers)

    def report(self, print_line: Callable[[str], None]) -> None:
        if not self.pending or not all(v.all_verified for v in self.verifiers):
            return
        self.pending = False
        seconds = time.perf_counter() - self.started
        shards = sum(len(v.files) for v in self.verifiers)
        mb = sum(v.bytes_hashed for v in self.verifiers) / 1e6
        print_line(
            f"data verified: {shards} training shards ({mb:,.1f} MB) match their sha256 "
            f"(hashed in the background, done {seconds:.1f} s after the start)"
        )


# ----------------------------------------------------------------------------- the step


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 compute with fp32 master weights; fp32 runs without autocast."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[cfg.precision])


def train_step(
    parts: TrainingParts,
    cfg: Config,
    device: torch.device,
    meter: StepMeter,
    updates: UpdateGuard,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor, Skip | None]:
    """Optimizer step `step` over `grad_accum` micro-batches, unless `updates` skips it.

    Returns (this rank's summed micro-batch losses, how many there were and their summed z
    terms; grad norm; the skip, if the update was skipped)."""
    pm, optimizer, scaler = parts.pm, parts.optimizer, parts.scaler
    accum = cfg.train.grad_accum
    loss_and_count = torch.zeros(3, device=device)  # (sum of losses, count, sum of z terms)
    one, zero = torch.ones((), device=device), torch.zeros((), device=device)
    for micro in range(accum):
        with meter.timing("data"):
            x, y = (b.to(device, non_blocking=True) for b in parts.loader.next_batch())
        # Gradients are synchronised across data-parallel ranks on the last micro-batch only.
        terms = pm.forward_backward(x, y, micro == accum - 1, scaler, autocast(cfg, device))
        if terms is not None:
            z = zero if terms.z is None else terms.z.float()
            loss_and_count += torch.stack([terms.ce.float(), one, z])
    with meter.timing("optimizer"):
        scaler.unscale_(optimizer)  # fp16: clip the true gradients, not the scaled ones
        pm.after_backward()
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norm = pm.clip_grad_norm(clip)
        # The one host sync of a step (and a tiny all-reduce): skip a non-finite or spiking
        # update on every rank alike (trainer/stability.py).
        loss, norm = global_loss_and_norm(loss_and_count, grad_norm, meter.world_size)
        skip = updates.judge(step, loss, norm)
        if skip is None:
            scaler.step(optimizer)  # fp16: skipped when gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return loss_and_count, grad_norm, skip


@torch.no_grad()
def evaluate(pm: ParallelModel, cfg: Config, device: torch.device, source: SampleSource) -> float:
    """Mean loss over the first `eval.steps` validation batches (the same ones every time)."""
    loader = BatchLoader(
        source,
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


def evaluate_hellaswag(
    pm: ParallelModel, examples: list[hellaswag.Example], cfg: Config, device: torch.device
) -> dict[str, float]:
    """HellaSwag accuracy of the model now (collective over the data-parallel ranks)."""
    pm.module.eval()
    try:
        scores = hellaswag.evaluate(
            pm.wrapped,
            examples,
            device,
            pm.layout.dp_rank,
            cfg.parallel.dp_size,
            autocast(cfg, device),
            rows_per_forward=cfg.train.micro_batch_size,  # what fits in memory in training
        )
    finally:
        pm.module.train()
    return scores.metrics()


class FiniteGuard:
    """A non-finite weight must never become a checkpoint: `check` asks every rank
    (collective) before a save. (A non-finite loss or gradient never reaches the weights:
    its update is skipped, trainer/stability.py.)"""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.device = module, device

    def check(self, step: int, last_saved: Path | None) -> None:
        """Raise :class:`TrainingError` on every rank if any rank holds a non-finite weight."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.module.parameters()]
        weights_ok = torch.stack([torch.isfinite(p).all() for p in local]).all()
        bad = (~weights_ok).float().reshape(1).to(self.device)
        if distributed.all_reduce_max(bad).item() > 0:
            raise TrainingError(
                f"the weights are no longer finite at step {step} (too high a train.lr? a "
                f"model.layer_norm_eps <= 0?): stopped without writing a checkpoint from it; "
                f"the last good one is {last_saved or 'none'}"
            )


# ------------------------------------------------------------------------- start and end


@dataclass
class Start:
    """Where the run starts: step 0, or a checkpoint and its trainer state."""

    path: Path | None = None
    saved: dict[str, Any] | None = None
    origin: str | None = None  # the resume=PATH this run's checkpoints descend from

    @property
    def step(self) -> int:
        return self.saved["step"] if self.saved else 0


def choose_start(cfg: Config, note: Callable[[str], None]) -> Start:
    """The checkpoint this run continues (collective), compared with the config. What was
    skipped or moved goes to `note` at once (before a refusal can end the run)."""
    choice = resume.choose(cfg)
    for line in choice.notes:
        note(line)
    if choice.path is None:
        return Start(origin=choice.origin)
    saved = read_trainer_state(choice.path)
    changes = resume.compare(cfg, saved, choice.path, explicit=cfg.resume not in ("auto", "none"))
    if changes:
        note("resuming with changes: " + "; ".join(changes))
    moved = resume.set_aside(choice, cfg.run.dir)  # only once the resume is accepted
    if moved:
        note(moved)
    return Start(choice.path, saved, choice.origin or saved.get("origin"))


def already_complete(cfg: Config, start: Start) -> str:
    return (
        f"run.dir {cfg.run.dir} is already complete: step {start.step} of "
        f"train.max_steps={cfg.train.max_steps} ({start.path}); nothing to do (raise "
        "train.max_steps to train further, or use another run.dir)"
    )


def banner(
    cfg: Config,
    world: distributed.World,
    device: torch.device,
    n_params: int,
    meter: StepMeter,
    start: Start,
    load_s: float,
) -> str:
    """The first line of a run: what trains where, and from where."""
    p = cfg.parallel
    threads = f" ({torch.get_num_threads()} threads each)" if device.type == "cpu" else ""
    origin = (
        f"resumed from {start.path} at step {start.step} (loaded in {load_s:.2f} s)"
        if start.path
        else "fresh start"
    )
    return (
        f"run {cfg.run.dir} | model {n_params / 1e6:.2f}M params | {world.size} x "
        f"{device.type}{threads} | mesh pp={p.pp} dp_replicate={p.dp_replicate} "
        f"dp_shard={p.dp_shard} cp={p.cp} tp={p.tp} | precision {cfg.precision} | "
        f"{meter.tokens_per_step:,} tokens/step | init memory "
        f"{max(meter.init_memory_per_device):.2f} GiB (max over ranks) | {origin}"
    )


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
