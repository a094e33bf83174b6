"""The states a batch is in, and why a paused one paused, as Redis holds them.

The Lua scripts write these values as plain strings (``state`` and ``pause_kind`` in the
batch hash): the enums' values are the contract between them and Python. Both are
``str`` enums (``batchrun.enums.StoredText``). ``PauseKind`` is policy's (``policy/decision.py``):
reserve_cost.lua writes ``cost_cap``, the runner the kind its decision paused for.
"""

from __future__ import annotations

from batchrun.enums import StoredText
from batchrun.policy.decision import PauseKind  # one enum of why a batch paused; Lua writes COST_CAP


class BatchState(StoredText):
    RUNNING = "running"  # runners lease and send its jobs
    PAUSED = "paused"  # nothing is sent until `resume` (see the batch's reason and pause_kind)
    FINISHED = "finished"  # every job ended (complete.lua); new jobs make it run again
    CANCELLED = "cancelled"  # by the user or a purge: nothing more is sent
    MISSING = "missing"  # lease.lua's answer for a batch without a hash (purged); never stored

    @property
    def ended(self) -> bool:
        """Its keys get their expiry (expire_batch.lua) and it leaves the active set."""
        return self in (BatchState.FINISHED, BatchState.CANCELLED)


# The states a batch hash holds (MISSING is only ever an answer).
STORED_STATES = frozenset(s for s in BatchState if s is not BatchState.MISSING)

__all__ = ["STORED_STATES", "BatchState", "PauseKind"]
