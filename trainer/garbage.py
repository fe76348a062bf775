"""Python's garbage collector kept out of the training step.

CPython's cyclic collector starts by itself whenever enough new objects have been allocated,
at any point of a step, and a full collection walks every tracked object (tens to hundreds
of milliseconds in a process holding torch). On one rank that is a stall; with many ranks
each stalls at a different moment and every collective waits for the slowest, every step.
So during the loop the automatic collector is off and the young generations are collected
on log steps only, at the same step on every rank (all of them after a checkpoint). Reference counting still frees almost
everything at once; only reference cycles wait for the next log step.
"""

from __future__ import annotations

import gc


class StepCollector:
    """Automatic collection off until :meth:`restore`; :meth:`collect` on log steps."""

    def __init__(self) -> None:
        self.was_enabled = gc.isenabled()
        gc.disable()
        gc.collect(1)  # start the loop with the young generations empty

    def collect(self, full: bool = False) -> None:
        """Collect generations 0 and 1: the cycles made since the last log step (cheap; the
        oldest generation, most of the process, is not walked). `full`: every generation,
        after a checkpoint (a slow step anyway), so that a cycle which outlived one log step
        and was promoted to the oldest generation is freed too, not only at the end."""
        gc.collect(2 if full else 1)

    def restore(self) -> None:
        """The collector as it was before the loop."""
        if self.was_enabled:
            gc.enable()
