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
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import append_results
from trainer.run_dir import METRICS, read_jsonl


# (name, processes, overrides); micro-batch sizes keep the global batch equal to single's.
def layouts(n: int, micro: int) -> list[tuple[str, int, list[str]]]:
    per_rank = max(1, micro // n)
    return [
        ("single", 1, ["parallel=single", f"train.micro_batch_size={micro}"]),
        (f"DDP x{n}", n, ["parallel=ddp", f"train.micro_batch_size={per_rank}"]),
        (f"FSDP x{n}", n, ["parallel=fsdp", f"train.micro_batch_size={per_rank}"]),
        (f"ZeRO-2 x{n}", n, ["parallel=zero2", f"train.micro_batch_size={per_rank}"]),
        (f"TP x{n}", n, ["parallel=tp", f"train.micro_batch_size={micro}"]),
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="warm-up steps = measured steps")
    parser.add_argument("--micro-batch", type=int, default=8, help="single's micro-batch")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

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
            "python -m benchmarks.layouts " + " ".join(sys.argv[1:] if argv is None else argv),
            f"{args.steps} warm-up + {args.steps} measured steps; same global batch "
            f"({args.micro_batch} sequences) in every layout; dummy data",
            table,
        )


if __name__ == "__main__":
    main()
