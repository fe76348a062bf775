"""`dlt-bench [suite=all|train|layouts|prep|checkpoint|loader|loss|init|gpu] [size=smoke|full] [write=false|true]`

One entry point for every benchmark; each prints its table.

- `size=smoke` (the default): toy sizes and 1-3 steps, a minute or two on 2 cores. It checks
  that every benchmark runs; its figures are not measurements (each table says so).
- `size=full`: the measurements (`gpt2_small` and `llama_150m` in fp32 and bf16, more steps:
  long on a CPU; `suite=init`: building `gpt2_large` on one process and FSDP x2).
- `write=true` (with `size=full` only): also append the tables to benchmarks/results.md, with
  the machine, versions, date and command. Without it nothing is written.

The same command runs unchanged on a GPU node, where `size=full` gives the real figures.

`suite=gpu` (benchmarks/gpu.py) is the one-GPU step benchmark: on an H100/H200 run
`dlt-bench suite=gpu size=full write=true` (<= 8 minutes). Its `size=full` needs a CUDA GPU
(refused without one: its figures would say nothing); `size=smoke` runs its code path on a
CPU. `suite=all` leaves it out: it has its own time budget, and its cases are GPU cases.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from benchmarks import (
    checkpointing,
    gpu,
    init_memory,
    layouts,
    loader,
    loss_head,
    prep_throughput,
    train_throughput,
)

SIZES = {
    "full": {
        "train": [
            "--models",
            "tiny",
            "gpt2_small",
            "llama_150m",
            "--precisions",
            "fp32",
            "bf16",
            "--steps",
            "3",
            "--micro-batch",
            "1",
        ],
        "layouts": ["--model", "tiny", "--nproc", "2", "--steps", "10"],
        "prep": ["--mb", "50"],
        "checkpoint": ["--model", "gpt2_small"],
        "loader": ["--mb", "1000"],
        # V = 50257; 2 x 1024 tokens: the chunked loss pays off where N is large against d
        "loss": ["--tokens", "2048", "--hidden", "768", "--chunk", "512", "--iters", "2"],
        "init": ["--model", "gpt2_large", "--nproc", "2"],
        "gpu": ["--size", "full"],
    },
    "smoke": {
        "train": [
            "--models",
            "tiny",
            "llama_tiny",
            "--precisions",
            "fp32",
            "--steps",
            "1",
            "--micro-batch",
            "1",
            "model.n_layer=1",
        ],
        "layouts": ["--model", "tiny", "--nproc", "2", "--steps", "1", "--micro-batch", "2"],
        "prep": ["--mb", "0.5"],
        "checkpoint": [
            "--model",
            "tiny",
            "--steps",
            "3",
            "--disk-mb",
            "8",
            "--checksum-repeats",
            "1",
        ],
        "loader": ["--mb", "20", "--shard-mb", "2", "--seconds", "0.3"],
        "loss": [  # V=1024, a multiple of 128 already: no padded repeat
            "--tokens",
            "64",
            "--hidden",
            "32",
            "--vocab",
            "1024",
            "--chunk",
            "24",
            "--iters",
            "1",
        ],
        "init": ["--model", "tiny", "--nproc", "2"],
        "gpu": ["--size", "smoke"],
    },
}
SUITES = {
    "train": train_throughput.main,
    "layouts": layouts.main,
    "prep": prep_throughput.main,
    "checkpoint": checkpointing.main,
    "loader": loader.main,
    "loss": loss_head.main,
    "init": init_memory.main,
    "gpu": gpu.main,
}
ALL = [name for name in SUITES if name != "gpu"]  # suite=all: the GPU suite runs on its own


USAGE = "usage: " + __doc__.splitlines()[0].strip("`")
SMOKE_CAVEAT = (
    "(size=smoke: toy sizes and 1-3 steps, to check that the benchmark runs; the figures "
    "above are not measurements: dlt-bench size=full measures)"
)


def parse(argv: list[str]) -> dict[str, str]:
    """`key=value` arguments over the defaults (a one-line error, exit 2, for a bad one)."""
    options = {"suite": "all", "size": "smoke", "write": "false"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            fail(f"unknown argument {arg!r}")
        options[key] = value
    if options["suite"] not in ("all", *SUITES):
        fail(f"suite={options['suite']}: expected one of all|{'|'.join(SUITES)}")
    if options["size"] not in SIZES:
        fail(f"size={options['size']}: expected one of {'|'.join(SIZES)}")
    if options["write"] not in ("true", "false"):
        fail(f"write={options['write']}: expected true or false")
    if options["write"] == "true" and options["size"] != "full":
        fail(f"write=true needs size=full (size={options['size']} figures are not measurements)")
    if options["suite"] == "gpu" and (problem := gpu.refusal(options["size"])):
        fail(problem)
    return options


def fail(message: str) -> NoReturn:
    print(f"dlt-bench: error: {message}; {USAGE}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n" + __doc__.split("\n", 1)[1].rstrip())
        return
    options = parse(argv)
    chosen = ALL if options["suite"] == "all" else [options["suite"]]
    write = options["write"] == "true"
    for i, name in enumerate(chosen, 1):
        print(f"=== [{i}/{len(chosen)}] {name} (size={options['size']}) ===", flush=True)
        extra = [] if write else ["--no-write"]
        # options before the free-form trailing overrides some scripts accept
        SUITES[name]([*extra, *SIZES[options["size"]][name]])
        if options["size"] == "smoke":
            print(SMOKE_CAVEAT, flush=True)


if __name__ == "__main__":
    main()
