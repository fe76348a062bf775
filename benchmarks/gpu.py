"""The GPU benchmark: how fast the trainer's own step runs on one H100/H200.

    dlt-bench suite=gpu size=full write=true
    (= python -m benchmarks.suite suite=gpu size=full write=true; alone:
       python -m benchmarks.gpu --size full)

One command, at most ~8 minutes on one GPU (`BUDGET_S`, compilation included), appending one
section to benchmarks/results.md:

- the measured bf16 matmul peak (large square matmuls timed with CUDA events after warm-up);
- GPT-2 124M (`gpt2_small`, block 1024, vocabulary 50257, dummy data) in bf16 at micro-batch
  16 and 32 x {eager, compiled} x {activation checkpointing off, on}, and `gpt2_medium`
  compiled;
- the before/after of issue 12's items 1-3 as rows that toggle exactly one key each on the
  compiled gpt2_small base (`CASES`).

Each row is the trainer's own step (`trainer.train.train_step` on the parts `build_parts`
makes, no checkpoints or logging): 5 warm-up steps (compilation, allocator, autotuning), then
10 steps timed with CUDA events (`SIZES`). Each row gives tokens/s, ms/step, MFU against the
measured and the nominal peak (trainer/metrics.py's datasheet values), the CUDA allocator's
peak over the timed steps and the warm-up's seconds (mostly compilation). Every case runs in its own process (its own peak memory, compile caches and
failure): a case that runs out of memory, fails or exceeds its time is a row that says so.
The processes share Inductor's on-disk caches, so a block graph compiled for one row is reused
by the rows that change only the loss. Rows whose resolved config equals an earlier row's
are measured once.

`--size smoke` runs the same code path on a CPU in about a minute, for CI: a tiny model, fp32,
1 + 1 steps, compilation disabled (`TORCH_COMPILE_DISABLE=1`), every case in one process; its
figures are not measurements.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

BUDGET_S = 450.0  # the whole suite at size=full (8 minutes minus start-up and writing)
CASE_TIMEOUT_S = 180.0  # one case at most (a cold gpt2_medium compile fits well inside)
RESULT = "GPU_BENCH_RESULT "  # a worker's result line on stdout


@dataclass(frozen=True)
class Case:
    """One row: a model at a micro-batch, compiled or not, with activation checkpointing or
    not, plus the keys a before/after row toggles."""

    label: str
    model: str = "gpt2_small"
    micro_batch: int = 16
    compiled: bool = True
    checkpointing: bool = False
    overrides: tuple[str, ...] = ()
    cuda_only: bool = False  # a CUDA kernel: left out at size=smoke (CPU)


def item(label: str, override: str, cuda_only: bool = False) -> Case:
    return Case(f"{label}: {override}", overrides=(override,), cuda_only=cuda_only)


# In the order they run (the most telling first: the time budget cuts the tail).
CASES = [
    Case("gpt2_small mb16 compiled"),
    item("item 1 before", "train.compile_loss=false"),
    item("item 1 after", "train.compile_loss=true"),
    item("item 1 before", "model.loss_chunk_size=0"),
    item("item 1 after", "model.loss_chunk_size=8192"),
    item("item 2 before", "model.pad_vocab_to_multiple=1"),
    item("item 2 after", "model.pad_vocab_to_multiple=128"),
    item("item 3 before", "model.attention=sdpa"),
    item("item 3 after", "model.attention=auto"),
    item("item 3 after", "model.attention=cudnn", cuda_only=True),
    Case("gpt2_small mb16 compiled, act. ckpt", checkpointing=True),
    Case("gpt2_small mb32 compiled", micro_batch=32),
    Case("gpt2_small mb32 compiled, act. ckpt", micro_batch=32, checkpointing=True),
    Case("gpt2_medium mb16 compiled", model="gpt2_medium"),
    Case("gpt2_small mb16 eager", compiled=False),
    Case("gpt2_small mb16 eager, act. ckpt", compiled=False, checkpointing=True),
    Case("gpt2_small mb32 eager", micro_batch=32, compiled=False),
    Case("gpt2_small mb32 eager, act. ckpt", micro_batch=32, compiled=False, checkpointing=True),
]


@dataclass(frozen=True)
class Size:
    """What `--size` changes: the run's base keys, how many steps, the matmul sizes."""

    device: str  # cuda | cpu
    base: tuple[str, ...]  # after the case's own keys, so they win
    warmup: int
    steps: int
    matmul_sizes: tuple[int, ...]
    matmul_iters: int
    one_process: bool  # every case in one worker (smoke) or one worker per case (full)
    micro_batch_divisor: int = 1  # a case's micro-batch (16, 32) is divided by this
    env: tuple[tuple[str, str], ...] = ()

    def micro_batch(self, full: int) -> int:
        return max(1, full // self.micro_batch_divisor)


GPT2_VOCAB = 50257
SIZES = {
    "full": Size(
        device="cuda",
        base=("precision=bf16", "device=cuda", f"data.vocab_size={GPT2_VOCAB}"),
        warmup=5,
        steps=10,
        matmul_sizes=(4096, 8192, 16384),
        matmul_iters=20,
        one_process=False,
    ),
    "smoke": Size(
        device="cpu",
        base=(
            "precision=fp32",
            "device=cpu",
            "model.n_layer=1",
            "model.n_head=2",
            "model.n_embd=32",
            "model.block_size=32",
            "model.vocab_size=512",
            "data.vocab_size=512",
        ),
        warmup=1,
        steps=1,
        matmul_sizes=(128,),
        matmul_iters=2,
        one_process=True,
        micro_batch_divisor=8,
        env=(("TORCH_COMPILE_DISABLE", "1"),),  # the same calls, without the compile time
    ),
}


def refusal(size_name: str) -> str | None:
    """Why `size_name` cannot run on this machine (None: it can): size=full measures a GPU."""
    import torch

    if SIZES[size_name].device == "cuda" and not torch.cuda.is_available():
        return (
            f"suite=gpu size={size_name} needs a CUDA GPU and none is visible here (its figures "
            "would mean nothing on a CPU; size=smoke runs its code path)"
        )
    return None


def active_cases(size: Size) -> list[Case]:
    """The rows that run at `size` (a CUDA kernel's rows only on CUDA: Case.cuda_only)."""
    return [c for c in CASES if size.device == "cuda" or not c.cuda_only]


def overrides_of(case: Case, size: Size) -> list[str]:
    """The dlt-train keys of `case` at `size` (dummy data, no evaluation, no checkpoints)."""
    return [
        f"model={case.model}",
        "data=dummy",
        f"train.micro_batch_size={size.micro_batch(case.micro_batch)}",
        "train.grad_accum=1",
        f"train.compile={str(case.compiled).lower()}",
        f"train.activation_checkpointing={str(case.checkpointing).lower()}",
        "eval.interval=0",
        "log.progress=false",
        "run.dir=runs/bench_gpu",  # never written: the benchmark builds the parts only
        *case.overrides,
        *size.base,
    ]


def resolve(overrides: list[str]):  # -> trainer.config.Config
    from jobs.cli import compose_config, given_keys, training_dict
    from trainer.config import resolve_config

    return resolve_config(
        training_dict(compose_config("train", overrides)), given=given_keys(overrides)
    )


# ------------------------------------------------------------------------- in the worker


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Seconds between start() and stop(): CUDA events on a GPU (the device's own clock,
    no host sync inside the timed steps), the wall clock on a CPU."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self.begin.record()
        else:
            self.started = time.perf_counter()

    def stop(self) -> float:
        if not self.cuda:
            return time.perf_counter() - self.started
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1e3


def matmul_peak(size: Size) -> dict[str, Any]:
    """The best bf16 TFLOP/s of square matmuls of `size.matmul_sizes` (2 N^3 FLOPs each)."""
    import torch

    device = torch.device(size.device)
    best: dict[str, Any] = {"tflops": 0.0, "n": 0, "sizes": list(size.matmul_sizes)}
    for n in size.matmul_sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):  # warm-up: cuBLAS picks its kernel, clocks ramp up
            a @ b
        synchronize(device)
        timer = Timer(device)
        timer.start()
        for _ in range(size.matmul_iters):
            a @ b
        seconds = timer.stop() / size.matmul_iters
        tflops = 2 * n**3 / seconds / 1e12
        if tflops > best["tflops"]:
            best |= {"tflops": tflops, "n": n}
        del a, b
    return best


