"""The items a shard runner hands the store to end or give back leased jobs, and what it gets back.

Their fields are what complete.lua and requeue.lua read, in order (see BatchStore.complete and
BatchStore.requeue); the wire format to Lua is theirs, not these types'.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple


class OutcomeKind(str, Enum):
    """How a job ended; the value is the letter complete.lua stores and the results list starts with."""

    RESULT = "R"
    ERROR = "E"


class CompleteItem(NamedTuple):
    """A job's final outcome."""

    kind: OutcomeKind
    custom_id: str
    line: str  # the output line, JSON
    cost: float = 0.0  # USD the attempt cost
    maybe_paid: bool = False  # an error without an answer whose request may have been processed
    cached: bool = False  # a result from the response cache: ``cost`` is what it saved, not what it cost


class RequeueItem(NamedTuple):
    """A leased job given back, due again after ``delay_ms``."""

    custom_id: str
    delay_ms: int
    counts_attempt: bool  # a failed attempt: counted, and ``history`` is added to the job's history
    history: str = ""  # the attempt's history record, JSON ('' for none)
    maybe_paid: bool = False  # the request may have been processed: its worst case counts as spent


class Completed(NamedTuple):
    results: int  # results recorded
    errors: int  # errors recorded
    duplicates: int  # outcomes dropped: the job had ended already


class Requeued(NamedTuple):
    requeued: int
    earliest_due_ms: int | None  # the earliest due time among them (None: none was requeued)
