"""Jobs ended and jobs left, from a batch's counts (``BatchStore.counts``) or its meta hash,
whose values Redis returns as text."""

from __future__ import annotations

from collections.abc import Mapping


def _count(counts: Mapping[str, object], name: str) -> int:
    return int(counts.get(name) or 0)


def jobs_ended(counts: Mapping[str, object]) -> int:
    """Jobs with an outcome: a result (done) or an error (failed)."""
    return _count(counts, "done") + _count(counts, "failed")


def jobs_left(counts: Mapping[str, object]) -> int:
    """Jobs of the batch without an outcome yet (never below 0)."""
    return max(0, _count(counts, "total") - jobs_ended(counts))
