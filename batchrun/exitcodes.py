"""Exit codes of `run`, `resume` and `collect` (documented in the README).

Usage errors exit 2: click's own, and bad option values batchrun checks itself; no outcome of a
batch (a pause in particular) reuses that code.
"""

from __future__ import annotations

import enum

from batchrun.state.states import BatchState


class Exit(enum.IntEnum):
    OK = 0  # the batch finished and every job has a result
    ERROR = 1  # batchrun could not do what was asked (bad file, unwritable path, Redis unreachable, ...)
    USAGE = 2  # click: an unknown option or a bad value
    SOME_FAILED = 3  # the batch finished, and some jobs (or all) are in the errors file
    NOT_FINISHED = 4  # paused, cancelled, or stopped with work left: a printed command continues it
    INTERRUPTED = 130  # Ctrl-C


def for_state(state: str, failed: int) -> Exit:
    """The exit code for a batch in ``state`` with ``failed`` jobs in its errors file."""
    if state != BatchState.FINISHED:
        return Exit.NOT_FINISHED
    return Exit.SOME_FAILED if failed else Exit.OK
