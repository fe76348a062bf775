"""Stopping on a signal without losing work.

A cluster warns before it takes the machines away: SLURM sends a signal ahead of the time
limit (`--signal`) or on preemption, and SIGTERM at the end. The handler only sets a flag
(doing real work inside a signal handler is unsafe); the training loop looks at the flag after
each step, all ranks agree with one all-reduce (any rank's signal stops everyone at the same
step; a CPU tensor over gloo, so the GPU never waits for it), a checkpoint is written, and the
run returns. Starting it again resumes exactly there.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

# USR1: our sbatch script's --signal; USR2: submitit's; TERM: the end of the time limit;
# INT: Ctrl-C (a second Ctrl-C aborts at once, without a checkpoint).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
_ctrl_c = 0  # SIGINTs this process has received (the early handler and the loop's share it)


class StopOnSignal:
    """Callable as `stop_requested(step)`: True once one of `signals` has arrived."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.received: signal.Signals | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        global _ctrl_c
        if signum == signal.SIGINT:
            _ctrl_c += 1
            if _ctrl_c > 1:  # the second Ctrl-C in this process (whichever handler saw the first)
                raise KeyboardInterrupt
        self.received = signal.Signals(signum)

    def __call__(self, step: int) -> bool:
        return self.received is not None

    def restore(self) -> None:
        """Put back the handlers that were there before (and forget an earlier Ctrl-C)."""
        global _ctrl_c
        _ctrl_c = 0
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class StopController:
    """After each step: stop now? The one place that decides, on every rank alike.

    A stop comes from a signal (this process's :class:`StopOnSignal`: the launcher's, installed
    early so that none is lost during start-up, or one of its own) or from
    `requested(step)` (tests, benchmarks). Any rank's reason stops every rank at the same
    step: the flag is all-reduced, so the ranks save the same checkpoint together. The flag is
    a CPU tensor whatever the training device (:func:`trainer.distributed.broadcast_flag`).
    """

    def __init__(
        self,
        world_size: int,
        requested: Callable[[int], bool] | None = None,
        signals: StopOnSignal | None = None,
    ):
        from trainer.distributed import broadcast_flag  # torch: not at this module's import

        self.world_size, self.requested = world_size, requested
        self._any_rank = broadcast_flag
        self._owns_signals = signals is None
        self.signals = signals if signals is not None else StopOnSignal()
        self.reason: str | None = None  # why the run stops early, once it does
        self.last_step: int | None = None  # the last step boundary this rank reached

    def __call__(self, step: int) -> bool:
        """Collective: True on every rank if any rank wants to stop after `step`."""
        self.last_step = step
        received = self.signals.received
        stop = received is not None or (self.requested is not None and self.requested(step))
        if self.world_size > 1:
            stop = self._any_rank(stop)
        if stop:
            self.reason = f"signal {received.name}" if received else "stop requested"
        return stop

    def close(self) -> None:
        """Put back the previous signal handlers (only those this controller installed)."""
        if self._owns_signals:
            self.signals.restore()
