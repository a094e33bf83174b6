"""Collecting a batch's outcomes from Redis into results and errors JSONL files.

Outcomes sit in Redis in the order jobs ended (a list), so workers on other
machines need no shared disk. Collecting appends only the custom_ids the files
do not hold yet: run it twice, or after a crash, and nothing is written twice.
Each file is locked while it is written, so two collectors cannot interleave.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from batchrun.jobfile import _SeenIds
from batchrun.outputs import JsonlAppender, iter_custom_ids, repair_truncated_tail
from batchrun.store import BatchStore

PAGE = 5000  # outcomes per LRANGE


# An outcome line starts as outputs.result_line / error_line make it: {"id": "batch_req_…", "custom_id": "…".
_HEAD = re.compile(rb'\{"id": "[^"\\]*", "custom_id": ("(?:[^"\\]|\\.)*")')


def _custom_id(line: bytes) -> str:
    """The custom_id of an outcome line, without decoding the whole line when it starts as usual."""
    m = _HEAD.match(line)
    if m is not None:
        return json.loads(m.group(1))
    return json.loads(line)["custom_id"]


def default_errors_path(results_path: str) -> str:
    p = Path(results_path)
    stem = p.name[:-len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return str(p.with_name(stem + ".errors.jsonl"))


@dataclass
class CollectReport:
    results_written: int = 0
    errors_written: int = 0
    already_there: int = 0
    finished: bool = False
    state: str = ""


def collect(store: BatchStore, batch_id: str, results_path: str, errors_path: str | None = None, *,
            follow: bool = False, poll: float = 0.5, on_note: Callable[[str], None] = print,
            on_progress: Callable[[CollectReport], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False) -> CollectReport:
    """Append the batch's outcomes that the files do not hold yet.

    With ``follow``, keep going until the batch is finished (or cancelled, or
    ``should_stop()``); a paused batch is waited for. Redis going away is waited out.
    """
    if not store.exists(batch_id):
        raise LookupError(f"no batch {batch_id!r} in this Redis")
    errors_path = errors_path or default_errors_path(results_path)
    report = CollectReport()
    with JsonlAppender(results_path) as out, JsonlAppender(errors_path) as err:
        for path in (results_path, errors_path):
            note = repair_truncated_tail(path)
            if note:
                on_note(note)
        # The custom_ids already written, as 24-byte digests rather than a set of strings: a
        # million outcomes would otherwise take ~100 MB here.
        seen = _SeenIds()
        for path in (results_path, errors_path):
            for cid in iter_custom_ids(path):
                seen.add(cid, 1)
        offset = 0
        while True:
            try:
                page = store.results(batch_id, offset, PAGE)
                if page:
                    offset += len(page)
                    for raw in page:
                        kind, line = raw[:1], raw[1:]
                        cid = _custom_id(line)
                        if seen.add(cid, 1) is not None:
                            report.already_there += 1
                            continue
                        sink = out if kind == b"R" else err
                        if line.isascii() and b"\n" not in line and b"\r" not in line:
                            sink.write_line(line)  # as the worker serialised it: no decoding again
                        else:
                            sink.write(json.loads(line))
                        if kind == b"R":
                            report.results_written += 1
                        else:
                            report.errors_written += 1
                    if len(page) == PAGE:
                        continue
                out.flush()
                err.flush()
                meta = store.meta(batch_id)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if not follow:
                    raise
                on_note(f"Redis is unreachable ({exc}); collect keeps what it has and retries")
                time.sleep(2)
                continue
            report.state = meta.get("state", "")
            if on_progress:
                on_progress(report)
            ended = report.state in ("finished", "cancelled")
            if ended and offset >= store.results_length(batch_id):
                report.finished = report.state == "finished"
                break
            if not follow or should_stop():
                break
            time.sleep(poll)
    return report
