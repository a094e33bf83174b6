"""Appending lines to a results or errors file that one process alone writes, and checking
beforehand that it can be written.

Whole lines only: every line is serialised completely before any of it is written. One writer
per file: ``JsonlAppender`` holds an exclusive ``flock`` on the file while open, so two
collectors can never interleave lines in the same file.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

__all__ = ["JsonlAppender", "OutputFileError", "check_writable"]

# Lines are written out once this much is buffered; small enough that a crash loses little.
_FLUSH_BYTES = 64 * 1024


class OutputFileError(Exception):
    """A results file is damaged, or is in use by another process."""


def check_writable(path: str | os.PathLike) -> None:
    """Raise OutputFileError with a sentence if ``path`` cannot be appended to (a missing or
    read-only directory, a directory in its place). A real attempt rather than os.access, which
    says yes to root on a read-only file system; a file it had to create is removed again, so that
    a run refused later (a bad line, a limit for no model) leaves nothing behind."""
    name = os.fsdecode(path)
    existed = os.path.lexists(name)
    try:
        os.close(os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        if not existed:
            os.unlink(name)
    except OSError as exc:
        raise OutputFileError(_cannot_write(name, exc)) from None


def _cannot_write(name: str, exc: OSError) -> str:
    folder = os.path.dirname(os.path.abspath(name))
    if isinstance(exc, FileNotFoundError) and not os.path.isdir(folder):
        why = f"the directory {folder} does not exist"
    elif isinstance(exc, IsADirectoryError):
        why = "it is a directory"
    else:
        why = exc.strerror or str(exc)
    return f"cannot write {name}: {why}"


class JsonlAppender:
    """Append JSON lines to a file that this process alone writes to.

    Opening takes an exclusive ``flock`` on the file: a second appender on the same file, in
    this process or another, is refused with OutputFileError (or waits up to ``wait`` seconds
    for the lock). Lines are buffered and written in chunks of whole lines; ``flush`` writes
    them out, and with ``fsync=True`` also forces them to disk. Closing flushes and fsyncs.

    The file can change until the lock is held, so read what is in it only afterwards::

        with JsonlAppender("results.jsonl") as out:
            if note := repair_truncated_tail(out.path):   # safe now: no one else is writing
                print(note)
            done = read_custom_ids(out.path)
            for job in jobs:
                if job.custom_id not in done:
                    out.write(result_line(job.custom_id, ...))

    Open it in the process that writes: a forked child shares the lock with its parent.
    """

    def __init__(self, path: str | os.PathLike, *, wait: float = 0.0):
        self.path = os.fsdecode(path)
        self._buffer: list[bytes] = []
        self._buffered = 0
        # O_APPEND: every write lands at the current end of the file, wherever that is now
        # (e.g. after repair_truncated_tail shortened it).
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputFileError(_cannot_write(self.path, exc)) from None
        try:
            self._lock(wait)
        except BaseException:
            os.close(self._fd)
            raise

    def _lock(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                # flock itself has no timeout, so poll.
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        pid = _flock_holder(self._fd)
        who = f"pid {pid}?" if pid else "pid unknown"
        raise OutputFileError(
            f"{self.path} is being written by another batchrun process ({who}); "
            "wait for it to finish or write to another file"
        )

    def write(self, record: dict) -> None:
        """Queue one record as one line. It is serialised in full first, so a record that
        cannot be serialised raises here and leaves nothing behind."""
        if self._fd is None:
            raise ValueError(f"{self.path}: write to a closed JsonlAppender")
        # ASCII escapes (the json default) keep any string writable, even lone surrogates
        # from a decoded response, and never contain a raw newline.
        line = (json.dumps(record) + "\n").encode("ascii")
        self._buffer.append(line)
        self._buffered += len(line)
        if self._buffered >= _FLUSH_BYTES:
            self.flush()

    def write_line(self, line: bytes) -> None:
        """Queue one line that is already a serialised JSON object (ASCII, no newline), as
        ``write`` would have written it: e.g. an outcome line as workers stored it."""
        if self._fd is None:
            raise ValueError(f"{self.path}: write to a closed JsonlAppender")
        if not line.isascii() or b"\n" in line or b"\r" in line:
            raise ValueError(f"{self.path}: not a JSON line: {line[:80]!r}")
        self._buffer.append(line + b"\n")
        self._buffered += len(line) + 1
        if self._buffered >= _FLUSH_BYTES:
            self.flush()

    def flush(self, *, fsync: bool = False) -> None:
        """Write out the buffered lines; with fsync, also wait until they are on disk."""
        if self._fd is None:
            return
        data = memoryview(b"".join(self._buffer))
        self._buffer.clear()
        self._buffered = 0
        while data:
            written = os.write(self._fd, data)  # may write less than asked, e.g. on a signal
            data = data[written:]
        if fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        """Flush, fsync, and release the lock (closing the file releases it)."""
        if self._fd is None:
            return
        try:
            self.flush(fsync=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _flock_holder(fd: int) -> int | None:
    """Best effort: the pid holding a flock on fd's file, from Linux's /proc/locks."""
    st = os.fstat(fd)
    # Lines look like "1: FLOCK  ADVISORY  WRITE 1234 fe:00:1474578 0 EOF", the device
    # as hex major:minor and the inode in decimal; waiting lockers have a "->" column.
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for entry in f:
                fields = entry.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == file_id:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None
