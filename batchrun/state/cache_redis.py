"""The response cache in Redis: shared by every worker of the fleet.

Keys (one hash tag, so that a cluster keeps them in one slot for the Lua scripts):

=================================  ======  ==========================================
``batchrun:{cache}:e:HASH``        string  the entry (compressed), expiring by itself
``batchrun:{cache}:index``         zset    HASH -> expiry ms (eviction order)
``batchrun:{cache}:sizes``         hash    HASH -> "bytes stored_ms"
``batchrun:{cache}:bytes``         string  the bytes the entries hold, for the bound
``batchrun:{cache}:sending:HASH``  string  the runner sending that request now (dedupe)
=================================  ======  ==========================================
"""

from __future__ import annotations

import time

from batchrun.state.cache_storage import CacheStats
from batchrun.state.scripts import Scripts
from batchrun.urls import mask_url

PREFIX = "batchrun:{cache}:"
ENTRY = PREFIX + "e:"
INDEX = PREFIX + "index"
SIZES = PREFIX + "sizes"
BYTES = PREFIX + "bytes"
SENDING = PREFIX + "sending:"
_CHUNK = 500  # hashes per cache_delete call


class RedisCacheStorage:
    def __init__(self, redis, url: str = ""):
        self.redis = redis
        self.scripts = Scripts(redis)
        self.where = f"Redis {mask_url(url)}" if url else "Redis"

    def get(self, key: str) -> bytes | None:
        return self.redis.get(ENTRY + key)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for i in range(0, len(keys), _CHUNK):
            part = keys[i:i + _CHUNK]
            found.update((k, v) for k, v in zip(part, self.redis.mget([ENTRY + k for k in part])) if v is not None)
        return found

    def put(self, key: str, value: bytes, ttl_seconds: float, max_bytes: int) -> bool:
        ttl_ms = max(1, int(ttl_seconds * 1000))
        out = self.scripts.cache_put(keys=[ENTRY + key, INDEX, SIZES, BYTES],
                                     args=[key, value, ttl_ms, int(max_bytes), ENTRY])
        return bool(int(out[0]))

    def delete(self, keys: list[str], older_than_ms: int | None = None) -> int:
        removed = 0
        for i in range(0, len(keys), _CHUNK):
            removed += int(self.scripts.cache_delete(keys=[INDEX, SIZES, BYTES],
                                                     args=[ENTRY, "" if older_than_ms is None else older_than_ms,
                                                           *keys[i:i + _CHUNK]]))
        return removed

    def clear(self, older_than_seconds: float | None = None) -> int:
        cutoff = None if older_than_seconds is None else int((time.time() - older_than_seconds) * 1000)
        hashes = [h.decode() if isinstance(h, bytes) else h for h, _ in self.redis.hscan_iter(SIZES, count=1000)]
        removed = self.delete(hashes, cutoff)
        if cutoff is None:  # entries the index lost track of (written by hand, a partial restore)
            for name in self.redis.scan_iter(match=ENTRY + "*", count=1000):
                removed += self.redis.delete(name)
        return removed

    def stats(self) -> CacheStats:
        now_ms = time.time() * 1000
        live = self.redis.zcount(INDEX, now_ms, "+inf")
        stored = [int(v.split()[1]) for _, v in self.redis.hscan_iter(SIZES, count=1000)] if live else []
        return CacheStats(where=self.where, entries=int(live), bytes=int(self.redis.get(BYTES) or 0),
                          oldest=min(stored) / 1000 if stored else None,
                          newest=max(stored) / 1000 if stored else None)
