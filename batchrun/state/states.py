"""The states a batch is in, and why a paused one paused, as Redis holds them.

The Lua scripts write these values as plain strings (``state`` and ``pause_kind`` in the
batch hash): the enums' values are the contract between them and Python. Both are
``str`` enums so that a value read from Redis compares equal to its member, and
``__str__``/``__format__`` give the bare value (f-strings and JSON stay the same on
every Python from 3.10, whose ``format()`` of a mixed-in enum differs from 3.12's).
"""

from __future__ import annotations

from enum import Enum


class _StoredText(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, text: object):
        """The member stored as ``text`` (bytes or str), or None for nothing or an unknown value."""
        if isinstance(text, bytes):
            text = text.decode()
        try:
            return cls(text)
        except ValueError:
            return None


class BatchState(_StoredText):
    RUNNING = "running"  # runners lease and send its jobs
    PAUSED = "paused"  # nothing is sent until `resume` (see the batch's reason and pause_kind)
    FINISHED = "finished"  # every job ended (complete.lua); new jobs make it run again
    CANCELLED = "cancelled"  # by the user or a purge: nothing more is sent
    MISSING = "missing"  # lease.lua's answer for a batch without a hash (purged); never stored

    @property
    def ended(self) -> bool:
        """Its keys get their expiry (expire_batch.lua) and it leaves the active set."""
        return self in (BatchState.FINISHED, BatchState.CANCELLED)


class PauseKind(_StoredText):
    COST_CAP = "cost_cap"  # the next job would cross --max-cost (reserve_cost.lua): resume with a higher one


# The states a batch hash holds (MISSING is only ever an answer).
STORED_STATES = frozenset(s for s in BatchState if s is not BatchState.MISSING)
