"""Results and errors files (JSONL) that never hold a broken line or a job twice.

The lines follow the OpenAI Batch API output format::

    {"id": "batch_req_...", "custom_id": "req-1",
     "response": {"status_code": 200, "request_id": "req_...", "body": {...}}, "error": null}

Output order does not follow input order: consumers join on custom_id, as with the Batch API.

Guarantees, and how:

* Whole lines only. Every line is serialised completely before any of it is written, and a
  crash can at worst leave a last line without its newline; ``repair_truncated_tail`` removes it
  and its job runs again.
* One writer per file. ``JsonlAppender`` holds an exclusive ``flock`` on the file while open, so
  two collectors can never interleave lines in the same file.
* No job twice. After taking the lock, the writer reads the custom_ids already in the file
  (``read_custom_ids``) and skips those jobs.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

# Lines are written out once this much is buffered; small enough that a crash loses little.
_FLUSH_BYTES = 64 * 1024
# Reading backwards from the end of a file to find its last newline, this much at a time.
_TAIL_CHUNK = 64 * 1024


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


def read_custom_ids(path: str | os.PathLike) -> set[str]:
    """The custom_ids of the lines already in a results or errors file (missing file: none).

    Reads one line at a time. A last line without its newline (left by a crash) is ignored if it
    is not complete JSON, since ``repair_truncated_tail`` would remove it; any other line that is
    not a JSON object with a custom_id raises OutputFileError naming the file and line.
    """
    return set(iter_custom_ids(path))


def iter_custom_ids(path: str | os.PathLike):
    """The custom_ids of a results or errors file, one line at a time (see ``read_custom_ids``)."""
    for custom_id, _ in iter_outcome_ids(path):
        yield custom_id


def iter_outcome_ids(path: str | os.PathLike):
    """(custom_id, line id or None) of each line of a results or errors file (see ``read_custom_ids``)."""
    name = os.fsdecode(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for line_no, raw in enumerate(f, start=1):
            if not raw or raw.isspace():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for bad bytes
                if not raw.endswith(b"\n"):
                    break  # a truncated last line: its job has no result yet
                raise OutputFileError(
                    f"{name}, line {line_no}: not valid JSON ({e}); the file is damaged, "
                    "fix or remove that line before resuming"
                ) from None
            custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
            if not isinstance(custom_id, str):
                raise OutputFileError(
                    f"{name}, line {line_no}: not a result line (no custom_id); "
                    "is this the right file?"
                )
            if "response" not in obj and "error" not in obj:
                # A jobs line (method, url, body), say: taken for a result it would stop those
                # jobs from ever being sent.
                raise OutputFileError(
                    f"{name}, line {line_no}: not a result line (no response or error"
                    + (f"; it is a job line, with {', '.join(k for k in ('method', 'url', 'body') if k in obj)}"
                       if any(k in obj for k in ("method", "url", "body")) else "")
                    + "); is this the right file? Give -o a results file, or a new one"
                )
            line_id = obj.get("id")
            yield custom_id, line_id if isinstance(line_id, str) else None


def repair_truncated_tail(path: str | os.PathLike) -> str | None:
    """Remove a last line that lacks its newline (a crash mid-write); return a message saying so.

    Returns None if the file is missing, empty or ends with a newline. A last line that is
    complete JSON merely lacks its newline (a file from another tool, or a crash between the two):
    the newline is added rather than the result thrown away. Only the tail is read, however
    big the file. Call it while holding the file's lock (see JsonlAppender), or it could cut a
    line that another process is in the middle of writing.
    """
    name = os.fsdecode(path)
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return None
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return None
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None

        tail_start = _start_of_last_line(f, size)
        f.seek(tail_start)
        tail = f.read()
        if _is_json_object(tail):
            f.write(b"\n")
            return f"{name}: added the missing newline at the end of the last line"
        f.truncate(tail_start)
        return (
            f"{name}: removed a truncated last line left by an interrupted run "
            f"({size - tail_start} bytes); its job will be written again"
        )


def _start_of_last_line(f, size: int) -> int:
    """Offset just after the last b"\\n" of the file (0 if there is none), reading backwards."""
    end = size
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        f.seek(start)
        newline = f.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _is_json_object(data: bytes) -> bool:
    # A JSON object ends at its closing brace, so one that parses is complete: a line cut
    # anywhere short of that brace cannot parse.
    try:
        return isinstance(json.loads(data), dict)
    except ValueError:
        return False


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


def result_line(
    custom_id: str, *, status_code: int, request_id: str | None, body: object, line_id: str | None = None
) -> dict:
    """An output line for a request that got an HTTP answer (Batch API output format)."""
    return {
        "id": line_id or _new_line_id(),
        "custom_id": custom_id,
        "response": {"status_code": status_code, "request_id": request_id, "body": body},
        "error": None,
    }


def error_line(
    custom_id: str,
    *,
    code: str,
    message: str,
    response: dict | None = None,
    attempts: list | None = None,
    line_id: str | None = None,
) -> dict:
    """An output line for a request that failed for good.

    ``response`` is the failed HTTP answer ({status_code, request_id, body}) if there was one,
    else None (e.g. a timeout). Unlike the Batch API, which leaves ``error`` null when there is
    a response, ``error`` is always set here, so a consumer can test ``error is not None``.
    ``attempts`` (one entry per try) is a batchrun extension, present only when given.
    """
    line = {
        "id": line_id or _new_line_id(),
        "custom_id": custom_id,
        "response": response,
        "error": {"code": code, "message": message},
    }
    if attempts is not None:
        line["attempts"] = attempts
    return line


_random_hex: list[str] = []
os.register_at_fork(after_in_child=_random_hex.clear)  # a forked worker draws its own


def _new_line_id() -> str:
    # 32 random hex digits like uuid4().hex, drawn from the OS 256 at a time (one call to
    # os.urandom instead of one per line: workers make thousands a second).
    if not _random_hex:
        block = os.urandom(16 * 256).hex()
        _random_hex.extend(block[i:i + 32] for i in range(0, len(block), 32))
    return "batch_req_" + _random_hex.pop()