def measure(overrides: list[str], size: Size) -> dict[str, Any]:
    """`size.warmup` then `size.steps` timed optimizer steps of the trainer on `overrides`."""
    import torch

    from trainer import distributed
    from trainer.garbage import StepCollector
    from trainer.metrics import StepMeter, peak_memory_gib
    from trainer.stability import UpdateGuard
    from trainer.state import TrainState
    from trainer.train import build_parts, train_step

    cfg = resolve(overrides)
    world, device = distributed.init(cfg.device, cfg.train.cpu_threads)
    parts = build_parts(cfg, world, device)
    try:
        meter = StepMeter(cfg, parts.n_params, device, world.size, TrainState())
        updates = UpdateGuard(cfg.train, fp16=cfg.precision == "fp16")
        parts.pm.module.train()
        started = time.perf_counter()
        for step in range(1, size.warmup + 1):
            train_step(parts, cfg, device, meter, updates, step)
        synchronize(device)
        warmup_s = time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the timed steps' peak only
        collector = StepCollector()  # as in the training loop: no collection inside a step
        try:
            timer = Timer(device)
            timer.start()
            for step in range(size.warmup + 1, size.warmup + size.steps + 1):
                train_step(parts, cfg, device, meter, updates, step)
            seconds = timer.stop() / size.steps
        finally:
            collector.restore()
        return {
            "ms_per_step": 1e3 * seconds,
            "tokens_per_s": meter.tokens_per_step / seconds,
            "flops_per_s": meter.flops_per_step / seconds,
            "nominal_tflops": meter.peak,
            "memory_gib": peak_memory_gib(device),
            "warmup_s": warmup_s,
        }
    finally:
        parts.close()
        del parts
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_case(job: dict[str, Any], size: Size) -> dict[str, Any]:
    """One job of a worker: the matmul peak or a training case; a failure is a result."""
    import torch

    try:
        if job["kind"] == "matmul":
            return matmul_peak(size)
        return measure(job["overrides"], size)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as err:  # a row that says so, not the end of the suite
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        return {"error": f"failed: {type(err).__name__}: {first_line}"}


