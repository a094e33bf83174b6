"""The response cache in an sqlite3 file: the in-process default's storage, so that reruns on one
machine hit it (the in-process Redis ends with its process). Several processes may share the
file: sqlite locks it, and each put runs in one write transaction, so the size bound holds."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from batchrun.state.cache_storage import CacheStats

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    size INTEGER NOT NULL,
    stored_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_expiry ON entries (expires_ms);
"""


class SqliteCacheStorage:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.where = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection for the process's threads (the runner's loop and `run`'s thread), behind a lock.
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA busy_timeout = 30000")
            try:
                self._db.execute("PRAGMA journal_mode = WAL")  # readers do not wait for a writer
            except sqlite3.OperationalError:
                pass  # (a file system without shared memory: the default journal works too)
            self._db.executescript(_SCHEMA)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM entries WHERE key = ? AND expires_ms > ?",
                                   (key, _now_ms())).fetchone()
        return bytes(row[0]) if row else None

    def put(self, key: str, value: bytes, ttl_seconds: float, max_bytes: int) -> bool:
        size = len(value) + len(key)
        if size > max_bytes:
            return False
        now = _now_ms()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")  # one writer at a time across processes: the bound holds
            try:
                db.execute("DELETE FROM entries WHERE expires_ms <= ? OR key = ?", (now, key))
                total = db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]
                if total + size > max_bytes:
                    # The soonest to expire go first, as in Redis (state/lua/cache_put.lua).
                    excess = total + size - max_bytes
                    doomed, freed = [], 0
                    for k, s in db.execute("SELECT key, size FROM entries ORDER BY expires_ms"):
                        if freed >= excess:
                            break
                        doomed.append((k,))
                        freed += s
                    db.executemany("DELETE FROM entries WHERE key = ?", doomed)
                db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
                           (key, value, size, now, now + max(1, int(ttl_seconds * 1000))))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return True

    def delete(self, keys: list[str], older_than_ms: int | None = None) -> int:
        cutoff = older_than_ms if older_than_ms is not None else 2**62
        with self._lock:
            cur = self._db.executemany("DELETE FROM entries WHERE key = ? AND stored_ms < ?",
                                       [(k, cutoff) for k in keys])
        return cur.rowcount

    def clear(self, older_than_seconds: float | None = None) -> int:
        now = _now_ms()
        with self._lock:
            if older_than_seconds is None:
                cur = self._db.execute("DELETE FROM entries")
            else:
                cur = self._db.execute("DELETE FROM entries WHERE stored_ms < ? OR expires_ms <= ?",
                                       (now - int(older_than_seconds * 1000), now))
            removed = cur.rowcount
            self._db.execute("VACUUM") if older_than_seconds is None else None
        return removed

    def stats(self) -> CacheStats:
        with self._lock:
            n, size, oldest, newest = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(stored_ms), MAX(stored_ms) FROM entries "
                "WHERE expires_ms > ?", (_now_ms(),)).fetchone()
        return CacheStats(where=self.where, entries=n, bytes=size, oldest=oldest / 1000 if oldest else None,
                          newest=newest / 1000 if newest else None)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _now_ms() -> int:
    return int(time.time() * 1000)
