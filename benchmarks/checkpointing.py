"""Checkpoint save/load speed against the disk, what the checksums cost, the training stall of
sync vs async saves, and the time from job start to the first step (fresh and resumed).

    python -m benchmarks.checkpointing --model gpt2_small
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import append_results
from trainer import checkpoint
from trainer.config import ModelConfig, model_config
from trainer.models.gpt2.model import GPT
from trainer.run_dir import METRICS, read_jsonl


def disk_write_gbps(folder: Path, megabytes: int) -> float:
    """Sequential write bandwidth with fsync, the ceiling for a checkpoint."""
    block = os.urandom(1 << 20)
    path = folder / "probe.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(megabytes):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return megabytes / 1024 / seconds


def save_load(model_cfg: ModelConfig, folder: Path) -> dict:
    model = GPT(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).backward()
    optimizer.step()  # optimizer state exists: a realistic checkpoint (weights + 2 moments)
    start = time.perf_counter()
    path = checkpoint.save(folder, 1, model, optimizer, {"step": 1}, keep=1)
    save_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    start = time.perf_counter()
    checkpoint.load(path, model, optimizer)
    load_s = time.perf_counter() - start
    return {"bytes": size, "save_s": save_s, "load_s": load_s}


def checksum_cost(model_cfg: ModelConfig, folder: Path, repeats: int) -> dict:
    """Median DCP save time with DCP's own writer and with our checksumming one, and the time
    to check a checkpoint's files before loading. Each save starts after `os.sync()` and a
    pause, so no save pays for the previous one's write-back."""
    import torch.distributed.checkpoint as dcp

    from trainer.checkpoint_files import HashingFileSystemWriter

    model = GPT(model_cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).backward()
    optimizer.step()
    state = {"app": checkpoint.ModelAndOptimizer(model, optimizer)}
    times: dict[str, list[float]] = {"plain": [], "checksummed": []}
    for i in range(repeats):
        for kind in ("plain", "checksummed")[:: 1 if i % 2 else -1]:  # alternate the order
            target = folder / f"{kind}{i}"
            writer = HashingFileSystemWriter(target) if kind == "checksummed" else None
            os.sync()
            time.sleep(1.0)
            start = time.perf_counter()
            dcp.save(state, checkpoint_id=target, storage_writer=writer)
            times[kind].append(time.perf_counter() - start)
    path = checkpoint.save(folder / "run", 1, model, optimizer, {"step": 1}, keep=1)
    start = time.perf_counter()
    problem = checkpoint.check(path)
    check_s = time.perf_counter() - start
    assert problem is None, problem
    return {kind: statistics.median(t) for kind, t in times.items()} | {"check_s": check_s}


def train(args: list[str], run_dir: Path) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.train",
            "data=dummy",
            f"run.dir={run_dir}",
            "log.progress=false",
            "eval.interval=0",
            *args,
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return time.perf_counter() - start, read_jsonl(run_dir / METRICS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2_small", help="model preset for save/load")
    parser.add_argument("--train-model", default="tiny", help="model preset for the stall runs")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--disk-mb", type=int, default=512)
    parser.add_argument("--checksum-repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    from jobs.cli import compose_config

    model = compose_config("train", [f"model={args.model}", "data=dummy"]).model
    model_cfg = model_config(model, vocab_size=model.vocab_size or 257)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        disk = disk_write_gbps(tmp, args.disk_mb)
        io = save_load(model_cfg, tmp / "ckpt")
        sums = checksum_cost(model_cfg, tmp / "sums", args.checksum_repeats)
        common = [
            f"model={args.train_model}",
            f"train.max_steps={args.steps}",
            "log.interval=1",
            "checkpoint.interval=1",
        ]
        _, sync_rows = train([*common, "checkpoint.async_save=false"], tmp / "sync")
        _, async_rows = train([*common, "checkpoint.async_save=true"], tmp / "async")
        fresh_s, _ = train([f"model={args.train_model}", "train.max_steps=1"], tmp / "start")
        resumed_s, _ = train([f"model={args.train_model}", "train.max_steps=2"], tmp / "start")

    def stall(rows):  # the first step's window also holds start-up work: skip it
        return sum(r["time_checkpoint_s"] for r in rows[1:]) / max(1, len(rows) - 1)

    gb = io["bytes"] / 2**30
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| disk sequential write (fsync) | {disk:.2f} GB/s |",
        f"| {args.model} checkpoint size (weights + AdamW state) | {gb:.2f} GiB |",
        f"| save (sync) | {io['save_s']:.2f} s = {gb / io['save_s']:.2f} GB/s |",
        f"| load | {io['load_s']:.2f} s = {gb / io['load_s']:.2f} GB/s |",
        f"| DCP save without / with CRC-32 while writing (median of {args.checksum_repeats}) | "
        f"{sums['plain']:.2f} s / {sums['checksummed']:.2f} s "
        f"({100 * (sums['checksummed'] / sums['plain'] - 1):+.0f}%) |",
        f"| checksum check before loading | {sums['check_s']:.2f} s = "
        f"{gb / sums['check_s']:.2f} GB/s |",
        f"| training stall per checkpoint, sync ({args.train_model}) | "
        f"{1000 * stall(sync_rows):.1f} ms |",
        f"| training stall per checkpoint, async ({args.train_model}) | "
        f"{1000 * stall(async_rows):.1f} ms |",
        f"| job start to end of first step, fresh ({args.train_model}) | {fresh_s:.1f} s |",
        f"| job start to end of first step, resumed ({args.train_model}) | {resumed_s:.1f} s |",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        append_results(
            "Checkpointing and start-up",
            "python -m benchmarks.checkpointing "
            + " ".join(sys.argv[1:] if argv is None else argv),
            f"save/load through trainer.checkpoint (DCP, one process); stall = time the training "
            f"loop spends in save() per checkpoint, averaged over {args.steps - 1} checkpoints",
            table,
        )


if __name__ == "__main__":
    main()
