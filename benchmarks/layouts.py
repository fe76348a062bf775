"""Training throughput and memory of each parallel layout against a single process.

    python -m benchmarks.layouts --model tiny --nproc 2 --steps 10

Each layout runs under `torchrun` (one process per device: GPUs when there are, else CPU
processes with gloo) on dummy data with the same global batch; the figures come from the run's
own metrics.jsonl (the last logged window, after warm-up). Scaling efficiency =
tokens/s(layout) / (processes x tokens/s(single)). On a CPU the processes share the same cores,
so efficiency there shows overheads, not speed-ups. Appends the table to benchmarks/results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.common import append_results
from trainer.run_dir import METRICS, read_jsonl

PARTS = ("params", "grads", "optimizer")


# (name, processes, overrides); micro-batch sizes keep the global batch equal to single's.
def layouts(n: int, micro: int) -> list[tuple[str, int, list[str]]]:
    per_rank = max(1, micro // n)
    return [
        ("single", 1, ["parallel=single", f"train.micro_batch_size={micro}"]),
        (f"DDP x{n}", n, ["parallel=ddp", f"train.micro_batch_size={per_rank}"]),
        (f"FSDP x{n}", n, ["parallel=fsdp", f"train.micro_batch_size={per_rank}"]),
        (f"ZeRO-1 x{n}", n, ["parallel=zero1", f"train.micro_batch_size={per_rank}"]),
        (f"ZeRO-2 x{n}", n, ["parallel=zero2", f"train.micro_batch_size={per_rank}"]),
        (f"TP x{n}", n, ["parallel=tp", f"train.micro_batch_size={micro}"]),
        # every rank reads the whole batch and computes 1/n of each sequence
        (f"CP x{n}", n, ["parallel=cp", f"train.micro_batch_size={micro}"]),
        (f"TP+SP+LP x{n}", n, ["parallel=tp_sp", f"train.micro_batch_size={micro}"]),
        (
            f"PP x{n} (1F1B)",
            n,
            [
                "parallel=pp",
                f"train.micro_batch_size={micro}",
                f"parallel.pp_microbatches={max(n, micro // 2)}",
            ],
        ),
        *(
            (
                f"PP x{n} ({label}, 2 stages per rank)",
                n,
                [
                    f"parallel={preset}",
                    f"train.micro_batch_size={micro}",
                    f"parallel.pp_microbatches={max(n, micro // 2)}",
                ],
            )
            for preset, label in (("pp_interleaved", "interleaved 1F1B"), ("pp_zb", "zero bubble"))
        ),
    ]


def measure(nproc: int, overrides: list[str], model: str, steps: int, precision: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            f"model={model}",
            "data=dummy",
            f"precision={precision}",
            f"run.dir={tmp}",
            f"train.max_steps={2 * steps}",
            f"log.interval={steps}",
            "eval.interval=0",
            "checkpoint.interval=0",
            "train.warmup_steps=1",
            "log.progress=false",
            *overrides,
        ]
        launcher = (
            [sys.executable, "-m", "jobs.train"]
            if nproc == 1
            else [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(nproc),
                "-m",
                "jobs.train",
            ]
        )
        done = subprocess.run([*launcher, *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(overrides)} failed:\n{done.stderr[-2000:]}")
        return read_jsonl(Path(tmp) / METRICS)[-1]


def held_during_step(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """One training step of `cfg` on this rank's process group, measuring the bytes of the
    parameters (after forward), gradients (after backward) and optimizer state (after the
    step) each rank holds, from the tensors themselves: the maximum over ranks of each, with
    the model's parameter count `n` and the data-parallel size `dp`."""
    from trainer import distributed
    from trainer.config import resolve_config
    from trainer.metrics import held_bytes
    from trainer.train import build_parts

    world = distributed.world_from_env()
    config = resolve_config(cfg, world_size=world.size)
    world, device = distributed.init(config.device)
    parts = build_parts(config, world, device)
    pm, optimizer = parts.pm, parts.optimizer
    x, y = (b.to(device) for b in parts.loader.next_batch())
    loss = pm.wrapped(x, y)
    params = held_bytes(pm.module, optimizer)["params"]  # ZeRO-2 style: still gathered
    loss.backward()
    grads = held_bytes(pm.module, optimizer)["grads"]  # reduced (and scattered)
    optimizer.step()
    state = held_bytes(pm.module, optimizer)["optimizer"]
    parts.close()
    per_rank = distributed.all_gather_floats([params, grads, state], device)
    return {
        **{part: max(r[i] for r in per_rank) for i, part in enumerate(PARTS)},
        "n": sum(p.numel() for p in pm.module.parameters()),  # a DTensor's numel() is global
        "dp": config.parallel.dp_size,
    }


