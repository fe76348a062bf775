"""Errors of a run that cannot go on, raised alike on every rank (the CLI prints them once)."""


class TrainingError(RuntimeError):
    """Training cannot go on (the loss or the weights are no longer finite numbers)."""
