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
from collections.abc import Callable, Collection, Iterator

# Job, LineError and URLS are re-exported: callers read files and lines from here.
from batchrun.files.joblines import URLS, Job, LineError, parse_line, scan_json
from batchrun.files.seen_ids import SeenIds

__all__ = ["MAX_LINE_BYTES", "URLS", "Job", "JobFileError", "LineError", "iter_jobs", "iter_requests",
           "read_jobs", "validate_file"]

# A JobFileError message lists this many lines, then counts the rest.
_LISTED_ERRORS = 20

# A job's request is one Redis value (512 MB at most by default); a bare body's JSON, written again
# with ASCII escapes, can be three times its line.
MAX_LINE_BYTES = 128 << 20


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
                    obj, end = scan_json(text, 0)
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
    seen = SeenIds()
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
            job_or_reason = parse_line(raw, line_no, endpoint, seen, build)
            if job_or_reason.__class__ is str:
                yield LineError(path, line_no, job_or_reason)
            else:
                yield job_or_reason
