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

import json
import os
import re
from collections.abc import Iterator
from typing import NamedTuple

# Re-exported: callers open and check the files with the lines.
from batchrun.files.appender import JsonlAppender, OutputFileError, check_writable

__all__ = ["JsonlAppender", "OutcomeIds", "OutputFileError", "check_writable", "error_line", "iter_custom_ids",
           "iter_outcome_ids", "outcome_ids", "read_custom_ids", "repair_truncated_tail", "result_line"]

# Reading backwards from the end of a file to find its last newline, this much at a time.
_TAIL_CHUNK = 64 * 1024


def read_custom_ids(path: str | os.PathLike) -> set[str]:
    """The custom_ids of the lines already in a results or errors file (missing file: none).

    Reads one line at a time. A last line without its newline (left by a crash) is ignored if it
    is not complete JSON, since ``repair_truncated_tail`` would remove it; any other line that is
    not a JSON object with a custom_id raises OutputFileError naming the file and line.
    """
    return set(iter_custom_ids(path))


def iter_custom_ids(path: str | os.PathLike) -> Iterator[str]:
    """The custom_ids of a results or errors file, one line at a time (see ``read_custom_ids``)."""
    for custom_id, _ in iter_outcome_ids(path):
        yield custom_id


def iter_outcome_ids(path: str | os.PathLike) -> Iterator[OutcomeIds]:
    """The OutcomeIds (custom_id, line id or None) of each line of a results or errors file (see
    ``read_custom_ids``)."""
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
            yield OutcomeIds(custom_id, _line_id(obj))


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


class OutcomeIds(NamedTuple):
    """Which job a result or error line is the outcome of, and which outcome (its line id)."""

    custom_id: str
    line_id: str | None  # None when the line has no string "id"


# How a line made by result_line / error_line starts once serialised with json.dumps' default
# separators, as workers and JsonlAppender.write do: the two ids are read from it without
# decoding the rest of the line (a body of kilobytes), which collect does for millions of lines.
_OUTCOME_HEAD = re.compile(rb'\{"id": "([^"\\]*)", "custom_id": ("(?:[^"\\]|\\.)*")')


def outcome_ids(line: bytes) -> OutcomeIds:
    """The custom_id and line id of one result or error line (a JSON object, keys in any order).

    Raises ValueError if the line is not a JSON object with a string custom_id."""
    head = _OUTCOME_HEAD.match(line)
    if head is not None:
        return OutcomeIds(json.loads(head.group(2)), head.group(1).decode())
    obj = json.loads(line)
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    if not isinstance(custom_id, str):
        raise ValueError(f"not a result or error line (no custom_id): {line[:80]!r}")
    return OutcomeIds(custom_id, _line_id(obj))


def _line_id(line: dict) -> str | None:
    line_id = line.get("id")
    return line_id if isinstance(line_id, str) else None


_random_hex: list[str] = []
os.register_at_fork(after_in_child=_random_hex.clear)  # a forked worker draws its own


def _new_line_id() -> str:
    # 32 random hex digits like uuid4().hex, drawn from the OS 256 at a time (one call to
    # os.urandom instead of one per line: workers make thousands a second).
    if not _random_hex:
        block = os.urandom(16 * 256).hex()
        _random_hex.extend(block[i:i + 32] for i in range(0, len(block), 32))
    return "batch_req_" + _random_hex.pop()
