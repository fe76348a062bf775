"""What a run measures: throughput, MFU, memory, and where a step's time goes.

:class:`StepMeter` owns the numbers of one log window (the steps since the last record): it
times the data wait, the optimizer step and the checkpoint stall, and turns them, with the
loss and the model's FLOPs, into the record written per log step (`trainer.logger`).

MFU (model FLOPs utilisation) = achieved model FLOP/s / the devices' peak FLOP/s, where a
token costs 6 x parameters + attention FLOPs (forward + backward; the architecture's spec).
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Iterator
from typing import Any

import torch

from trainer import distributed
from trainer.config import Config
from trainer.models import spec_of
from trainer.parallel.zero1 import local_optimizer
from trainer.state import TrainState

# Dense bf16 peak TFLOP/s of common accelerators (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
TIMED = ("data", "optimizer", "checkpoint")  # where a step's time goes, besides compute


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """The device's peak for MFU: the configured value, a known GPU's datasheet value, or None."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # VmHWM: this process's own peak (ru_maxrss also counts a parent's from before exec)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _status_kib(field: str) -> int | None:
    """A `VmRSS:`/`VmHWM:` line of /proc/self/status in KiB (None where there is none)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class BuildMemory:
    """The peak memory of building the model (`with BuildMemory(device) as m: ...`, then
    `m.gib`): what a rank needed to hold its part of the model before the first step.

    - CUDA: `torch.cuda.max_memory_allocated` at the end, the allocator's peak so far (the
      model is the first thing a run puts on the GPU).
    - CPU: the growth of this process's peak resident set over the build: the kernel's
      high-water mark (VmHWM) is reset to the current RSS at the start (/proc/self/clear_refs,
      "5") and read at the end, minus the RSS at the start. So it is measured, not computed:
      every page the build touched and held at its peak (parameters, the full tensor of the
      parameter being initialised, allocator slack), not the interpreter and libraries that
      were there before. Where the reset is refused, the peak since the process started is
      used (an upper bound); without /proc (not Linux), `ru_maxrss` likewise.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.gib = 0.0
        self._start_kib = 0

    def __enter__(self) -> BuildMemory:
        if self.device.type != "cuda":
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
            except OSError:
                pass
            self._start_kib = _status_kib("VmRSS") or 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
            return
        peak = _status_kib("VmHWM")
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.gib = max(peak - self._start_kib, 0) / 2**20


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds of `t` (a sharded DTensor: its local shard only)."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def held_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the parameters, gradients and optimizer state this rank holds right now,
    from the tensors themselves (under ZeRO-1: the state of this rank's share only)."""
    params = list(module.parameters())
    state = local_optimizer(optimizer).state.values()
    return {
        "params": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(
            local_bytes(v)
            for s in state
            for v in s.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        ),
    }


def memory_per_rank(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict[str, float]:
    """Peak device memory and the bytes of parameters + gradients + optimizer state held by
    this rank during a step (sharded tensors count only their local shard); max over ranks."""
    held = held_bytes(module, optimizer)
    # Gradients (freed by zero_grad before we get here) are as large as their parameters.
    grads = sum(local_bytes(p) for p in module.parameters() if p.requires_grad)
    state = held["params"] + grads + held["optimizer"]
    per_rank = distributed.all_gather_floats([peak_memory_gib(device), state / 2**30], device)
    return {
        "memory_gib": max(r[0] for r in per_rank),
        "state_gib": max(r[1] for r in per_rank),
        "memory_gib_per_device": [round(r[0], 4) for r in per_rank],
    }


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class StepMeter:
    """Throughput, MFU, memory and time per step over each log window."""

    def __init__(
        self,
        cfg: Config,
        n_params: int,
        device: torch.device,
        world_size: int,
        state: TrainState,
        init_memory_gib: float = 0.0,
    ):
        """`init_memory_gib`: this rank's :class:`BuildMemory` (collective: gathered from
        every rank, for the banner and the first record)."""
        t = cfg.train
        self.tokens_per_step = (
            t.micro_batch_size * t.grad_accum * cfg.parallel.dp_size * cfg.model.block_size
        )
        per_token = spec_of(cfg.model).flops_per_token(cfg.model, n_params)
        self.flops_per_step = per_token * self.tokens_per_step
        self.peak = peak_tflops(device, cfg.log.peak_tflops)
        self.z_loss = t.z_loss
        self.device, self.world_size, self.state = device, world_size, state
        if state.tokens is None:  # a checkpoint that did not record it: the same batch so far
            state.tokens = state.step * self.tokens_per_step
        self._elapsed_before = state.elapsed_s
        self._attempt_start = time.perf_counter()
        per_rank = distributed.all_gather_floats([init_memory_gib], device)
        self.init_memory_per_device = [round(r[0], 4) for r in per_rank]
        self._init_reported = False  # the first record of this attempt carries it
        self.new_window()

    def new_window(self) -> None:
        """Start the next log window (after the record is written)."""
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.seconds = dict.fromkeys(TIMED, 0.0)

    @contextlib.contextmanager
    def timing(self, what: str) -> Iterator[None]:
        """Add the time spent inside to `what` (data, optimizer or checkpoint)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - started

    def step_done(self) -> None:
        self.window_steps += 1
        self.state.tokens += self.tokens_per_step
        self.state.elapsed_s = self.elapsed_s()

    def elapsed_s(self) -> float:
        """Training time of the run so far, over every attempt."""
        return self._elapsed_before + time.perf_counter() - self._attempt_start

    def record(
        self,
        lr: float,
        loss_and_count: torch.Tensor,  # (sum of losses, their count, sum of z terms)
        grad_norm: torch.Tensor,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> dict[str, Any]:
        """The record of this log window (collective: the loss is averaged over the ranks,
        memory gathered from them)."""
        loss_sum, count, z_sum = distributed.all_reduce_sum(loss_and_count).tolist()
        record = {
            "step": self.state.step,
            "loss": loss_sum / count,  # the cross-entropy, without the z-loss term
            "lr": lr,
            "grad_norm": grad_norm.item(),
        }
        if self.z_loss:  # what the z-loss added to the minimised loss
            record["z_loss"] = self.z_loss * z_sum / count
        now = time.perf_counter()  # after the collectives: the window's work is done
        steps = max(self.window_steps, 1)
        step_time = (now - self.window_start) / steps
        record |= {
            "tokens_per_s": self.tokens_per_step / step_time,
            "tokens_per_s_per_device": self.tokens_per_step / step_time / self.world_size,
            "mfu": self.flops_per_step / step_time / self.world_size / (self.peak * 1e12)
            if self.peak
            else None,
            **memory_per_rank(module, optimizer, self.device),
            "tokens": self.state.tokens,
            "elapsed_s": self.elapsed_s(),
            # where a step's time went (averages over the window, this rank's view)
            "time_step_s": step_time,
            **{f"time_{what}_s": self.seconds[what] / steps for what in TIMED},
            "restarts": self.state.restarts,
        }
        if not self._init_reported:
            self._init_reported = True
            record["init_memory_gib"] = max(self.init_memory_per_device)
            record["init_memory_gib_per_device"] = self.init_memory_per_device
        return record