def worker(size_name: str, jobs_json: str) -> None:
    """Run each job in this process; one result line per job on stdout."""
    size = SIZES[size_name]
    for job in json.loads(jobs_json):
        result = run_case(job, size)
        print(RESULT + json.dumps({"id": job["id"], **result}), flush=True)


# ------------------------------------------------------------------------- in the parent


def run_jobs(jobs: list[dict[str, Any]], size_name: str, timeout: float) -> dict[int, dict]:
    """`jobs` in one worker process: each job's result by id (a worker that died or ran out of
    time leaves the rest as errors)."""
    size = SIZES[size_name]
    command = [sys.executable, "-m", "benchmarks.gpu", "--worker", size_name, json.dumps(jobs)]
    env = {**os.environ, **dict(size.env)}
    results: dict[int, dict] = {}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        out, problem = done.stdout, None
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            problem = f"failed: worker exited with {done.returncode}: {tail}"
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        problem = f"timed out after {timeout:.0f} s"
    for line in out.splitlines():
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT) :])
            results[result.pop("id")] = result
    for job in jobs:
        results.setdefault(job["id"], {"error": problem or "failed: no result"})
    return results


def plan(cases: list[Case], size: Size) -> tuple[list[dict], dict[int, int]]:
    """The jobs to run (matmul first, id 0) and, for each case, the id of the job that
    measures it: a case whose resolved config equals an earlier one's shares its job."""
    from jobs.cli import CONFIG_ERRORS
    from trainer.config import ConfigError, to_dict

    jobs: list[dict[str, Any]] = [{"id": 0, "kind": "matmul", "label": "bf16 matmul peak"}]
    measured_by: dict[int, int] = {}
    seen: dict[str, int] = {}
    for i, case in enumerate(cases, start=1):
        overrides = overrides_of(case, size)
        try:
            key = json.dumps(to_dict(resolve(overrides)), sort_keys=True, default=str)
        except (ConfigError, *CONFIG_ERRORS) as err:
            key = f"error {i}: {err}"  # the worker reports it as the row's error
        if key not in seen:
            seen[key] = i
            jobs.append({"id": i, "kind": "train", "label": case.label, "overrides": overrides})
        measured_by[i] = seen[key]
    return jobs, measured_by


