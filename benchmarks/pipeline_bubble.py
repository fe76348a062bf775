"""The pipeline bubble of each schedule, measured on CPU processes (gloo), next to the theory.

    python -m benchmarks.pipeline_bubble --pp 2 --microbatches 4 --steps 8 [--write]

Each rank times its stages' compute actions by wrapping the `PipelineStage` methods (forward,
backward, and the zero-bubble schedules' separate weight backward); the rest of its step is
idle (waiting for a neighbour, sending):

    bubble(rank) = 1 - busy(rank) / step time        (median over the timed steps)

The theory, from the measured mean action times t_F (forward), t_B = t_I + t_W (backward: the
input gradient, then the weight gradient), m micro-batches, V stages per rank:

    gpipe, 1f1b:      (pp-1)(t_F + t_B)      / V=1   idle per rank per step
    interleaved_1f1b: (pp-1)(t_F + t_B)      / V
    zero_bubble:      (pp-1) max(0, t_F + t_I - t_W) / V   (ZB-H1: weight gradients fill
                                                          the rest)
    fraction = idle / (m (t_F + t_B) + idle)

`--diagram` prints the action grid of each multi-stage schedule (its own `pipeline_order`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import append_results

# (label, pp_schedule, stages per rank)
SCHEDULES = [
    ("GPipe", "gpipe", 1),
    ("1F1B", "1f1b", 1),
    ("interleaved 1F1B, V=2", "interleaved_1f1b", 2),
    ("zero bubble (ZB-H1), V=1", "zero_bubble", 1),
    ("zero bubble (ZB-H1), V=2", "zero_bubble", 2),
]
TIMED = {  # PipelineStage method -> the action it runs
    "forward_one_chunk": "F",
    "backward_one_chunk": "B",
    "backward_weight_one_chunk": "W",
}


def run_config(args: argparse.Namespace, schedule: str, virtual: int) -> dict[str, Any]:
    return {
        "model": {"n_layer": args.layers, "n_head": 4, "n_embd": args.width, "block_size": 128},
        "data": {"kind": "dummy", "vocab_size": 512},
        "train": {"micro_batch_size": args.microbatches * args.seqs, "max_steps": 1},
        "parallel": {
            "pp": args.pp,
            "pp_schedule": schedule,
            "pp_virtual_stages": virtual,
            "pp_microbatches": args.microbatches,
        },
        "eval": {"interval": 0},
        "checkpoint": {"interval": 0},
        "run": {"dir": "unused"},
        "device": "cpu",
    }


def timed(method: Callable, action: str, busy: dict[str, list[float]]) -> Callable:
    """`method`, recording the seconds of each call under `action` (B: full backward, or the
    input part when the weight part runs separately)."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = method(*args, **kwargs)
        full = kwargs.get("full_backward", True)
        busy[action if action != "B" or full else "I"].append(time.perf_counter() - start)
        return result

    return wrapper


