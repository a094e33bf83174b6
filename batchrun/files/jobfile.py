"""Read job files (JSONL prompt files) as a stream.

A job file holds one request per line, in either of two formats:

1. The OpenAI Batch API input format::

       {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [...]}}

2. A bare request body, as read by the OpenAI cookbook's parallel processor::

       {"model": "gpt-4o-mini", "messages": [...], "metadata": {"custom_id": "x"}}

   The custom_id comes from ``metadata.custom_id`` (else ``line-<N>``), the url from the
   ``endpoint`` argument. ``metadata`` is removed from the body before sending, as the cookbook
   does: the chat API has its own ``metadata`` parameter (tags stored with the completion) that
   means something else.

Files can be many gigabytes, so they are read one line at a time and nothing per line is kept
except a compact record of the custom_ids seen (needed to report duplicates). A bad line
becomes a ``LineError`` naming the file, the line and the reason, so that one pass reports every
problem instead of stopping at the first.

Submitting is two passes over the file, on purpose: ``validate_file`` first (nothing is written
anywhere, so a bad file submits nothing), then ``read_jobs`` to stream the jobs out. Reading the
file twice costs far less than holding millions of jobs in memory between the passes.
"""

from __future__ import annotations

import json
import os
import re
import struct
from array import array
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from hashlib import blake2b

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")

# Keys that only a Batch API line has; a line with any of them is checked as one.
_BATCH_KEYS = ("custom_id", "method", "url", "body")

# A JobFileError message lists this many lines, then counts the rest.
_LISTED_ERRORS = 20

# JSON can spell UTF-16 surrogates ("\ud800"); a lone one is no Unicode character, so neither Redis
# (strict UTF-8) nor the request's body could carry it. Only lines that spell one are checked further.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

# A job's request is one Redis value (512 MB at most by default); a bare body's JSON, written again
# with ASCII escapes, can be three times its line.
MAX_LINE_BYTES = 128 << 20


@dataclass(frozen=True, slots=True)
class Job:
    """One request to send. ``line_no`` is 1-based, for messages."""

    custom_id: str
    method: str
    url: str
    body: dict
    line_no: int

    def to_request_line(self) -> dict:
        """The job as a Batch API input line."""
        return {"custom_id": self.custom_id, "method": self.method, "url": self.url, "body": self.body}


@dataclass(frozen=True, slots=True)
class LineError:
    """Why one line of a job file cannot be submitted."""

    path: str
    line_no: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}, line {self.line_no}: {self.reason}"


class JobFileError(Exception):
    """A job file has invalid lines. ``errors`` holds all of them; the message lists the first 20."""

    def __init__(self, errors: list[LineError], headline: str | None = None):
        self.errors = errors
        if headline is None:
            n = len(errors)
            path = errors[0].path if errors else "the job file"
            headline = (
                f"{path} has {n} invalid line{'' if n == 1 else 's'}; nothing was submitted "
                "(use --skip-invalid to submit the valid ones):"
            )
        lines = [headline] + [f"  {e}" for e in errors[:_LISTED_ERRORS]]
        if len(errors) > _LISTED_ERRORS:
            lines.append(f"  ... and {len(errors) - _LISTED_ERRORS} more")
        super().__init__("\n".join(lines))


def iter_jobs(path: str | os.PathLike, *, endpoint: str = "/v1/chat/completions") -> Iterator[Job | LineError]:
    """Yield a Job or a LineError for every non-blank line of the file, in file order.

    ``endpoint`` is the url for bare-body lines (Batch API lines carry their own url); it must be
    one of URLS, else ValueError is raised at the call rather than at the first ``next()``.
    """
    _check_endpoint(endpoint)
    return _iter_jobs(os.fsdecode(path), endpoint)


def read_jobs(
    path: str | os.PathLike,
    *,
    endpoint: str = "/v1/chat/completions",
    skip_invalid: bool = False,
    on_skip: Callable[[LineError], None] | None = None,
) -> Iterator[Job]:
    """Yield the valid jobs of a file.

    An invalid line raises JobFileError, unless ``skip_invalid``: then it is passed to
    ``on_skip`` (if given) and reading goes on. Run ``validate_file`` first so that a bad file
    fails before anything was submitted; by the time this raises, earlier jobs are already out.
    """
    _check_endpoint(endpoint)
    return _read_jobs(os.fsdecode(path), endpoint, skip_invalid, on_skip)


