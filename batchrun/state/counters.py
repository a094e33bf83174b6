"""The names of the per-budget counts runners report with their other metrics (store.add_metrics),
and reading them back: the 5-second buckets (an hour of them) and a batch's running totals;
and a batch's error outcomes, for the dashboard's tally.

A runner counts in memory and reports once a second (runner/shard.py), so these names cost the
hot path one dict increment each; the dashboard and /metrics only read what is written anyway.
Names hold the budget key (``batchrun:budget:ENDPOINT:KEYFP:MODEL``), which holds colons: a
name is split on its first colons only.
"""

from __future__ import annotations

from typing import NamedTuple

from batchrun.state import keys
from batchrun.text import decoded as _s

BUCKET_SECONDS = 5  # metrics.lua's bucket width
HISTORY_SECONDS = 3600  # how far back the buckets reach (metrics.lua gives them 65 minutes)
STATUS_CLASSES = ("2xx", "4xx", "5xx", "error")  # "error": no HTTP answer (a timeout, a refused connection)


def status_class(status_code: int | None) -> str:
    """'2xx', '4xx', '5xx' or 'error' (no answer; 1xx and 3xx, which the SDK never hands back, too)."""
    if status_code is None:
        return "error"
    cls = f"{status_code // 100}xx"
    return cls if cls in STATUS_CLASSES else "error"


class CounterNames(NamedTuple):
    """One budget's counter names, made once per runner and model."""

    via: str  # requests sent under the budget (`status` reads it for the budget's limits)
    tokens: str  # tokens charged to it
    rate_limited: str  # 429s it answered
    by_class: dict[str, str]  # status class -> requests answered so


def counter_names(budget_key: str) -> CounterNames:
    return CounterNames(f"via:{budget_key}", f"tok:{budget_key}", f"rl:{budget_key}",
                        {cls: f"sc:{cls}:{budget_key}" for cls in STATUS_CLASSES})


class BudgetCount(NamedTuple):
    kind: str  # 'via', 'tok', 'rl' or 'sc'
    status_class: str  # for 'sc' only ('' otherwise)
    budget_key: str


def parse_counter(name: str) -> BudgetCount | None:
    """A per-budget counter's parts; None for the others (requests:MODEL, ended, ...)."""
    kind, _, rest = name.partition(":")
    if kind in ("via", "tok", "rl") and rest.startswith(keys.PREFIX + ":budget:"):
        return BudgetCount(kind, "", rest)
    if kind == "sc":
        cls, _, key = rest.partition(":")
        if cls in STATUS_CLASSES and key.startswith(keys.PREFIX + ":budget:"):
            return BudgetCount(kind, cls, key)
    return None


def batch_totals(redis, batch_ids: list[str]) -> list[dict[str, int]]:
    """Each batch's running totals of the named counters (what metrics.lua adds to ``…:counts``),
    in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for batch_id in batch_ids:
        pipe.hgetall(keys.sub(batch_id, "counts"))
    return [{_s(k): int(v) for k, v in h.items()} for h in (pipe.execute() if batch_ids else [])]


def read_buckets(redis, batch_ids: list[str], buckets: list[int]) -> dict[str, list[dict[str, int]]]:
    """Each batch's counts in each of ``buckets`` (bucket numbers: Redis seconds // 5), in one
    round trip; a bucket nothing was reported in (or expired) reads as {}."""
    pipe = redis.pipeline(transaction=False)
    for batch_id in batch_ids:
        for bucket in buckets:
            pipe.hgetall(keys.metrics_bucket(batch_id, bucket))
    raw = pipe.execute() if batch_ids and buckets else []
    out: dict[str, list[dict[str, int]]] = {}
    for i, batch_id in enumerate(batch_ids):
        chunk = raw[i * len(buckets):(i + 1) * len(buckets)]
        out[batch_id] = [{_s(k): int(v) for k, v in h.items()} for h in chunk]
    return out


class ErrorLines(NamedTuple):
    start: int  # the index read from (a first look, or a list made again, starts elsewhere than asked)
    next: int  # the index to read from next time
    lines: list[bytes]  # the error lines among them, without their 'E'


def error_outcomes(store, batch_id: str, start: int | None, count: int, first_look: int) -> ErrorLines:
    """The error lines among up to ``count`` of a batch's outcomes from index ``start`` (None: its
    last ``first_look`` ones), filtered in Redis (error_outcomes.lua)."""
    out = store.scripts.error_outcomes(keys=[keys.sub(batch_id, "results")],
                                       args=["" if start is None else start, count, first_look])
    return ErrorLines(int(out[0]), int(out[1]), list(out[2:]))
