"""A rank that stops answering ends the run with one line, instead of holding the allocation.

Every collective waits for every rank. When one rank stops (a stuck kernel, a dead node, a
process stopped by a debugger) the others wait inside their next collective until
`dist.timeout_s` has passed; then:

- on gloo the waiting ranks raise ("Timed out waiting 20000ms for recv operation"), which
  :func:`timeouts_end_the_run` turns into a :class:`~trainer.errors.CollectiveTimeout`, e.g.
  `collective timed out after 20 s (dist.timeout_s=20) on rank 0, after step 6: rank 1 of 2
  did not answer`. The CLI prints it and exits with status 2: a failure, never requeued.
- under NCCL the watchdog thread of each waiting rank dumps its flight recorder and ends the
  process (jobs/node.py sets both up); torchrun then stops the others.

The timeout itself does not say whom a rank waited for (a ring all-reduce waits for its
neighbour). :func:`unanswered_ranks` asks instead: every rank that timed out writes its rank
into the job's store (the TCP key-value store the ranks met at); the ranks that have not
written within a grace period are the ones that stopped answering.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import time
from collections.abc import Callable, Iterator

import torch.distributed as dist

from trainer.errors import CollectiveTimeout

# gloo: "Timed out waiting 3000ms for recv operation to complete", "Application timeout caused
# pair closure"; NCCL (blocking wait): "Watchdog caught collective operation timeout".
TIMEOUT_MESSAGE = re.compile(r"timed out|timeout", re.IGNORECASE)
STORE_KEY = "dlt/timed_out/rank_{}"


def grace_s(timeout_s: float) -> float:
    """How long a rank that timed out waits to hear from the others that time out too: the
    healthy ranks entered the collective at slightly different moments."""
    return min(30.0, max(2.0, timeout_s / 10))


def is_collective_timeout(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and bool(TIMEOUT_MESSAGE.search(str(err)))


@contextlib.contextmanager
def timeouts_end_the_run(timeout_s: float, last_step: Callable[[], int | None]) -> Iterator[None]:
    """A collective's timeout inside becomes one :class:`CollectiveTimeout` line naming the
    timeout, this rank, the last step it finished (`last_step()`) and the ranks that did not
    answer. Anything else passes through."""
    try:
        yield
    except RuntimeError as err:
        if not dist.is_initialized() or not is_collective_timeout(err):
            raise
        step = last_step()
        where = f"after step {step}" if step is not None else "before the first step"
        missing = unanswered_ranks(grace_s(timeout_s))
        raise CollectiveTimeout(
            f"collective timed out after {timeout_s:g} s (dist.timeout_s={timeout_s:g}) on "
            f"rank {dist.get_rank()}, {where}: {describe_missing(missing)}"
        ) from err


def describe_missing(missing: list[int] | None) -> str:
    """`rank 1 of 2 did not answer`, or why the ranks are not known."""
    size = dist.get_world_size()
    if missing is None:
        return (
            f"the job's store did not answer either (jobs/node.py has rank 0 host it): rank 0 "
            f"of {size} is stuck or gone"
        )
    if not missing:
        return f"every one of the {size} ranks timed out waiting (a collective they disagree on?)"
    ranks = "rank" if len(missing) == 1 else "ranks"
    return f"{ranks} {', '.join(map(str, missing))} of {size} did not answer"


def unanswered_ranks(grace: float) -> list[int] | None:
    """The ranks that have not said within `grace` seconds that they timed out too (this rank
    says so first). None when the store does not answer (it lives in rank 0's process)."""
    store = dist.distributed_c10d._get_default_store()
    size = dist.get_world_size()
    missing: list[int] | None = None
    try:
        store.set_timeout(datetime.timedelta(seconds=grace))
        store.set(STORE_KEY.format(dist.get_rank()), "1")
        deadline = time.monotonic() + grace
        while True:
            missing = [r for r in range(size) if not store.check([STORE_KEY.format(r)])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except RuntimeError:  # the store timed out or its host is gone
        return missing