def validate_file(path: str | os.PathLike, *, endpoint: str = "/v1/chat/completions") -> tuple[int, list[LineError]]:
    """First pass over a job file: return (number of valid jobs, every LineError).

    Only the errors are kept, so memory stays flat for a valid file of any size. The submit
    command raises ``JobFileError(errors)`` if there are errors and --skip-invalid was not given,
    and otherwise streams ``read_jobs`` as a second pass.
    """
    _check_endpoint(endpoint)
    valid = 0
    errors: list[LineError] = []
    for item in _iter_jobs(os.fsdecode(path), endpoint, build=False):
        if item is True:
            valid += 1
        else:
            errors.append(item)
    return valid, errors


def iter_requests(
    path: str | os.PathLike, *, endpoint: str = "/v1/chat/completions", skip_lines: Collection[int] = (),
    size: int | None = None,
) -> Iterator[tuple[str, bytes]]:
    """Second pass over a file that ``validate_file`` has checked: (custom_id, request JSON) of every
    valid line, in file order, the jobs ``read_jobs`` would give.

    The request JSON is an object with the job's ``url`` and ``body`` (and ``method``): a Batch API
    line is passed on as it is (its ``custom_id`` key is extra), so it is not decoded and encoded
    again; a bare body becomes ``{"method", "url", "body"}`` without its ``metadata``.

    The lines are not checked again, which makes this about twice as fast as ``read_jobs``: the
    lines in ``skip_lines`` (the line numbers of validate_file's errors) are left out, and every
    other non-blank line is trusted to be the valid job it was in the first pass. If the file
    changed in between, a line that no longer reads as a job raises JobFileError.
    """
    _check_endpoint(endpoint)
    return _iter_requests(os.fsdecode(path), endpoint, frozenset(skip_lines), size)


def _iter_requests(path: str, endpoint: str, skip_lines: frozenset[int], size: int | None) -> Iterator[tuple[str, bytes]]:
    loads, dumps = json.loads, json.dumps
    read = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            read += len(raw)
            if size is not None and read > size:
                break  # appended after validation: not checked, not taken
            if line_no in skip_lines:
                continue
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.strip()
            if not raw:
                continue
            try:
                text = raw.decode("utf-8")
                try:
                    obj, end = _scan_json(text, 0)
                    if end != len(text):
                        raise ValueError
                except (StopIteration, ValueError):
                    obj = loads(text)
                if "body" in obj or "custom_id" in obj or "url" in obj or "method" in obj:
                    custom_id = obj["custom_id"]
                    if not isinstance(custom_id, str) or not isinstance(obj["body"], dict):
                        raise TypeError
                    yield custom_id, raw
                    continue
                metadata = obj.pop("metadata", None)
                custom_id = metadata.get("custom_id") if isinstance(metadata, dict) else None
                if custom_id is None:
                    custom_id = f"line-{line_no}"
                elif not isinstance(custom_id, str):
                    custom_id = str(custom_id)
                yield custom_id, dumps({"method": "POST", "url": endpoint, "body": obj}).encode()
            except (ValueError, TypeError, KeyError, AttributeError):
                raise JobFileError([LineError(path, line_no, "changed since it was validated; submit it again")],
                                   headline=f"{path} changed while it was being submitted:") from None


def _check_endpoint(endpoint: str) -> None:
    if endpoint not in URLS:
        raise ValueError(f"unknown endpoint {endpoint!r} (expected one of {', '.join(URLS)})")


def _read_jobs(path: str, endpoint: str, skip_invalid: bool, on_skip) -> Iterator[Job]:
    for item in _iter_jobs(path, endpoint):
        if isinstance(item, Job):
            yield item
        elif skip_invalid:
            if on_skip is not None:
                on_skip(item)
        else:
            raise JobFileError([item], headline=f"{path} has an invalid line (jobs before it were already read):")


def _iter_jobs(path: str, endpoint: str, build: bool = True) -> Iterator[Job | LineError]:
    """Jobs and LineErrors in file order; with ``build=False``, True in place of each Job (a
    validating pass has no use for them)."""
    seen = _SeenIds()
    # Binary, so that the file is split on b"\n" only and bad UTF-8 is reported per line
    # instead of failing the whole read. Iterating a buffered file reads one line at a time.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark, as some Windows editors write
            if not raw or raw.isspace():
                continue  # blank lines are allowed (e.g. a trailing empty line)
            if len(raw) > MAX_LINE_BYTES:
                yield LineError(path, line_no, f"longer than {MAX_LINE_BYTES >> 20} MB, more than a job can hold")
                continue
            job_or_reason = _parse_line(raw, line_no, endpoint, seen, build)
            if job_or_reason.__class__ is str:
                yield LineError(path, line_no, job_or_reason)
            else:
                yield job_or_reason


