"""The response cache's one interface, with two storages behind it (as the `limits` library keeps
its storage backends): Redis (state/cache_redis.py), shared by a fleet, and an sqlite3 file
(state/cache_sqlite.py) for the in-process default, so that reruns on one machine hit it too.

A storage keeps opaque bytes under a hex key with a time to live, within a size bound; what the
bytes mean (policy/cache_entries.py) and what a corrupt entry leads to (state/cache.py) are not
its business.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

CACHE_DIR_ENV = "BATCHRUN_CACHE_DIR"  # where the sqlite file lives (tests point it at a tmp dir)
CACHE_FILE = "responses.sqlite3"
_files: dict = {}  # path -> the SqliteCacheStorage of this process
_lock = threading.Lock()


class CacheUnavailable(Exception):
    """The cache file cannot be opened (not a database, a directory that cannot be made): a
    sentence naming the file, the reason and what to do. A run goes on without the cache."""


@dataclass(frozen=True)
class CacheStats:
    where: str  # "Redis redis://host:6379/0" or the file's path
    entries: int
    bytes: int  # what the entries hold (compressed)
    oldest: float | None  # Unix seconds the oldest entry was stored
    newest: float | None


class CacheStorage(Protocol):
    where: str

    def get(self, key: str) -> bytes | None: ...

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """The entries of ``keys`` that are there, in one round trip (a rerun's submit looks up a block at once)."""

    def put(self, key: str, value: bytes, ttl_seconds: float, max_bytes: int) -> bool:
        """Store ``value`` (False: bigger than the bound on its own), evicting what the bound needs."""

    def delete(self, keys: list[str], older_than_ms: int | None = None) -> int: ...

    def clear(self, older_than_seconds: float | None = None) -> int:
        """Remove every entry (stored longer ago than ``older_than_seconds``); returns how many."""

    def stats(self) -> CacheStats: ...


def default_cache_dir() -> Path:
    """BATCHRUN_CACHE_DIR, else $XDG_CACHE_HOME/batchrun, else ~/.cache/batchrun."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchrun"


def is_in_process(redis) -> bool:
    """The in-process Redis (fakeredis, see state/connections.py): it ends with the process, so
    its batches cache to the file instead."""
    return type(redis).__module__.split(".")[0] == "fakeredis"


def open_storage(redis, url: str = "") -> CacheStorage:
    """The storage the batches of ``redis`` cache to: that Redis, or, for the in-process one, the file."""
    if is_in_process(redis):
        from batchrun.state.cache_sqlite import SqliteCacheStorage

        # One per file and process: its runners see each other's answers before they are written
        # (state/cache_sqlite.py writes behind), and it has one connection and one writer thread.
        path = default_cache_dir() / CACHE_FILE
        with _lock:
            storage = _files.get(path)
            if storage is None or storage.closed:
                storage = _files[path] = _open_file(SqliteCacheStorage, path)
        return storage
    from batchrun.state.cache_redis import RedisCacheStorage

    return RedisCacheStorage(redis, url)


def _open_file(cls, path: Path):
    import sqlite3

    try:
        return cls(path)
    except (sqlite3.Error, OSError) as exc:
        raise CacheUnavailable(
            f"the response cache file {path} cannot be used ({exc}); remove it (a new one is made) or point "
            f"{CACHE_DIR_ENV} at a writable directory") from None
