"""What a run reports and where: `metrics.jsonl`, the console and `train.log`.

`metrics.jsonl` in the run directory gets one JSON object per logged step (the record of
`trainer.metrics.StepMeter`); the console gets one plain line per logged step (readable in a
SLURM log file), also appended to `train.log`; a progress bar is drawn only when stderr is a
terminal; TensorBoard and W&B get the same record (`trainer.sinks`). Only global rank 0 writes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainer.run_dir import METRICS, TRAIN_LOG, append_jsonl, read_jsonl, rewrite_jsonl


class MetricsLogger:
    """Writes `metrics.jsonl` and console lines (rank 0 only)."""

    def __init__(
        self,
        run_dir: Path,
        max_steps: int,
        start_step: int,
        enabled: bool,
        progress: bool,
        sinks: list | None = None,
    ):
        self.enabled = enabled
        self.sinks = sinks or []  # TensorBoard / W&B (trainer.sinks)
        self.max_steps = max_steps
        self.path = run_dir / METRICS
        self.text_log = run_dir / TRAIN_LOG
        self.bar = None
        if not enabled:
            return
        self._drop_records_after(start_step)
        if progress and sys.stderr.isatty():
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _drop_records_after(self, step: int) -> None:
        """On resume, forget steps logged after the checkpoint: they are about to be redone.
        A torn last line (a crash or a full disk mid-write) goes too."""
        if self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
            rewrite_jsonl(self.path, kept)

    def print(self, text: str) -> None:
        if self.enabled:
            log_line(self.text_log.parent, text, self.bar.write if self.bar else None)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, record)
        for sink in self.sinks:
            sink.log(record, record["step"])
        self.print(format_line(record, self.max_steps))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()


def log_line(run_dir: Path, text: str, show: Any = None) -> None:
    """One time-stamped line on the console (or through `show`) and in `train.log`."""
    line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}"
    with open(Path(run_dir) / TRAIN_LOG, "a") as f:
        f.write(line + "\n")
    if show is not None:
        show(line)
    else:
        print(line, flush=True)


def format_line(r: dict[str, Any], max_steps: int) -> str:
    parts = [f"step {r['step']}/{max_steps}"]
    if "loss" in r:
        parts.append(f"loss {r['loss']:.4f}")
    if "val_loss" in r:
        parts.append(f"val_loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.1f})")
    if "hellaswag_acc" in r:
        parts.append(f"hellaswag {r['hellaswag_acc']:.4f}")
    if "lr" in r:
        parts.append(f"lr {r['lr']:.2e}")
    if "grad_norm" in r:
        parts.append(f"gnorm {r['grad_norm']:.2f}")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if "memory_gib" in r:
        parts.append(f"mem {r['memory_gib']:.2f} GiB")
    return " | ".join(parts)