def run_all(
    jobs: list[dict], size_name: str, budget_s: float, one_process: bool | None = None
) -> dict[int, dict]:
    """Every job, within `budget_s` in all (the rest become 'not run' rows): in one worker
    process, or one process per job (`one_process`, default: the size's)."""
    if SIZES[size_name].one_process if one_process is None else one_process:
        return run_jobs(jobs, size_name, timeout=budget_s)
    results: dict[int, dict] = {}
    deadline = time.perf_counter() + budget_s
    for job in jobs:
        left = deadline - time.perf_counter()
        if left < 20:
            results[job["id"]] = {"error": f"not run: the {budget_s:.0f} s budget was spent"}
            continue
        began = time.perf_counter()
        results |= run_jobs([job], size_name, timeout=min(CASE_TIMEOUT_S, left))
        print(
            f"  {job['label']}: {summary(results[job['id']])} ({time.perf_counter() - began:.0f} s)",
            flush=True,
        )
    return results


def summary(result: dict[str, Any]) -> str:
    """One job's result in a few words (the progress lines while the suite runs)."""
    if "error" in result:
        return result["error"]
    if "tflops" in result:
        return f"{result['tflops']:,.1f} TFLOP/s"
    return f"{result['tokens_per_s']:,.0f} tokens/s, {result['memory_gib']:.1f} GiB"


def percent(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "n/a"


def table(
    cases: list[Case], measured_by: dict[int, int], results: dict[int, dict], peak: dict
) -> str:
    """The markdown table: one row per case, then the matmul peak line."""
    lines = [
        "| case | tokens/s | ms/step | MFU (measured peak) | MFU (nominal peak) | "
        "peak memory (GiB) | warm-up s (compile) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    measured_tflops = peak.get("tflops")
    for i, case in enumerate(cases, start=1):
        r, source = results[measured_by[i]], measured_by[i]
        note = f"same config as: {cases[source - 1].label}" if source != i else ""
        if "error" in r:
            lines.append(f"| {case.label} | | | | | | | {r['error']} |")
            continue
        nominal = r["nominal_tflops"]
        mfu_measured = r["flops_per_s"] / (measured_tflops * 1e12) if measured_tflops else None
        mfu_nominal = r["flops_per_s"] / (nominal * 1e12) if nominal else None
        lines.append(
            f"| {case.label} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | "
            f"{percent(mfu_measured)} | {percent(mfu_nominal)} | {r['memory_gib']:.2f} | "
            f"{r['warmup_s']:.0f} | {note} |"
        )
    if "error" in peak:
        lines.append(f"\nbf16 matmul peak: {peak['error']}")
    else:
        lines.append(
            f"\nbf16 matmul peak: {peak['tflops']:,.1f} TFLOP/s measured ({peak['n']} x "
            f"{peak['n']} matmuls, the fastest of N = {peak['sizes']}; timed after warm-up)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--no-write", action="store_true", help="do not append to results.md")
    parser.add_argument("--only", help="only the cases whose label contains this text")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # SIZE JOBS_JSON
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    if problem := refusal(args.size):
        parser.error(problem)
    size = SIZES[args.size]
    cases = [c for c in active_cases(size) if not args.only or args.only in c.label]
    started = time.perf_counter()
    jobs, measured_by = plan(cases, size)
    results = run_all(jobs, args.size, args.budget_s)
    text = table(cases, measured_by, results, results[0])
    print(text)
    minutes = (time.perf_counter() - started) / 60
    print(f"(suite=gpu size={args.size}: {minutes:.1f} minutes)", flush=True)
    if args.no_write:
        return
    from benchmarks.common import append_results

    command = "python -m benchmarks.gpu " + " ".join(sys.argv[1:] if argv is None else argv)
    append_results(
        "GPU step benchmark — GPT-2 bf16, dummy data",
        command,
        f"{size.warmup} warm-up + {size.steps} timed optimizer steps per case (CUDA events); "
        "one process per case; peak memory = CUDA allocator peak over the timed steps; MFU "
        "= model FLOPs (6N + attention) / time / peak; the whole suite took "
        f"{minutes:.1f} minutes",
        text,
    )


if __name__ == "__main__":
    main()
