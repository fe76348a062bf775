"""Errors of a run that cannot go on, raised alike on every rank (the CLI prints them once)."""

from data_prep.errors import UserError


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (the loss or the weights are no longer finite numbers)."""

    same_on_every_rank = True


class CollectiveTimeout(TrainingError):
    """A collective waited longer than `dist.timeout_s`: a rank stopped answering."""

    # Raised by the ranks that waited, which may not include rank 0 (rank 0 may be the one
    # that stopped): each prints its line.
    same_on_every_rank = False
    # Another thread may still wait inside a collective (an asynchronous checkpoint's), and
    # the interpreter would join it at exit: the process ends at once after the line.
    exit_at_once = True
