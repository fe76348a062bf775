"""Stopping on a signal without losing work.

A cluster warns before it takes the machines away: SLURM sends a signal ahead of the time
limit (`--signal`) or on preemption, and SIGTERM at the end. The handler only sets a flag
(doing real work inside a signal handler is unsafe); the training loop looks at the flag after
each step, all ranks agree with one all-reduce (any rank's signal stops everyone at the same
step), a checkpoint is written, and the run returns. Starting it again resumes exactly there.
"""

from __future__ import annotations

import signal
import threading

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
