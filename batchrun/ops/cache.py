"""`batchrun cache stats` and `batchrun cache clear`, and what `estimate` asks of the cache."""

from __future__ import annotations

import logging
import time

from batchrun.endpoints import configured_endpoints
from batchrun.policy.cache_entries import RequestKeys, decode_entry
from batchrun.policy.pricing import answer_cost, worst_case_cost
from batchrun.policy.tokens import estimate_tokens
from batchrun.state.cache_storage import (CACHE_FILE, CacheStats, CacheStorage, CacheUnavailable, default_cache_dir,
                                          open_storage)
from batchrun.state.connections import connect, is_memory, resolve_url
from batchrun.text import format_duration, format_usd

log = logging.getLogger("batchrun")


def storage_for(redis_url: str | None) -> CacheStorage:
    """The cache a `run` with this Redis URL uses: that Redis's, or (none configured) the local file."""
    url = resolve_url(redis_url)
    return open_storage(connect(url), "" if is_memory(url) else url)


def describe_stats(stats: CacheStats) -> list[str]:
    lines = [f"response cache: {stats.where}",
             f"  {stats.entries:,} answer{'s' if stats.entries != 1 else ''}, {stats.bytes / 1e6:,.2f} MB (compressed)"]
    if stats.oldest is not None:
        now = time.time()
        lines.append(f"  oldest stored {format_duration(max(0.0, now - stats.oldest))} ago, newest "
                     f"{format_duration(max(0.0, now - stats.newest))} ago")
    return lines


class CoverageCounter:
    """Fed a file's jobs in order by `estimate`: which lines a run would not send, and what that saves.

    A line the cache holds saves what its stored answer cost (its real usage); a line whose
    request an earlier line repeats is sent once, and saves up to its worst case."""

    def __init__(self, storage: CacheStorage | None, base_url: str, prices, endpoints=()):
        self.storage, self.base_url, self.prices = storage, base_url, prices
        self.keys = RequestKeys(base_url, endpoints)  # as a runner keys a job (runner/cached.py)
        self.seen: set[str] = set()
        self.from_cache = self.duplicates = self.unreadable = 0
        self.saved_cache = self.saved_duplicates = 0.0

    def add(self, url: str, body: dict, cache: bool = True) -> None:
        if not cache:  # the line opts out: a run sends it whatever the cache holds
            return
        model = str(body.get("model", ""))
        key = self.keys.key({"url": url, "body": body})
        price = self.prices.price_for(model)
        if key in self.seen:
            self.duplicates += 1
            if price is not None:
                est = estimate_tokens(url, body)
                self.saved_duplicates += worst_case_cost(price, est.input_tokens, est.output_tokens)
            return
        self.seen.add(key)
        if self.storage is None:
            return
        try:
            hit = decode_entry(self.storage.get(key))
        except ValueError:  # a corrupt entry serves nothing
            self.unreadable += 1
            return
        if hit is not None:
            self.from_cache += 1
            self.saved_cache += answer_cost([price], hit.body.get("usage"), 0, 0)

    def to_dict(self) -> dict:
        return {"looked_in": self.storage.where if self.storage is not None else None,
                "from_cache": self.from_cache, "saved_usd": round(self.saved_cache, 6),
                "duplicates": self.duplicates, "duplicates_saved_up_to_usd": round(self.saved_duplicates, 6)}

    def lines(self) -> list[str]:
        if self.storage is None and not self.duplicates:
            return []
        out = ["", "response cache" + (f" ({self.storage.where})" if self.storage is not None else " (not looked in)")]
        if self.storage is not None:
            out.append(f"  from the cache  {self.from_cache:,} line{'s' if self.from_cache != 1 else ''} not sent, "
                       f"saving {format_usd(self.saved_cache)} (what their stored answers cost)")
        out.append(f"  repeated        {self.duplicates:,} line{'s' if self.duplicates != 1 else ''} repeat an earlier "
                   f"line's request and take its answer, saving up to {format_usd(self.saved_duplicates)}")
        out.append("  the figures above count every line, as with --no-cache")
        return out


def estimate_coverage(redis_url: str | None, base_url: str, prices) -> CoverageCounter:
    """The counter `estimate` feeds: it looks in the cache a `run` would use (the local file only
    if it exists: an estimate writes nothing)."""
    url = resolve_url(redis_url)
    storage = None
    try:
        if not is_memory(url) or (default_cache_dir() / CACHE_FILE).exists():
            storage = storage_for(url)
    except CacheUnavailable as exc:  # the estimate goes on, as if the cache held nothing
        log.warning("%s; the estimate does not look in it", exc)
    return CoverageCounter(storage, base_url, prices, configured_endpoints())
