"""What the output head costs: final norm + lm_head + cross-entropy, forward and backward.

Variants, each on the same hidden states (`--tokens` x `--hidden`, fp32) and GPT-2's
vocabulary (V=50257) unpadded and padded to 50304 (`model.pad_vocab_to_multiple=128`):

- loss only: the cross-entropy of given (N, V) logits, eager vs `torch.compile`d (the part
  `train.compile_loss` fuses: fp32 cast, log-softmax, gather, and their backward);
- head + loss: trainer/models/head.py's `head_loss` eager, compiled (`fullgraph=True`, what
  `train.compile_loss` installs), chunked (`model.loss_chunk_size`) eager and compiled.

Time: the median of `--iters` forward+backward passes after a warm-up (compilation is not
counted). Peak memory: the largest, over those passes, of what a pass adds: on CPU the rise
of the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs before
each pass) over its resident set at the start; on CUDA `max_memory_allocated` over the
memory allocated at the start. Inputs and weights exist (and the previous pass's gradients
are dropped) before the start, so the figure is what the pass itself allocates.
Run: `dlt-bench suite=loss [size=full]`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from benchmarks.common import append_results
from trainer.models.head import head_loss
from trainer.models.loss import lm_loss

GPT2_VOCAB = 50257


class Step(NamedTuple):
    """One variant: `clear` drops the gradients of the last pass (before measuring, so the
    memory they free is not counted against the pass), `run` is one forward + backward."""

    clear: Callable[[], None]
    run: Callable[[], None]


def _proc_status(field: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_step(step: Step, iters: int, device: torch.device) -> tuple[float, int]:
    """(median ms, peak bytes added) of `iters` passes of `step` (see the module doc)."""
    times, peaks = [], []
    for _ in range(iters):
        step.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
            base = _proc_status("VmRSS")
        start = time.perf_counter()
        step.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        top = torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_status("VmHWM")
        peaks.append(top - base)
    return statistics.median(times), max(peaks)


def loss_only(logits: torch.Tensor, targets: torch.Tensor, compiled: bool) -> Step:
    fn = torch.compile(lm_loss, fullgraph=True) if compiled else lm_loss

    def clear() -> None:
        logits.grad = None

    return Step(clear, lambda: fn(logits, targets, 0.0).ce.backward())


def head(
    norm: nn.Module,
    out: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    vocab: int,
    chunk: int,
    compiled: bool,
) -> Step:
    fn = torch.compile(head_loss, fullgraph=True) if compiled else head_loss

    def clear() -> None:
        x.grad = out.weight.grad = norm.weight.grad = norm.bias.grad = None

    return Step(clear, lambda: fn(norm, out, x, targets, 0.0, vocab, chunk).ce.backward())


def variants(args, padded: int, device: torch.device) -> dict[str, Step]:
    g = torch.Generator().manual_seed(0)
    n, d, v = args.tokens, args.hidden, args.vocab
    x = torch.randn(1, n, d, generator=g).to(device).requires_grad_()  # (B, T, d) as in a model
    targets = torch.randint(v, (1, n), generator=g).to(device)
    norm = nn.LayerNorm(d).to(device)
    out = nn.Linear(d, padded, bias=False).to(device)
    nn.init.normal_(out.weight, std=0.02)
    logits = (torch.randn(1, n, v, generator=g) * 2).to(device).requires_grad_()
    steps = {
        "loss only, eager": loss_only(logits, targets, compiled=False),
        "loss only, compiled": loss_only(logits, targets, compiled=True),
        "head + loss, eager": head(norm, out, x, targets, v, 0, compiled=False),
        "head + loss, compiled": head(norm, out, x, targets, v, 0, compiled=True),
        f"head + loss, chunked {args.chunk}": head(norm, out, x, targets, v, args.chunk, False),
        f"head + loss, chunked {args.chunk}, compiled": head(
            norm, out, x, targets, v, args.chunk, True
        ),
    }
    if padded != v:  # the loss-only rows see no output layer: padding is no change
        steps = {k: v for k, v in steps.items() if not k.startswith("loss only")}
    return steps


def measure(args, device: torch.device) -> list[tuple[str, int, float, int]]:
    """(variant, output rows, ms, peak bytes) for every variant and both vocabularies."""
    rows = []
    padded = -(-args.vocab // 128) * 128
    for vocab_rows in dict.fromkeys((args.vocab, padded)):  # once if already a multiple
        for name, step in variants(args, vocab_rows, device).items():
            step.clear()
            step.run()  # warm-up (compiles)
            rows.append((name, vocab_rows, *measure_step(step, args.iters, device)))
            print(f"  {name}, V={vocab_rows}: {rows[-1][2]:.1f} ms", flush=True)
    return rows


def table(rows: list[tuple[str, int, float, int]]) -> str:
    """Markdown rows; speed-up and memory against the first (eager, unpadded) row of the
    same group ("loss only", "head + loss")."""
    base: dict[str, tuple[float, int]] = {}
    lines = [
        "| variant | output rows | ms (fwd+bwd) | speed-up | peak MiB | peak vs eager |",
        "|---|---|---|---|---|---|",
    ]
    for name, vocab_rows, ms, peak in rows:
        group = name.split(",")[0]
        base.setdefault(group, (ms, peak))
        ms0, peak0 = base[group]
        lines.append(
            f"| {name} | {vocab_rows} | {ms:.1f} | {ms0 / ms:.2f}x | {peak / 2**20:,.0f} | "
            f"{peak / peak0 if peak0 >= 2**20 else float('nan'):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="N: tokens of the micro-batch")
    parser.add_argument("--hidden", type=int, default=768, help="d (gpt2_small: 768)")
    parser.add_argument("--vocab", type=int, default=GPT2_VOCAB, help="V (real vocabulary)")
    parser.add_argument("--chunk", type=int, default=128, help="model.loss_chunk_size")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = table(measure(args, device))
    print(result)
    if not args.no_write:
        append_results(
            "Output head: compiled and chunked loss, padded vocabulary",
            "dlt-bench suite=loss size=full write=true",
            f"{args.tokens} tokens x hidden {args.hidden}, fp32, V={args.vocab} (and padded to "
            f"a multiple of 128); median of {args.iters} passes after a warm-up; "
            f"{args.threads} torch thread(s); peak = memory the pass adds (see "
            "benchmarks/loss_head.py)",
            result,
        )


if __name__ == "__main__":
    main()
