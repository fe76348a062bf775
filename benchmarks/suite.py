"""`dlt-bench [suite=all|train|layouts|prep|checkpoint] [size=full|smoke] [write=true|false]`

One entry point for every benchmark; each appends its table to benchmarks/results.md (with
the machine, versions, date and command) unless `write=false`. `size=smoke` runs everything
at toy sizes in about a minute (CI runs it; its timings mean nothing and are not written).
The same command runs unchanged on a GPU node, where `size=full` gives the real figures.
"""

from __future__ import annotations

import sys

from benchmarks import checkpointing, layouts, prep_throughput, train_throughput

SIZES = {
    "full": {
        "train": [
            "--models",
            "tiny",
            "gpt2_small",
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
    },
    "smoke": {
        "train": [
            "--models",
            "tiny",
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
        "checkpoint": ["--model", "tiny", "--steps", "3", "--disk-mb", "8"],
    },
}
SUITES = {
    "train": train_throughput.main,
    "layouts": layouts.main,
    "prep": prep_throughput.main,
    "checkpoint": checkpointing.main,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    options = {"suite": "all", "size": "full", "write": "true"}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            print(
                f"dlt-bench: error: unknown argument {arg!r}; {__doc__.splitlines()[0]}",
                file=sys.stderr,
            )
            raise SystemExit(2)
        options[key] = value
    if options["size"] not in SIZES or options["suite"] not in ("all", *SUITES):
        print(
            f"dlt-bench: error: suite={options['suite']} size={options['size']}: expected "
            f"suite in all|{'|'.join(SUITES)} and size in {'|'.join(SIZES)}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    chosen = list(SUITES) if options["suite"] == "all" else [options["suite"]]
    write = options["write"] == "true" and options["size"] == "full"
    for i, name in enumerate(chosen, 1):
        print(f"=== [{i}/{len(chosen)}] {name} ===", flush=True)
        extra = [] if write else ["--no-write"]
        args = SIZES[options["size"]][name]
        # options before the free-form trailing overrides some scripts accept
        SUITES[name]([*extra, *args])


if __name__ == "__main__":
    main()