_scan_json = json.JSONDecoder().scan_once  # json.loads without its wrappers (see _parse_line)


def _parse_line(raw: bytes, line_no: int, endpoint: str, seen: _SeenIds, build: bool = True) -> Job | bool | str:
    """Return the line's Job (True if not ``build``), or the reason it is invalid."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); save the file as UTF-8"
    # The usual line is one object and a newline: scanned straight away (json.loads would first
    # look for leading and trailing whitespace with regexes). Anything else, errors included,
    # goes through json.loads, which says what is wrong.
    obj = None
    if text.startswith("{"):
        try:
            obj, end = _scan_json(text, 0)
        except (StopIteration, ValueError, RecursionError):
            obj = None
        else:
            if text[end:].strip(" \t\r\n"):  # only JSON's whitespace may follow the object
                obj = None
    if obj is None:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            return f"not valid JSON: {e.msg} at column {e.colno}"
        except ValueError:  # json's own limit on integers (int_max_str_digits)
            return "holds a number of more than 4,300 digits, which cannot be read"
        except RecursionError:
            return "nested too deeply to be read"
    if not isinstance(obj, dict):
        return f"not a JSON object (it is {_kind(obj)}); each line must be one request object"
    if _SURROGATE_ESCAPE.search(text) is not None:
        reason = _lone_surrogate(obj)
        if reason:
            return reason

    if "custom_id" in obj or "method" in obj or "url" in obj or "body" in obj:  # any of _BATCH_KEYS
        return _parse_batch_line(obj, line_no, seen, build)
    if "model" in obj:
        return _parse_bare_body(obj, line_no, endpoint, seen, build)
    return (
        "neither a Batch API line (custom_id, method, url, body) "
        "nor a request body (no 'model')"
    )


def _parse_batch_line(obj: dict, line_no: int, seen: _SeenIds, build: bool = True) -> Job | bool | str:
    if len(obj) < 4 or "custom_id" not in obj or "method" not in obj or "url" not in obj or "body" not in obj:
        missing = [key for key in _BATCH_KEYS if key not in obj]
        if missing:
            names = [repr(key) for key in missing]
            if len(names) == 1:
                return f"missing field {names[0]}"
            return f"missing fields {', '.join(names[:-1])} and {names[-1]}"

    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        return f"custom_id must be a non-empty string, not {_kind(custom_id)}"
    # Recorded before the other fields are checked, so that a duplicate is reported even when
    # its first occurrence has another problem: one pass shows everything to fix.
    first = seen.add(custom_id, line_no)
    if first is not None:
        return f"duplicate custom_id {_short(custom_id)} (first on line {first})"

    if obj["method"] != "POST":
        return f"method must be \"POST\", not {_short(obj['method'])}"
    url = obj["url"]
    if url not in URLS:
        return f"unknown url {_short(url)} (expected one of {', '.join(URLS)})"
    body = obj["body"]
    if not isinstance(body, dict):
        return f"body is not an object (it is {_kind(body)})"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "body has no 'model'"
    problem = _count_problem(body)
    if problem:
        return problem
    return Job(custom_id, "POST", url, body, line_no) if build else True


def _parse_bare_body(body: dict, line_no: int, endpoint: str, seen: _SeenIds, build: bool = True) -> Job | bool | str:
    if not isinstance(body["model"], str) or not body["model"]:
        return "'model' must be a non-empty string"
    # The cookbook's tagging field; popped so it is not sent as the API's own `metadata`.
    metadata = body.pop("metadata", None)
    custom_id = metadata.get("custom_id") if isinstance(metadata, dict) else None
    if custom_id is None:
        custom_id = f"line-{line_no}"
    elif isinstance(custom_id, (int, float)) and not isinstance(custom_id, bool):
        custom_id = str(custom_id)
    elif not isinstance(custom_id, str) or not custom_id:
        return f"metadata.custom_id must be a non-empty string or a number, not {_kind(custom_id)}"

    first = seen.add(custom_id, line_no)
    if first is not None:
        return f"duplicate custom_id {_short(custom_id)} (first on line {first})"
    problem = _count_problem(body)
    if problem:
        return problem
    return Job(custom_id, "POST", endpoint, body, line_no) if build else True


def _lone_surrogate(obj: dict) -> str | None:
    """The reason a parsed line cannot be stored or sent if one of its strings holds a lone surrogate."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        char = f"\\u{ord(e.object[e.start]):04x}"
    metadata = obj.get("metadata")
    custom_id = obj.get("custom_id", metadata.get("custom_id") if isinstance(metadata, dict) else None)
    if isinstance(custom_id, str) and _has_lone_surrogate(custom_id):
        return f"custom_id holds a lone UTF-16 surrogate ({char}), which is not valid Unicode; fix the id"
    return f"a string in the line holds a lone UTF-16 surrogate ({char}), which is not valid Unicode and cannot be sent"


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


