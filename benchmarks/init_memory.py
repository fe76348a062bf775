"""Peak memory of building the model, per rank: meta-device init against the old eager build.

    python -m benchmarks.init_memory --model gpt2_large --nproc 2

For one process and for FSDP on `nproc` ranks, the model is built twice, each time in fresh
processes (under `torchrun`) and stopped before the first step:

- meta: as `dlt-train` builds it (trainer/train.py `build_parallel_model`): on the meta
  device, sharded there, then each rank materialises and initialises only its shard;
- eager: as it was built before: the whole fp32 model initialised on every rank, moved to
  the device, then sharded (`parallelize` of a materialised model).

The figure is :class:`trainer.metrics.BuildMemory` (the `init_memory_gib` of a run's first
record): on CPU the growth of the process's peak resident set over the build, on CUDA the
allocator's peak. Beside it the theory: the whole model's fp32 bytes and one rank's shard.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import append_results

BUILDS = ("meta", "eager")


def build_worker(out: str, build: str, overrides: list[str]) -> None:
    """Under torchrun: build the model of the composed config the `build` way; rank 0
    writes every rank's peak memory (GiB), the seconds it took and the parameter count."""
    import torch

    from jobs.cli import compose_config, training_dict
    from trainer import distributed
    from trainer.config import resolve_config
    from trainer.metrics import BuildMemory
    from trainer.models import build_model, build_on_meta
    from trainer.parallel import build_layout, parallelize
    from trainer.train import build_parallel_model

    world = distributed.world_from_env()
    cfg = resolve_config(training_dict(compose_config("train", overrides)), world_size=world.size)
    world, device = distributed.init(cfg.device)
    layout = build_layout(cfg, device.type, world.size)
    started = time.perf_counter()
    if build == "meta":
        _, _, gib = build_parallel_model(cfg, layout, device)
    else:
        with BuildMemory(device) as memory:
            torch.manual_seed(cfg.train.seed)
            parallelize(build_model(cfg.model).to(device), cfg, layout, device)
        gib = memory.gib
    seconds = time.perf_counter() - started
    per_rank = distributed.all_gather_floats([gib, seconds], device)
    if world.is_main:
        n = sum(p.numel() for p in build_on_meta(cfg.model).parameters())  # tied ones once
        gibs, slowest = [r[0] for r in per_rank], max(r[1] for r in per_rank)
        Path(out).write_text(json.dumps({"gib": gibs, "s": slowest, "n": n}))
    distributed.shutdown()


def measure(nproc: int, build: str, model: str, parallel: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "built.json"
        overrides = [f"model={model}", f"parallel={parallel}", f"run.dir={tmp}/run", "data=dummy"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node"]
        command = [*launcher, str(nproc), "-m", "benchmarks.init_memory", "--worker"]
        done = subprocess.run(
            [*command, str(out), build, *overrides], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"{build} build on {nproc} failed:\n{done.stderr[-2000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2_large")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--builds", nargs="+", default=list(BUILDS), choices=BUILDS)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)  # OUT BUILD OVERRIDES
    args = parser.parse_args(argv)
    if args.worker:
        build_worker(args.worker[0], args.worker[1], args.worker[2:])
        return
    command = "python -m benchmarks.init_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "| layout | build | processes | peak init memory per rank (GiB) | fp32 weights per "
        "rank, theory (GiB) | whole model fp32 (GiB) | build time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for nproc, parallel, label in ((1, "single", "single"), (args.nproc, "fsdp", "FSDP")):
        for build in args.builds:
            print(f"building {label} x{nproc} ({build}) ...", flush=True)
            got = measure(nproc, build, args.model, parallel)
            whole = 4 * got["n"] / 2**30
            per_rank = " / ".join(f"{g:.3f}" for g in got["gib"])
            lines.append(
                f"| {label} | {build} | {nproc} | {per_rank} | {whole / nproc:.3f} | "
                f"{whole:.3f} | {got['s']:.1f} |"
            )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        append_results(
            f"Model build: peak memory per rank — {args.model}, fp32",
            command,
            "stopped before the first step; meta = built on the meta device and each rank "
            "materialises its shard, eager = the whole model built on every rank first (the "
            "old way); measured by trainer.metrics.BuildMemory (CPU: growth of the peak RSS "
            "over the build)",
            table,
        )


if __name__ == "__main__":
    main()
