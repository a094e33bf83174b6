"""The response cache in an sqlite3 file: the in-process default's storage, so that reruns on one
machine hit it (the in-process Redis ends with its process). Several processes may share the
file: sqlite locks it, and each put runs in one write transaction, so the size bound holds."""

from __future__ import annotations

import atexit
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

from batchrun.state.cache_storage import CacheStats

log = logging.getLogger("batchrun.worker")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    size INTEGER NOT NULL,
    stored_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_expiry ON entries (expires_ms);
CREATE TABLE IF NOT EXISTS total (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO total VALUES (0, (SELECT COALESCE(SUM(size), 0) FROM entries));
"""


FLUSH_EVERY = 0.1  # seconds an answer waits, at most, to be written to the file
FLUSH_AT = 500  # answers waiting that make a write at once


class SqliteCacheStorage:
    """Answers are written behind: ``put`` keeps them in memory (where ``get`` finds them at once,
    which is all the jobs of this process waiting on them need) and a writer thread commits them
    in one transaction every FLUSH_EVERY seconds, and at exit: one commit per answer would cost
    more than the answer's whole path through the runner."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.where = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection for the process's threads (the runner's loop and `run`'s thread), behind a lock.
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        try:
            self._prepare()
        except BaseException:  # (not a database, a read-only file): the caller says so
            self._db.close()
            raise
        self._pending: dict[str, tuple[bytes, float, int, int]] = {}  # key -> (value, ttl s, bound, stored ms)
        self._pending_lock = threading.Lock()
        # Held for a whole flush, from taking the answers waiting to their commit: the flush at exit
        # waits for the writer thread's, which the interpreter would otherwise stop half way (a
        # daemon thread), losing the answers it had taken.
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._failing = False  # the last flush failed (said once)
        self._writer = threading.Thread(target=self._write_behind, name="batchrun-cache-writer", daemon=True)
        self._writer.start()
        atexit.register(self._flush_or_warn)

    def _prepare(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA busy_timeout = 30000")
            try:
                self._db.execute("PRAGMA journal_mode = WAL")  # readers do not wait for a writer
                # A cache may lose its last answers to a power cut (they are sent again), not be slow:
                # no fsync per stored answer.
                self._db.execute("PRAGMA synchronous = NORMAL")
            except sqlite3.OperationalError:
                pass  # (a file system without shared memory: the default journal works too)
            self._db.executescript(_SCHEMA)

    def get(self, key: str) -> bytes | None:
        waiting = self._pending.get(key)
        if waiting is not None and waiting[3] + waiting[1] * 1000 > _now_ms():
            return waiting[0]
        with self._lock:
            row = self._db.execute("SELECT value FROM entries WHERE key = ? AND expires_ms > ?",
                                   (key, _now_ms())).fetchone()
        return bytes(row[0]) if row else None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """The live entries of ``keys`` (those missing are left out): one query, not one per key."""
        now = _now_ms()
        found: dict[str, bytes] = {}
        rest = []
        for key in keys:
            waiting = self._pending.get(key)
            if waiting is not None and waiting[3] + waiting[1] * 1000 > now:
                found[key] = waiting[0]
            else:
                rest.append(key)
        if rest:
            with self._lock:
                rows = self._db.execute("SELECT key, value FROM entries WHERE key IN (SELECT value FROM json_each(?)) "
                                        "AND expires_ms > ?", (json.dumps(rest), now)).fetchall()
            found.update((key, bytes(value)) for key, value in rows)
        return found

    def put(self, key: str, value: bytes, ttl_seconds: float, max_bytes: int) -> bool:
        if len(value) + len(key) > max_bytes:
            return False
        with self._pending_lock:
            self._pending[key] = (value, ttl_seconds, max_bytes, _now_ms())
            many = len(self._pending) >= FLUSH_AT
        if many:
            self._wake.set()
        return True

    def flush(self) -> bool:
        """Write the answers waiting in memory, in one transaction (False: there were none)."""
        with self._flush_lock:
            with self._pending_lock:
                batch, self._pending = self._pending, {}
            if not batch or self._closed:
                return False
            with self._lock:
                db = self._db
                db.execute("BEGIN IMMEDIATE")  # one writer at a time across processes: the bound holds
                try:
                    for key, (value, ttl, bound, stored) in batch.items():
                        self._put_one(key, value, ttl, bound, stored)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # (sqlite rolls back by itself on a full disk)
                        db.execute("ROLLBACK")
                    raise
            return True

    def _write_behind(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_EVERY)
            self._wake.clear()
            self._flush_or_warn()

    def _flush_or_warn(self) -> None:
        """A flush whose failure (a full disk, a locked file past its timeout) loses those answers
        (a rerun sends them again) and is said once until a flush works again."""
        try:
            wrote = self.flush()
        except sqlite3.Error as exc:
            if not self._failing:
                log.warning("response cache (%s): answers cannot be written (%s); they are not kept, so a later "
                            "run sends those requests again (free some space, or run `batchrun cache clear`)",
                            self.where, exc)
            self._failing = True
        else:
            if wrote:
                self._failing = False

    def _put_one(self, key: str, value: bytes, ttl_seconds: float, max_bytes: int, now: int) -> None:
        size = len(value) + len(key)
        db = self._db
        gone = db.execute("SELECT COALESCE(SUM(size), 0) FROM entries WHERE expires_ms <= ? OR key = ?",
                          (now, key)).fetchone()[0]
        if gone:
            db.execute("DELETE FROM entries WHERE expires_ms <= ? OR key = ?", (now, key))
        total = db.execute("SELECT bytes FROM total").fetchone()[0] - gone
        if total + size > max_bytes:
            # The soonest to expire go first, as in Redis (state/lua/cache_put.lua).
            doomed = []
            for k, s in db.execute("SELECT key, size FROM entries ORDER BY expires_ms"):
                if total + size <= max_bytes:
                    break
                doomed.append((k,))
                total -= s
            db.executemany("DELETE FROM entries WHERE key = ?", doomed)
        db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)",
                   (key, value, size, now, now + max(1, int(ttl_seconds * 1000))))
        db.execute("UPDATE total SET bytes = ?", (max(0, total) + size,))

    def delete(self, keys: list[str], older_than_ms: int | None = None) -> int:
        cutoff = older_than_ms if older_than_ms is not None else 2**62
        return self._delete_where("key IN (SELECT value FROM json_each(?)) AND stored_ms < ?",
                                  (json.dumps(keys), cutoff))

    def clear(self, older_than_seconds: float | None = None) -> int:
        if older_than_seconds is None:
            removed = self._delete_where("1", ())
            with self._lock:
                self._db.execute("VACUUM")
            return removed
        now = _now_ms()
        return self._delete_where("stored_ms < ? OR expires_ms <= ?", (now - int(older_than_seconds * 1000), now))

    def _delete_where(self, where: str, args: tuple) -> int:
        self.flush()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                n, size = db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries WHERE {where}",
                                     args).fetchone()
                db.execute(f"DELETE FROM entries WHERE {where}", args)
                db.execute("UPDATE total SET bytes = MAX(0, bytes - ?)", (size,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return n

    def stats(self) -> CacheStats:
        self.flush()
        with self._lock:
            n, oldest, newest = self._db.execute(
                "SELECT COUNT(*), MIN(stored_ms), MAX(stored_ms) FROM entries WHERE expires_ms > ?",
                (_now_ms(),)).fetchone()
            size = self._db.execute("SELECT bytes FROM total").fetchone()[0]
        return CacheStats(where=self.where, entries=n, bytes=size, oldest=oldest / 1000 if oldest else None,
                          newest=newest / 1000 if newest else None)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self.flush()
        atexit.unregister(self._flush_or_warn)
        self._closed = True
        self._wake.set()
        with self._lock:
            self._db.close()


def _now_ms() -> int:
    return int(time.time() * 1000)
