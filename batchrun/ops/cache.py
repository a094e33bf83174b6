"""`batchrun cache stats` and `batchrun cache clear`, and what `estimate` asks of the cache."""

from __future__ import annotations

import time
from batchrun.policy.cache_entries import cache_key, decode_entry, line_opts_out
from batchrun.state.cache_storage import CacheStats, CacheStorage, open_storage
from batchrun.state.connections import connect, is_memory, resolve_url
from batchrun.text import format_duration


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
    """Fed a file's jobs in order by `estimate`: which lines would not be sent."""

    def __init__(self, storage: CacheStorage | None, base_url: str):
        self.storage, self.base_url = storage, base_url
        self.seen: set[str] = set()
        self.from_cache = self.duplicates = self.unreadable = 0

    def served(self, url: str, body: dict, request: dict | None = None) -> str | None:
        """'cache' or 'duplicate' when the line would not be sent, else None."""
        if request is not None and line_opts_out(request):
            return None
        key = cache_key(self.base_url, url, body)
        if key in self.seen:
            self.duplicates += 1
            return "duplicate"
        self.seen.add(key)
        if self.storage is not None:
            try:
                if decode_entry(self.storage.get(key)) is not None:
                    self.from_cache += 1
                    return "cache"
            except ValueError:  # a corrupt entry serves nothing
                self.unreadable += 1
        return None
