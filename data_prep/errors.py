"""The one base class of the errors a user can fix.

Every such error (a config key, a dataset, a checkpoint, a locked run directory, ...) derives
from :class:`UserError` and says what is wrong in one line, naming the key or file; the
command-line edge (`jobs/cli.py`) prints it as `dlt-<command>: error: <line>` and exits with
status 2. Anything else is a bug and keeps its traceback. (data_prep is the bottom layer, so
the base lives here: trainer and jobs import it, not the other way round.)
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix, described in one line."""

    # True when every rank of a job raises it alike (a config key, a locked run directory):
    # under torchrun only rank 0 prints it.
    same_on_every_rank = False