def worker(rank: int, world: int, port: int, cfg: dict, steps: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from trainer import distributed
    from trainer.config import load_config
    from trainer.parallel import build_layout, parallelize
    from trainer.train import build_model

    config = load_config(cfg, world_size=world)
    _, device = distributed.init("cpu", threads=1)
    pm = parallelize(
        build_model(config, device), config, build_layout(config, "cpu", world), device
    )
    schedule = pm.schedule
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    busy: dict[str, list[float]] = {"F": [], "B": [], "I": [], "W": []}
    for stage in stages:
        for name, action in TIMED.items():
            setattr(stage, name, timed(getattr(stage, name), action, busy))
    gen = torch.Generator().manual_seed(0)
    shape = (config.train.micro_batch_size, config.model.block_size)
    x, y = (torch.randint(0, 512, shape, generator=gen) for _ in range(2))
    walls, busies = [], []
    for step in range(steps + 2):  # 2 warm-up steps (shape inference, first allocations)
        for times in busy.values():
            times.clear()
        dist.barrier()
        start = time.perf_counter()
        pm.forward_backward(x, y, True, None, contextlib.nullcontext())
        wall = time.perf_counter() - start
        pm.module.zero_grad(set_to_none=True)
        if step >= 2:
            walls.append(wall)
            busies.append(sum(sum(t) for t in busy.values()))
    means = {k: sum(v) / len(v) for k, v in busy.items() if v}
    result = {"wall": walls, "busy": busies, "action_s": means}
    if rank == 0 and hasattr(schedule, "_stages"):  # multi-stage: it runs its pipeline_order
        result["diagram"] = diagram(schedule.pipeline_order)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


COMPUTE = ("F", "B", "I", "W")  # forward, full backward, input / weight gradient


def diagram(order: dict[int, list]) -> str:
    """The schedule's compute actions per rank, one column per time slot (`.` = idle), in
    torch's notation: `2F0` = stage 2, forward, micro-batch 0."""
    rows = {
        rank: [
            "." if a is None else repr(a)
            for a in actions
            if a is None or a.computation_type.value in COMPUTE
        ]
        for rank, actions in order.items()
    }
    width = max(len(cell) for row in rows.values() for cell in row)
    return "\n".join(
        f"rank {rank}  " + " ".join(cell.ljust(width) for cell in row) for rank, row in rows.items()
    )


def theory(schedule: str, virtual: int, pp: int, m: int, t: dict[str, float]) -> float:
    f, i, w = t["F"], t.get("I", 0.0), t.get("W", 0.0)
    b = t.get("B", i + w)
    per_stage = max(0.0, f + i - w) if schedule == "zero_bubble" else f + b
    idle = (pp - 1) * per_stage / virtual
    return idle / (m * (f + b) + idle)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--seqs", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--diagram", action="store_true")
    parser.add_argument("--write", action="store_true", help="append to benchmarks/results.md")
    args = parser.parse_args(argv)
    rows = []
    for label, schedule, virtual in SCHEDULES:
        result = run_schedule(args, schedule, virtual)
        ranks = result["ranks"]
        measured = [
            median(1 - b / w for b, w in zip(r["busy"], r["wall"], strict=True)) for r in ranks
        ]
        kinds = ranks[0]["action_s"].keys()
        times = {k: sum(r["action_s"][k] for r in ranks) / len(ranks) for k in kinds}
        expected = theory(schedule, virtual, args.pp, args.microbatches, times)
        step_ms = 1000 * max(median(r["wall"]) for r in ranks)
        per_rank = ", ".join(f"{100 * b:.0f}%" for b in measured)
        rows.append(
            f"| {label} | {step_ms:.0f} | {per_rank} | {100 * sum(measured) / len(measured):.0f}%"
            f" | {100 * expected:.0f}% |"
        )
        if args.diagram and "diagram" in ranks[0]:
            print(f"{label}:\n{ranks[0]['diagram']}\n")
    table = "\n".join(
        [
            "| schedule | step ms | bubble per rank | bubble (mean) | theory |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.write:
        given = sys.argv[1:] if argv is None else argv
        command = " ".join(["python -m benchmarks.pipeline_bubble", *given])
        details = (
            f"pp={args.pp}, {args.microbatches} micro-batches of {args.seqs} x 128 tokens, "
            f"{args.layers} x {args.width} GPT, fp32, gloo, 1 thread per rank; median of "
            f"{args.steps} steps after 2 warm-up steps"
        )
        append_results("Pipeline bubble per schedule (CPU)", command, details, table)


def run_schedule(args: argparse.Namespace, schedule: str, virtual: int) -> dict[str, Any]:
    """One schedule on `args.pp` processes: each rank's step and busy times."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = run_config(args, schedule, virtual)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(args.pp, port, cfg, args.steps, out), nprocs=args.pp)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.pp)]
    return {"ranks": ranks}


if __name__ == "__main__":
    main()
