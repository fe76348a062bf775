"""`dlt-plot RUN_DIR... [out=DIR]`: PNG plots of one or more runs' metrics.jsonl.

    loss.png        training loss (and validation points) against step, tokens and time
    throughput.png  tokens/s (total and per device) against step
    memory.png      peak memory and parameter+gradient+optimizer bytes per device

Several runs go into the same figures, one colour each: DDP against FSDP, before against after.

A line of metrics.jsonl that cannot be plotted (torn by a crash, edited by hand, not a JSON
object, or with a `step` that is not an integer) is skipped with one warning line on stderr
naming `file:line`; the other lines are still plotted. A run with no plottable line, or an
`out=` that is a file, is a one-line error (exit status 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

from data_prep.errors import UserError
from data_prep.files import atomic_output
from jobs.cli import errors_as_one_line
from trainer.run_dir import METRICS, read_jsonl

USAGE = "usage: dlt-plot RUN_DIR [RUN_DIR ...] [out=DIR]"


class PlotError(UserError, ValueError):
    pass


def warn(message: str) -> None:
    print(f"dlt-plot: warning: {message}", file=sys.stderr)


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `<run_dir>/metrics.jsonl` with an integer step (others: a warning each)."""
    path = run_dir / METRICS
    if not path.is_file():
        raise PlotError(f"{path}: no such file (is {run_dir} a run directory?)")
    numbered, skipped = numbered_records(path)
    records = []
    for number, record in numbered:
        step = record.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            records.append(record)
        else:
            skipped[number] = f"{path}:{number}: step {step!r} is not an integer, skipped"
    for number in sorted(skipped):
        warn(skipped[number])
    if not records:
        raise PlotError(f"{path}: no logged steps (yet)")
    return records


def numbered_records(path: Path) -> tuple[list[tuple[int, dict]], dict[int, str]]:
    """`read_jsonl`'s records of `path` with their line numbers, and why each other line was
    skipped (line number -> message)."""
    skipped: dict[int, str] = {}

    def on_bad_line(message: str) -> None:  # "path:N: why"
        skipped[int(message.removeprefix(f"{path}:").split(":", 1)[0])] = message

    records = read_jsonl(path, on_bad_line)
    with open(path, encoding="utf-8", errors="replace") as f:  # the lines read_jsonl kept
        numbers = [n for n, line in enumerate(f, start=1) if line.strip() and n not in skipped]
    return list(zip(numbers, records, strict=False)), skipped  # a line appended since: no record


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise PlotError(f"out={out}: is a file, expected a folder")


def series(records: list[dict], x: str, y: str) -> tuple[list, list]:
    """The (x, y) points of the records where both are numbers."""
    points = [(r.get(x), r.get(y)) for r in records]
    points = [p for p in points if all(map(is_number, p))]
    return [p[0] for p in points], [p[1] for p in points]


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_runs(runs: dict[str, list[dict]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for (name, records), color in zip(runs.items(), plt.cm.tab10.colors, strict=False):
        for ax, x, label in zip(
            axes, ("step", "tokens", "elapsed_s"), ("step", "tokens", "seconds"), strict=True
        ):
            ax.plot(*series(records, x, "loss"), color=color, label=f"{name} train")
            vx, vy = series(records, x, "val_loss")
            if vx:
                ax.plot(vx, vy, "o--", color=color, label=f"{name} val")
            ax.set_xlabel(label)
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=8)
    fig.suptitle("loss")
    fig.tight_layout()
    written.append(_save(fig, out / "loss.png"))

    written.append(
        _lines(
            runs,
            out / "throughput.png",
            "tokens/s",
            ("tokens_per_s", "total"),
            ("tokens_per_s_per_device", "per device"),
        )
    )
    written.append(
        _lines(
            runs,
            out / "memory.png",
            "GiB per device (max over devices)",
            ("memory_gib", "peak"),
            ("state_gib", "params+grads+optimizer"),
        )
    )
    return written


def _lines(
    runs: dict[str, list[dict]],
    path: Path,
    ylabel: str,
    solid: tuple[str, str],
    dashed: tuple[str, str],
) -> Path:
    """One figure against step: `solid` and `dashed` (key, label) per run, a colour per run."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, records), color in zip(runs.items(), plt.cm.tab10.colors, strict=False):
        for (key, label), style in ((solid, "-"), (dashed, "--")):
            x, y = series(records, "step", key)
            if x:
                ax.plot(x, y, style, color=color, label=f"{name} {label}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:  # a run may lack these metrics
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:  # the format from the final name, not from `.tmp`
        fig.savefig(tmp, dpi=110, format=path.suffix.removeprefix("."))
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        print(__doc__)
        return
    out = None
    dirs = []
    for arg in argv:
        if arg.startswith("out="):
            out = Path(arg.removeprefix("out="))
        else:
            dirs.append(Path(arg))
    with errors_as_one_line("dlt-plot"):
        if not dirs:
            raise PlotError("no run directory given")
        out = out or dirs[0] / "plots"
        check_out(out)
        runs = {d.name or str(d): read_metrics(d) for d in dirs}
        written = plot_runs(runs, out)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
