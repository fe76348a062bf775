"""Errors of a run that cannot go on, raised alike on every rank (the CLI prints them once)."""

from data_prep.errors import UserError


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (the loss or the weights are no longer finite numbers)."""

    same_on_every_rank = True