# Body fields that count tokens or answers: the server refuses anything but a whole number >= 1
# (OpenAI: "expected an integer, but got a decimal number"), and the budget reserves by them.
_COUNT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n", "best_of")


def _count_problem(body: dict) -> str | None:
    for name in _COUNT_FIELDS:
        if name in body:
            value = body[name]
            if value is not None and (value.__class__ is not int or value < 1):
                return f"{name} must be a whole number of at least 1, not {_short(value)}"
    return None


def _kind(value: object) -> str:
    """'an array', 'a string', ... for messages about JSON values."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, (int, float)):
        return "a number"
    return "an array" if isinstance(value, list) else "an object"


def _short(value: object) -> str:
    """repr(value), cut to a readable length: ids and urls are echoed back in messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_two_words = struct.Struct("<QQ").unpack  # a 16-byte digest as two 64-bit integers


class _SeenIds:
    """custom_id -> line of its first appearance, in 24 bytes per slot whatever the id's length.

    A dict[str, int] costs about 130 bytes per short id (a str object, an int object, the dict
    entry): over 1 GB for a 10-million-line file. Instead, each id is reduced to a 128-bit
    BLAKE2b digest (two different ids collide with odds of about 1e-20 even at a billion ids)
    and kept in an open-addressing hash table made of three flat arrays of 64-bit integers (the
    digest's two halves and the line), so no Python object exists per id. ``add`` is written
    out in one function, with integers compared rather than byte slices: it runs once per line.
    """

    def __init__(self, capacity: int = 1024):
        self._allocate(max(8, 1 << (max(1, capacity) - 1).bit_length()))

    def _allocate(self, capacity: int) -> None:
        self._capacity = capacity  # a power of two, so `& mask` picks a slot
        self._mask = capacity - 1
        self._lo = array("Q", bytes(8 * capacity))  # low 64 bits of the digest
        self._hi = array("Q", bytes(8 * capacity))  # high 64 bits
        self._lines = array("Q", bytes(8 * capacity))  # 0 marks an empty slot: lines start at 1
        self._count = 0
        self._limit = 2 * capacity // 3  # past 2/3 full, probe chains get long

    def __len__(self) -> int:
        return self._count

    def add(self, custom_id: str, line_no: int) -> int | None:
        """Record custom_id as seen on line_no; if it was seen before, return that line instead."""
        # surrogatepass: JSON can spell lone surrogates ("\ud800"), which strict UTF-8 refuses.
        lo, hi = _two_words(blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=16).digest())
        los, his, lines = self._lo, self._hi, self._lines
        slot = lo & self._mask
        while True:
            first = lines[slot]
            if not first:
                break
            if los[slot] == lo and his[slot] == hi:
                return first
            slot = (slot + 1) & self._mask
        los[slot], his[slot], lines[slot] = lo, hi, line_no
        self._count += 1
        if self._count > self._limit:
            self._grow()
        return None

    def _grow(self) -> None:
        old = zip(self._lo, self._hi, self._lines)
        count = self._count
        self._allocate(2 * self._capacity)
        mask, los, his, lines = self._mask, self._lo, self._hi, self._lines
        for lo, hi, line_no in old:
            if line_no:
                slot = lo & mask
                while lines[slot]:
                    slot = (slot + 1) & mask
                los[slot], his[slot], lines[slot] = lo, hi, line_no
        self._count = count
