"""`dlt-plot RUN_DIR... [out=DIR]`: PNG plots of one or more runs' metrics.jsonl.

    loss.png        training loss (and validation points) against step, tokens and time
    throughput.png  tokens/s (total and per device) against step
    memory.png      peak memory and parameter+gradient+optimizer bytes per device

Several runs go into the same figures, one colour each: DDP against FSDP, before against after.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

USAGE = "usage: dlt-plot RUN_DIR [RUN_DIR ...] [out=DIR]"


class PlotError(ValueError):
    pass


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: no such file (is {run_dir} a run directory?)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise PlotError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict) or "step" not in record:
            raise PlotError(f"{path}:{number}: expected an object with a 'step'")
        records.append(record)
    if not records:
        raise PlotError(f"{path}: empty (no logged steps yet)")
    return records


def series(records: list[dict], x: str, y: str) -> tuple[list, list]:
    points = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in points], [p[1] for p in points]


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
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
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
    try:
        if not dirs:
            raise PlotError("no run directory given")
        runs = {d.name or str(d): read_metrics(d) for d in dirs}
        written = plot_runs(runs, out or dirs[0] / "plots")
    except PlotError as err:
        print(f"dlt-plot: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