def zero_stages(nproc: int, model: str, micro: int) -> str:
    """The memory table of the three ZeRO stages on `nproc` ranks: measured per rank (one
    step each, `held_during_step`, in one torchrun job) beside the theory of
    trainer/parallel/zero1.py, in MiB."""
    from trainer.parallel.zero1 import STAGE_PRESETS, theory_bytes

    print("measuring the ZeRO stages ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "held.json"
        overrides = [f"model={model}", f"run.dir={tmp}/run", "data=dummy"]
        overrides.append(f"train.micro_batch_size={max(1, micro // nproc)}")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node"]
        command = [*launcher, str(nproc), "-m", "benchmarks.layouts", "--held-worker"]
        done = subprocess.run([*command, str(out), *overrides], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the ZeRO stages failed:\n{done.stderr[-2000:]}")
        held = json.loads(out.read_text())
    lines = [
        "| stage | preset | params MiB (theory) | grads MiB (theory) | optimizer MiB (theory) "
        "| total MiB (theory) |",
        "|---|---|---|---|---|---|",
    ]
    for stage, got in held.items():
        theory = theory_bytes(stage, got["n"], got["dp"])
        cells = [(got[p], theory[p]) for p in PARTS]
        cells.append((sum(c[0] for c in cells), sum(c[1] for c in cells)))
        mib = " | ".join(f"{have / 2**20:.2f} ({want / 2**20:.2f})" for have, want in cells)
        lines.append(f"| {stage} | parallel={STAGE_PRESETS[stage]} | {mib} |")
    return "\n".join(lines)


def held_worker(out: str, overrides: list[str]) -> None:
    """Under torchrun: `held_during_step` of each ZeRO stage's preset on the composed config;
    rank 0 writes them to `out`."""
    from jobs.cli import compose_config, training_dict
    from trainer import distributed
    from trainer.parallel.zero1 import STAGE_PRESETS

    held = {}
    for stage, preset in STAGE_PRESETS.items():
        cfg = training_dict(compose_config("train", [*overrides, f"parallel={preset}"]))
        cfg["run"]["dir"] = f"{cfg['run']['dir']}/{stage}"
        held[stage] = held_during_step(cfg)
    if distributed.world_from_env().rank == 0:
        Path(out).write_text(json.dumps(held))
    distributed.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="warm-up steps = measured steps")
    parser.add_argument("--micro-batch", type=int, default=8, help="single's micro-batch")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--zero-only", action="store_true", help="only the ZeRO memory table")
    parser.add_argument("--held-worker", nargs="+", help=argparse.SUPPRESS)  # OUT OVERRIDES...
    args = parser.parse_args(argv)
    if args.held_worker:
        held_worker(args.held_worker[0], args.held_worker[1:])
        return
    command = "python -m benchmarks.layouts " + " ".join(sys.argv[1:] if argv is None else argv)
    zero = zero_stages(args.nproc, args.model, args.micro_batch)
    print(zero)
    if not args.no_write:
        append_results(
            f"ZeRO stages: memory per rank — {args.model}, fp32, {args.nproc} ranks",
            command,
            "bytes each rank holds, from its tensors, at their largest in one step "
            "(parameters after forward, gradients after backward, AdamW state after the "
            "step); the maximum over ranks; theory: trainer/parallel/zero1.py",
            zero,
        )
    if args.zero_only:
        return

    rows = []
    for name, nproc, overrides in layouts(args.nproc, args.micro_batch):
        print(f"measuring {name} ...", flush=True)
        rows.append(
            (name, nproc, measure(nproc, overrides, args.model, args.steps, args.precision))
        )
    single = rows[0][2]["tokens_per_s"]
    lines = [
        "| processes | method | tokens/s | tokens/s per process | peak memory per process "
        "(GiB) | params+grads+optimizer per process (MiB) | scaling efficiency |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, nproc, r in rows:
        lines.append(
            f"| {nproc} | {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / nproc:,.0f} | "
            f"{r['memory_gib']:.2f} | {r['state_gib'] * 1024:.1f} | "
            f"{r['tokens_per_s'] / (nproc * single):.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        append_results(
            f"Parallel layouts — {args.model}, {args.precision}",
            command,
            f"{args.steps} warm-up + {args.steps} measured steps; same global batch "
            f"({args.micro_batch} sequences) in every layout; dummy data",
            table,
        )


if __name__ == "__main__":
    main()
