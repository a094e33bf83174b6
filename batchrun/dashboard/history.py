"""The last hour, minute by minute: each budget's requests, tokens and 429s, and each batch's
requests and jobs ended, summed from the 5-second buckets the runners write anyway
(state/counters.py). Nothing is written for this: a bucket that has closed never changes
again, so it is read once and kept here; each refresh reads only the open ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batchrun.state.counters import BUCKET_SECONDS, HISTORY_SECONDS, parse_counter, read_buckets
from batchrun.state.store import BatchStore

MINUTE_BUCKETS = 60 // BUCKET_SECONDS
MINUTES = HISTORY_SECONDS // 60
# Buckets this close to now may still get a report (a runner's call queued behind another): re-read.
OPEN_BUCKETS = 2


@dataclass
class Series:
    """Per minute, oldest first; ``minutes[i]`` is the unix time its minute starts."""

    minutes: list[int]
    values: dict[str, list[int]] = field(default_factory=dict)

    def add(self, name: str, i: int, n: int) -> None:
        self.values.setdefault(name, [0] * len(self.minutes))[i] += n

    def to_dict(self) -> dict:
        return {"minutes": self.minutes, **self.values}


class BucketHistory:
    """Closed buckets kept in memory (at most an hour of each batch's), read once each."""

    def __init__(self) -> None:
        self._closed: dict[tuple[str, int], dict[str, int]] = {}

    def buckets(self, store: BatchStore, batch_ids: list[str], now_ms: int) -> dict[int, dict[str, dict[str, int]]]:
        """bucket -> batch_id -> its counts, over the last hour's whole minutes and this one."""
        current = now_ms // 1000 // BUCKET_SECONDS
        first = (current // MINUTE_BUCKETS - MINUTES + 1) * MINUTE_BUCKETS
        wanted = range(first, current + 1)
        # (by age only: a batch page's call must not drop what the overview keeps)
        self._closed = {k: v for k, v in self._closed.items() if k[1] >= first}
        missing: dict[str, list[int]] = {}
        for batch_id in batch_ids:
            missing[batch_id] = [b for b in wanted if (batch_id, b) not in self._closed]
        out: dict[int, dict[str, dict[str, int]]] = {b: {} for b in wanted}
        for batch_id, buckets in missing.items():
            for bucket, counts in zip(buckets, read_buckets(store.redis, [batch_id], buckets)[batch_id]):
                if bucket < current - OPEN_BUCKETS:
                    self._closed[batch_id, bucket] = counts
                out[bucket][batch_id] = counts
        wanted_ids = set(batch_ids)
        for (batch_id, bucket), counts in self._closed.items():
            if batch_id in wanted_ids:
                out[bucket][batch_id] = counts
        return out


def minute_series(buckets: dict[int, dict[str, dict[str, int]]]) -> tuple[dict[str, Series], dict[str, Series]]:
    """(per budget key, per batch) series: a budget's requests, tokens, rate_limited and the
    retries of the batches that drew from it; a batch's requests, ended, rate_limited, retries."""
    first = min(buckets)
    minutes = [(first + i * MINUTE_BUCKETS) * BUCKET_SECONDS for i in range(MINUTES)]
    by_budget: dict[str, Series] = {}
    by_batch: dict[str, Series] = {}
    for bucket, per_batch in buckets.items():
        i = min(MINUTES - 1, (bucket - first) // MINUTE_BUCKETS)
        for batch_id, counts in per_batch.items():
            if not counts:
                continue
            series = by_batch.setdefault(batch_id, Series(minutes))
            for name in ("requests", "ended", "rate_limited", "retries"):
                series.add(name, i, counts.get(name, 0))
            _add_budgets(by_budget, minutes, i, counts)
    return by_budget, by_batch


def _add_budgets(by_budget: dict[str, Series], minutes: list[int], i: int, counts: dict[str, int]) -> None:
    drew_from = []
    for name, n in counts.items():
        parsed = parse_counter(name)
        if parsed is None:
            continue
        series = by_budget.setdefault(parsed.budget_key, Series(minutes))
        kind = {"via": "requests", "tok": "tokens", "rl": "rate_limited"}.get(parsed.kind)
        if kind:
            series.add(kind, i, n)
        if parsed.kind == "via":
            drew_from.append(series)
    for series in drew_from:
        series.add("retries", i, counts.get("retries", 0))
