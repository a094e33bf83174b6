"""The response cache as a shard runner uses it: look an answer up, store one, and claim the
sending of a request so that identical requests (of one batch, or of batches running at once)
are sent once.

A claim is a key in the batch's Redis (``batchrun:{cache}:sending:HASH``) holding the runner's
owner string (for the in-process Redis, whose runners are all in this process, an entry in a dict); it lives as long as the runner's job leases (renewed with them), so a runner killed
while it sends lets go of it within a lease time, and whoever waits on it then sends the request
itself. Exactly-once is not the claim's business: every job still ends through complete.lua.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from batchrun.policy.cache_entries import CachedAnswer, decode_entry, encode_entry
from batchrun.state.cache_redis import SENDING
from batchrun.state.cache_storage import CacheStorage, is_in_process, open_storage

log = logging.getLogger("batchrun.worker")

DEFAULT_MAX_MB = 512.0


@dataclass(frozen=True)
class CachePolicy:
    """What a batch asked of the cache (BatchOptions' cache fields, read once per runner)."""

    enabled: bool = True
    refresh: bool = False  # entries stored before ``not_before`` are not used (and are overwritten)
    ttl_seconds: float = 7 * 86400.0
    max_bytes: int = int(DEFAULT_MAX_MB * 1024 * 1024)
    not_before: float = 0.0  # Unix seconds: with --refresh, when it was given


class LocalClaims:
    """The claims of the in-process Redis's runners, which are all in this process: kept in a dict
    (a claim in fakeredis costs a millisecond, more than the rest of a cached job's path)."""

    def __init__(self):
        self._held: dict[str, tuple[str, float]] = {}  # key -> (owner, expiry on time.monotonic())
        self._lock = threading.Lock()

    def claim(self, key: str, owner: str, ttl_ms: int) -> bool:
        now = time.monotonic()
        with self._lock:
            held = self._held.get(key)
            if held is not None and held[1] > now:
                return False
            self._held[key] = (owner, now + ttl_ms / 1000)
            return True

    def release(self, key: str, owner: str, renew_ms: int | None = None) -> bool:
        with self._lock:
            held = self._held.get(key)
            if held is None or held[0] != owner or held[1] <= time.monotonic():
                return False
            if renew_ms is None:
                del self._held[key]
            else:
                self._held[key] = (owner, time.monotonic() + renew_ms / 1000)
            return True

    def held(self, key: str) -> bool:
        with self._lock:
            held = self._held.get(key)
            return held is not None and held[1] > time.monotonic()


_LOCAL_CLAIMS = LocalClaims()


class ResponseCache:
    def __init__(self, storage: CacheStorage, state_redis, scripts, owner: str):
        self.storage = storage
        self.redis = state_redis  # the batch's Redis, where the claims live
        self.scripts = scripts
        self.owner = owner
        self.local = _LOCAL_CLAIMS if is_in_process(state_redis) else None  # ... or in this process
        self.claims: set[str] = set()  # keys this runner holds a claim on
        self.corrupt = 0

    @classmethod
    def for_store(cls, store, owner: str) -> "ResponseCache":
        return cls(open_storage(store.redis, _url_of(store.redis)), store.redis, store.scripts, owner)

    def lookup(self, key: str, not_before: float = 0.0) -> CachedAnswer | None:
        """The stored answer, or None (none, too old for --refresh, or corrupt: then logged and dropped)."""
        return self._read(key, self.storage.get(key), not_before)

    def lookup_many(self, keys: list[str], not_before: float = 0.0) -> dict[str, CachedAnswer]:
        """``lookup`` of many keys in one read of the storage: the answers found, by key."""
        found = {}
        for key, raw in self.storage.get_many(keys).items():
            answer = self._read(key, raw, not_before)
            if answer is not None:
                found[key] = answer
        return found

    def _read(self, key: str, raw: bytes | None, not_before: float) -> CachedAnswer | None:
        try:
            answer = decode_entry(raw)
        except ValueError as exc:
            self.corrupt += 1
            log.warning("response cache (%s): the entry %s… cannot be read (%s); it is ignored and removed, "
                        "and the request is sent", self.storage.where, key[:12], exc)
            try:
                self.storage.delete([key])
            except Exception:  # the send goes ahead anyway; the next put replaces it
                pass
            return None
        if answer is None or answer.stored_at < not_before:
            return None
        return answer

    def store(self, key: str, status_code: int, request_id: str | None, body: dict, policy: CachePolicy) -> bool:
        entry = encode_entry(CachedAnswer(status_code, request_id, body, time.time()))
        return self.storage.put(key, entry, policy.ttl_seconds, policy.max_bytes)

    def claim(self, key: str, ttl_ms: int) -> bool:
        """Take the sending of this request (False: another runner is sending it now)."""
        if self.local is not None:
            claimed = self.local.claim(key, self.owner, ttl_ms)
        else:
            claimed = self.redis.set(SENDING + key, self.owner, nx=True, px=ttl_ms)
        if claimed:
            self.claims.add(key)
            return True
        return False

    def release(self, key: str) -> None:
        self.claims.discard(key)
        if self.local is not None:
            self.local.release(key, self.owner)
        else:
            self.scripts.cache_release(keys=[SENDING + key], args=[self.owner, ""])

    def renew_claims(self, ttl_ms: int) -> None:
        """With the job leases: claims held stay held while their runner lives."""
        for key in list(self.claims):
            if self.local is not None:
                kept = self.local.release(key, self.owner, ttl_ms)
            else:
                kept = int(self.scripts.cache_release(keys=[SENDING + key], args=[self.owner, ttl_ms]))
            if not kept:
                self.claims.discard(key)  # it lapsed and another runner took it

    def being_sent(self, key: str) -> bool:
        return self.local.held(key) if self.local is not None else bool(self.redis.exists(SENDING + key))


def _url_of(redis) -> str:
    kwargs = getattr(getattr(redis, "connection_pool", None), "connection_kwargs", {}) or {}
    host, port, db = kwargs.get("host"), kwargs.get("port"), kwargs.get("db", 0)
    return f"redis://{host}:{port}/{db}" if host else ""
