"""Process group set-up: who am I, how many are we, which device is mine.

`torchrun` starts one process per device and describes the job in environment variables; `init()` turns them into a process group: NCCL between GPUs,
gloo on CPU. A plain `python` run is a world of one and creates no process group at all.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.config import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """torchrun's RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE, or a world of one."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_WORLD_SIZE", 1)),
        )
    return World()


def pick_device(name: str) -> torch.device:
    """`device=auto|cpu|cuda` as a device (auto: CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: no CUDA device is available")
    return torch.device(name)


def cpu_threads(requested: int, local_size: int) -> int:
    """Torch's intra-op threads for one of `local_size` processes on this machine.

    0 (auto): `OMP_NUM_THREADS` when set; else this process's share of the cores it may run on
    (its affinity, as SLURM or taskset restrict it) that are not already busy (the 1-minute
    load average), less one for the data loader's thread when there are more than 4. More
    threads than free cores make every matrix product wait for a descheduled thread: on a
    loaded 2-core machine torch's default made training ~10x slower than one thread, while on
    a quiet one two threads were 1.7x faster than one.
    """
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, round(cores - busy))
    threads = max(1, min(cores, free) // local_size)
    return threads - 1 if threads > 4 else threads


def init(
    device_name: str = "auto", threads: int = 0, timeout_s: float | None = None
) -> tuple[World, torch.device]:
    """Join the job's process group (if there is more than one process), pick our device and
    set torch's CPU threads (:func:`cpu_threads`).

    `timeout_s` (`dist.timeout_s`): how long a collective may wait for the other ranks before
    it fails (None: torch's default, 10 min for NCCL, 30 for gloo). On gloo the waiting rank
    raises (trainer/hangs.py turns that into one line); under NCCL the watchdog thread ends the
    process (TORCH_NCCL_ASYNC_ERROR_HANDLING, jobs/node.py) after dumping its flight recorder."""
    world = world_from_env()
    torch.set_num_threads(cpu_threads(threads, world.local_size))
    use_cuda = pick_device(device_name).type == "cuda"
    if use_cuda:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        enable_tf32()
    else:
        device = torch.device("cpu")
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group(
            # gloo next to NCCL: asynchronous checkpoints coordinate on the CPU.
            backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo",
            rank=world.rank,
            world_size=world.size,
            device_id=device if use_cuda else None,
            timeout=None if timeout_s is None else datetime.timedelta(seconds=timeout_s),
        )
    if timeout_s is not None:
        set_default_timeout(datetime.timedelta(seconds=timeout_s))
    return world, device


def set_default_timeout(timeout: datetime.timedelta) -> None:
    """Every process group made from now on without a timeout of its own waits `timeout`
    too: the device mesh's dimensions (an HSDP, FSDP x TP or 3-D run's FSDP and TP
    collectives) and the asynchronous checkpoints' gloo group. torch would give those its
    own defaults (10 min on NCCL, 30 on gloo) whatever the default group was given."""
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout


def enable_tf32() -> None:
    """fp32 matmuls on CUDA run on TF32 tensor cores (a 10-bit mantissa, fp32's range and
    accumulation; several times fp32's throughput on A100/H100). bf16/fp16 runs are not
    affected: autocast's matmuls are half precision already.

    The legacy setter on purpose: after torch 2.9's per-backend one
    (`torch.backends.cuda.matmul.fp32_precision = "tf32"`), reading the precision through
    the legacy getter raises, and torch.compile's inductor reads it (pytorch/pytorch#166387,
    still so in 2.13); this one sets both consistently."""
    torch.set_float32_matmul_precision("high")


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over every rank (a no-op in a world of one)."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def broadcast_flag(flag: bool) -> bool:
    """True on every rank if it is True on any rank (one all-reduce of a CPU tensor).

    Agreed on the CPU on purpose: the default group of a CUDA run is "cpu:gloo,cuda:nccl", so
    a CPU tensor goes over gloo and never touches a GPU stream. A CUDA tensor would cost two
    host syncs a step under NCCL (the copy in, the `.item()` out), each waiting for every
    kernel queued so far."""
    t = torch.tensor([1.0 if flag else 0.0])
    return bool(all_reduce_max(t).item() > 0)


def all_gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's `values`, in rank order (e.g. memory per device, for rank 0 to log)."""
    local = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return [local.tolist()]
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [g.tolist() for g in gathered]


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's `obj` (small, picklable: our own ranks' values), in rank order."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
