"""Collecting a batch's outcomes from Redis into results and errors JSONL files.

Outcomes sit in Redis in the order jobs ended (a list), so workers on other
machines need no shared disk. Collecting appends only the custom_ids the files
do not hold yet: run it twice, or after a crash, and nothing is written twice.
Each file is locked while it is written, so two collectors cannot interleave.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from batchrun.files.outputs import JsonlAppender, iter_outcome_ids, outcome_ids, repair_truncated_tail
from batchrun.files.seen_ids import SeenIds
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore

PAGE = 5000  # outcomes per LRANGE
UNSERVED_AFTER = 30.0  # seconds with work due and no worker on it before `collect --follow` says so
# `--follow`'s wait between reads while outcomes keep landing: the last one is written this soon
# after it lands. Idle reads double the wait up to collect's ``poll``. A read is a few commands.
FOLLOW_POLL_MIN = 0.02


def _tag(line_id: str | None) -> int:
    """A line id as a non-zero 64-bit number: which outcome of a custom_id a file holds."""
    return (hash(line_id) & 0x7FFF_FFFF_FFFF_FFFF) | 1


def _still_there(store: BatchStore, batch_id: str, offset: int, last: bytes | None) -> bool:
    """Whether the outcome read last, at ``offset - 1``, is still there."""
    from batchrun.state import keys

    if not offset:
        return True
    return store.redis.lindex(keys.sub(batch_id, "results"), offset - 1) == last


def default_errors_path(results_path: str) -> str:
    p = Path(results_path)
    stem = p.name[:-len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return str(p.with_name(stem + ".errors.jsonl"))


class UnservedWatch:
    """Tells when no worker serves a batch: jobs are due, none is in flight, none has ended,
    for ``after`` seconds (jobs waiting for a retry are not due, so a batch that waits is not
    unserved). Says it once per such stretch."""

    def __init__(self, after: float = UNSERVED_AFTER, clock: Callable[[], float] = time.monotonic):
        self.after, self.clock = after, clock
        self._ended: int | None = None
        self._since: float | None = None
        self._told = False

    def update(self, jobs: dict[str, int]) -> float | None:
        """Feed the batch's job counts (``BatchStore.counts``); returns the seconds it has been
        unserved when it is time to say so, else None."""
        now = self.clock()
        ended = jobs["done"] + jobs["failed"]
        moved = self._ended is not None and ended != self._ended
        self._ended = ended
        if moved or jobs["in_flight"] or not jobs["queued"]:
            self._since, self._told = None, False
            return None
        if self._since is None:
            self._since = now
        idle = now - self._since
        if idle >= self.after and not self._told:
            self._told = True
            return idle
        return None


def unserved_for(status: dict) -> float | None:
    """From one `batch_status`: the seconds (up to its last minute) that a running batch has had
    jobs due and no worker on them, if at least UNSERVED_AFTER; else None."""
    j, lm = status["jobs"], status["last_minute"]
    if status["state"] != BatchState.RUNNING or j["in_flight"] or not j["queued"] or lm["requests"] or lm["ended"]:
        return None
    return lm["seconds"] if lm["seconds"] >= UNSERVED_AFTER else None


class PollBackoff:
    """How long `--follow` waits before its next read: ``shortest`` after a read that found
    outcomes, doubled after each read that found none, at most ``longest``."""

    def __init__(self, shortest: float, longest: float):
        self.shortest, self.longest = min(shortest, longest), longest
        self.wait = self.shortest

    def after_read(self, found: bool) -> float:
        """The wait before the next read, given whether this one found outcomes."""
        self.wait = self.shortest if found else min(self.wait * 2, self.longest)
        return self.wait


@dataclass
class CollectReport:
    results_written: int = 0
    errors_written: int = 0
    already_there: int = 0
    # Outcomes of this batch not written because the files hold another outcome for their
    # custom_id (an earlier batch's, or the first one before a Redis rollback): paid, not kept.
    other_there: int = 0
    finished: bool = False
    state: str = ""


def collect(store: BatchStore, batch_id: str, results_path: str, errors_path: str | None = None, *,
            follow: bool = False, poll: float = 0.5, on_note: Callable[[str], None] = print,
            on_progress: Callable[[CollectReport], None] | None = None,
            should_stop: Callable[[], bool] = lambda: False, report: CollectReport | None = None) -> CollectReport:
    """Append the batch's outcomes that the files do not hold yet.

    With ``follow``, keep going until the batch is finished (or cancelled, or
    ``should_stop()``); a paused batch is waited for. Reads follow each other within
    FOLLOW_POLL_MIN while outcomes land, backing off to ``poll`` seconds when none do. Redis going away is waited out.
    ``report``, if given, is counted into as lines are written: it holds them even when an
    exception (Ctrl-C) cuts the collect short.
    """
    if not store.exists(batch_id):
        raise LookupError(f"no batch {batch_id!r} in this Redis")
    errors_path = errors_path or default_errors_path(results_path)
    report = CollectReport() if report is None else report
    with JsonlAppender(results_path) as out, JsonlAppender(errors_path) as err:
        for path in (results_path, errors_path):
            note = repair_truncated_tail(path)
            if note:
                on_note(note)
        seen = _outcomes_in(results_path, errors_path)
        # Where this collector is in the outcome list, and the outcome it read last there. A
        # Redis that lost the list's tail (AOF tail loss, failover to a replica behind) and
        # then got new outcomes has other ones at these places: if the last one read is not
        # where it was, the list is read again from the start (the files skip what they hold).
        offset, last = 0, None
        backoff, read_from = PollBackoff(FOLLOW_POLL_MIN, poll), 0
        while True:
            try:
                if offset and not _still_there(store, batch_id, offset, last):
                    on_note(f"batch {batch_id}: the outcome list in Redis is not the one read so far (a Redis "
                            f"restart lost its tail, or a failover to a replica behind); reading it again from "
                            f"the start")
                    offset, last = 0, None
                page = store.results(batch_id, offset, PAGE)
                if page:
                    offset += len(page)
                    last = page[-1]
                    _write_page(page, seen, out, err, report)
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
            ended = report.state in (BatchState.FINISHED, BatchState.CANCELLED)
            if ended and offset >= store.results_length(batch_id) and _still_there(store, batch_id, offset, last):
                report.finished = report.state == BatchState.FINISHED
                break
            if not follow or should_stop():
                break
            time.sleep(backoff.after_read(found=offset != read_from))
            read_from = offset
    return report


def _outcomes_in(results_path: str, errors_path: str) -> SeenIds:
    """The outcomes the files already hold: custom_id -> _tag of its line id."""
    # As 24-byte digests rather than a set of strings: a million outcomes would otherwise take
    # ~100 MB here.
    seen = SeenIds()
    for path in (results_path, errors_path):
        for cid, line_id in iter_outcome_ids(path):
            seen.add(cid, _tag(line_id))
    return seen


def _write_page(page: list[bytes], seen: SeenIds, out: JsonlAppender, err: JsonlAppender,
                report: CollectReport) -> None:
    """Append the outcomes of one page ("R" or "E", then the line) that the files lack, counting
    into ``report``."""
    for raw in page:
        kind, line = raw[:1], raw[1:]
        cid, line_id = outcome_ids(line)
        tag = _tag(line_id)
        there = seen.add(cid, tag)
        if there is not None:
            report.already_there += 1
            report.other_there += there != tag
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
