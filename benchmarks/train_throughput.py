"""Training throughput of model presets x precisions, through the real trainer.

    python -m benchmarks.train_throughput --models tiny gpt2_small --precisions fp32 bf16

Each case is a short `trainer.train.run` on dummy data; the first `--steps` steps warm up
(allocator, autocast caches, compilation) and the next `--steps` are measured. Prints a table
and appends it to benchmarks/results.md with the machine, versions, date and command.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.common import append_results
from jobs.cli import compose_config, given_keys, training_dict
from trainer.config import resolve_config
from trainer.run_dir import METRICS, read_jsonl
from trainer.train import run


def measure(model: str, precision: str, steps: int, micro_batch: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"model={model}",
            f"precision={precision}",
            f"run.dir={tmp}",
            "data=dummy",
            f"train.max_steps={2 * steps}",
            f"train.micro_batch_size={micro_batch}",
            f"log.interval={steps}",
            "eval.interval=0",
            "checkpoint.interval=0",
            "train.warmup_steps=1",
            "log.progress=false",
            *extra,
        ]
        cfg = resolve_config(
            training_dict(compose_config("train", overrides)), given=given_keys(overrides)
        )
        run(cfg)
        measured = read_jsonl(Path(tmp) / METRICS)[-1]
    return {
        "model": model,
        "precision": precision,
        "tokens_per_step": micro_batch * cfg.model.block_size,
        "tokens_per_s": measured["tokens_per_s"],
        "mfu": measured["mfu"],
        "memory_gib": measured["memory_gib"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "llama_tiny", "gpt2_small"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="warm-up steps = measured steps")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="do not append to results.md")
    parser.add_argument("overrides", nargs="*", help="extra dlt-train overrides")
    args = parser.parse_args(argv)

    rows = []
    for model in args.models:
        for precision in args.precisions:
            print(f"measuring {model} {precision} ...", flush=True)
            rows.append(measure(model, precision, args.steps, args.micro_batch, args.overrides))
    base = {r["model"]: r["tokens_per_s"] for r in rows if r["precision"] == rows[0]["precision"]}
    lines = [
        "| model | precision | tokens/step | tokens/s | vs "
        + rows[0]["precision"]
        + " | MFU | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = r["tokens_per_s"] / base[r["model"]] if r["model"] in base else float("nan")
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['tokens_per_step']:,} | "
            f"{r['tokens_per_s']:,.0f} | {ratio:.2f}x | {mfu} | {r['memory_gib']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    append_results(
        "Training throughput",
        "python -m benchmarks.train_throughput " + " ".join(sys.argv[1:] if argv is None else argv),
        f"{args.steps} warm-up + {args.steps} measured steps per case; memory on CPU is the "
        "process's peak resident set size",
        table,
    )


if __name__ == "__main__":
    main()
