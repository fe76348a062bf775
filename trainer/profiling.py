"""`profile.enabled=true`: a torch.profiler trace of a few optimizer steps, per rank.

The window is optimizer steps `start_step .. start_step + steps - 1` (counted from 1, as in
metrics.jsonl). Each rank writes into `<run.dir>/profile/`:

- `trace_rank<R>_steps_<N>-<M>.json`: a Chrome/Perfetto trace (open it in
  https://ui.perfetto.dev or chrome://tracing): CPU ops, and on a GPU its kernels, each step
  under a `train_step <n>` range;
- on a GPU also `memory_rank<R>_steps_<N>-<M>.pickle`: a CUDA memory snapshot (every
  allocation of the window with its stack; drag it into https://pytorch.org/memory_viz).

Profiling only observes: the steps compute exactly what they would without it. A run that
starts (or resumes) after `start_step` does not profile, nor does one that stops inside the
window (its trace would be of fewer steps than asked).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from data_prep.files import atomic_output
from trainer.config import ProfileConfig

FOLDER = "profile"  # under the run directory
MEMORY_EVENTS = 100_000  # allocation events the CUDA memory history keeps (several KB each)


def window_name(kind: str, rank: int, first: int, last: int, suffix: str) -> str:
    return f"{kind}_rank{rank}_steps_{first}-{last}.{suffix}"


class StepProfiler:
    """Starts the profiler before the window's first step and writes its files after the
    last; every other step costs two integer comparisons."""

    def __init__(
        self,
        cfg: ProfileConfig,
        run_dir: Path,
        rank: int,
        device: torch.device,
        start_step: int,
        note: Callable[[str], None],
    ):
        self.first, self.last = cfg.start_step, cfg.start_step + cfg.steps - 1
        self.folder, self.rank, self.device, self.note = run_dir / FOLDER, rank, device, note
        self.enabled = cfg.enabled and start_step < self.first  # the whole window is ahead
        if cfg.enabled and not self.enabled:
            note(
                f"profile: not profiling: the window (steps {self.first}-{self.last}) starts "
                f"before this run's first step {start_step + 1}"
            )
        self.profiler: profile | None = None
        self.step_range: record_function | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def before(self, step: int) -> None:
        """Optimizer step `step` is about to run."""
        if not self.enabled or not self.first <= step <= self.last:
            return
        if step == self.first:
            self.start()
        self.step_range = record_function(f"train_step {step}")
        self.step_range.__enter__()

    def after(self, step: int) -> None:
        """Optimizer step `step` has run (its update applied or skipped)."""
        if self.step_range is None:
            return
        self.step_range.__exit__(None, None, None)
        self.step_range = None
        if step == self.last:
            self.write()

    def start(self) -> None:
        if self.cuda:  # every allocation from here on, with its Python stack (a C++ stack per
            # allocation too would slow the very steps the profiler times)
            torch.cuda.memory._record_memory_history(stacks="python", max_entries=MEMORY_EVENTS)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # record_shapes: each op's input shapes (which matmul is which), for little overhead.
        # with_stack stays off: a Python stack per op multiplies the trace's size and slows
        # the profiled steps; the train_step ranges, module names of compiled code and the
        # memory snapshot's stacks locate the work well enough.
        self.profiler = profile(activities=activities, record_shapes=True, with_stack=False)
        self.profiler.start()

    def write(self) -> None:
        """Stop recording; write this rank's trace (and memory snapshot), each atomically."""
        self.profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / window_name("trace", self.rank, self.first, self.last, "json")
        with atomic_output(trace) as tmp:
            self.profiler.export_chrome_trace(str(tmp))
        self.profiler = None
        written = f"trace {trace.name}"
        if self.cuda:
            memory = self.folder / window_name("memory", self.rank, self.first, self.last, "pickle")
            with atomic_output(memory) as tmp:
                torch.cuda.memory._dump_snapshot(str(tmp))
            torch.cuda.memory._record_memory_history(enabled=None)  # stop recording
            written += f" + CUDA memory snapshot {memory.name} (pytorch.org/memory_viz)"
        self.note(
            f"profile: steps {self.first}-{self.last} recorded into {self.folder} ({written}, "
            "one per rank; open a trace in ui.perfetto.dev)"
        )

    def close(self) -> None:
        """The run ends: a window still open (the run stopped inside it) is discarded."""
        if self.step_range is not None:
            self.step_range.__exit__(None, None, None)
            self.step_range = None
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
            if self.cuda:
                torch.cuda.memory._record_memory_history(enabled=None)
            self.note(f"profile: the run stopped inside steps {self.first}-{self.last}: no trace")
