"""Submitting a JSONL file: validate it, load its jobs into Redis, enqueue its shards."""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from batchrun.state import keys
from batchrun.files.jobfile import JobFileError, LineError, iter_requests, read_jobs, validate_file
from batchrun.ops.resume import merged_prices
from batchrun.policy.pricing import PriceTable
from batchrun.settings import BatchOptions, auto_shard_size
from batchrun.state.jobcounts import jobs_left
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore

CHUNK = 2000  # jobs per add_jobs call (one Lua call, one round trip)
# ... and bytes at most: Redis drops a client whose command passes its query buffer limit (1 GB by default).
CHUNK_BYTES = 64 << 20


@dataclass
class SubmitReport:
    batch_id: str
    valid: int  # valid lines in the file
    added: int  # jobs new to the batch (0 when the file was submitted before)
    total: int  # jobs in the batch now
    skipped: list[LineError] = field(default_factory=list)


def _check_prices(path, endpoint: str, table: PriceTable) -> None:
    """A spending cap needs a price for every model of the file (an extra pass, only then)."""
    missing: dict[str, int] = {}
    for job in read_jobs(path, endpoint=endpoint, skip_invalid=True):
        model = str(job.body.get("model", ""))
        if model not in missing and table.price_for(model) is None:
            missing[model] = job.line_no
    if missing:
        listed = ", ".join(f"{m!r} (first on line {n})" for m, n in missing.items())
        raise ValueError(f"{path}: no price is known for {listed}, so --max-cost cannot be kept; "
                         f"give the price with --prices FILE (see `batchrun estimate`)")


def _check_limit_models(path, endpoint: str, options: BatchOptions) -> None:
    """A MODEL=N limit for a model no job uses is a typo (`gpt4o-mini`): say so, with the file's
    models (an extra pass, only when limits name models)."""
    named = options.limits.models()
    if not named:
        return
    used = {str(job.body.get("model", "")) for job in read_jobs(path, endpoint=endpoint, skip_invalid=True)}
    unused = sorted(named - used)
    if unused:
        listed = ", ".join(repr(m) for m in unused)
        raise ValueError(f"{path}: no job uses {listed}, so its limit would never apply; the file's models are "
                         f"{', '.join(repr(m) for m in sorted(used))} (check the name in --rpm/--tpm MODEL=N); "
                         f"nothing was submitted")


def _fingerprint(path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def new_batch_id() -> str:
    return time.strftime("batch-%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def submit_file(store: BatchStore, path: str, *, batch_id: str | None = None, options: BatchOptions | None = None,
                endpoint: str = "/v1/chat/completions", skip_invalid: bool = False,
                on_skip: Callable[[LineError], None] | None = None,
                skip_ids: set[str] | None = None, prices: str | None = None) -> SubmitReport:
    """Load the jobs of ``path`` into batch ``batch_id`` (new if None) and enqueue the shards that got jobs.

    Nothing is written unless the whole file is valid or ``skip_invalid`` is set. Jobs whose
    custom_id is in ``skip_ids`` (already in the output files) are left out. ``prices`` is a
    user's price file over the shipped table; the batch keeps the merged table.
    """
    validated = _fingerprint(path)
    valid, errors = validate_file(path, endpoint=endpoint)
    if _fingerprint(path) != validated:
        raise JobFileError([], headline=f"{path} changed while it was being validated; nothing was submitted: "
                                        f"submit it again once it is complete")
    if errors and not skip_invalid:
        raise JobFileError(errors)
    if not valid:
        raise ValueError(f"{path} has no job to submit ({'no valid line' if errors else 'it is empty'}); "
                         f"nothing was submitted")
    if batch_id is not None and not keys.BATCH_ID_RE.match(batch_id):
        raise ValueError(f"batch id {batch_id!r} must be letters, digits, '.', '_' or '-' (at most 128)")
    batch_id = batch_id or new_batch_id()
    options = options or BatchOptions()
    if not options.shard_size:
        options = dataclasses.replace(options, shard_size=auto_shard_size(valid))
    existing = store.meta(batch_id)
    table = merged_prices(existing.get("prices"), prices)  # jobs added to a batch: its own table, updated by a new file
    if options.max_cost or float(existing.get("max_cost") or 0):
        _check_prices(path, endpoint, table)
    _check_limit_models(path, endpoint, options)
    store.create_batch(batch_id, options, source=str(path), prices=table.to_json())
    if existing and prices:
        store.set_prices(batch_id, table.to_json())
    shard_size = store.options(batch_id).shard_size  # an existing batch keeps its own

    added, index, chunk_bytes = 0, 0, 0
    chunk: list[tuple[str, int, bytes]] = []
    # The chunks go to Redis from two threads while this one reads on: while Redis runs one
    # chunk's script, the other thread sends the next (packing a chunk takes about as long as
    # Redis takes to add it). Chunks may land in any order: each job's shard is fixed here. At
    # most three chunks wait, so memory stays flat.
    sending: deque[Future] = deque()

    def flush() -> None:
        nonlocal added, chunk, chunk_bytes
        sending.append(sender.submit(store.add_jobs, batch_id, chunk))
        chunk, chunk_bytes = [], 0
        while len(sending) > 3 or (sending and sending[0].done()):
            added += sending.popleft().result()[0]

    if errors and on_skip is not None:
        for err in errors:
            on_skip(err)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="batchrun-submit") as sender:
        # validate_file has checked every line: the second pass trusts them (see iter_requests).
        for custom_id, request in iter_requests(path, endpoint=endpoint, skip_lines=[e.line_no for e in errors],
                                                size=validated[0]):
            if skip_ids and custom_id in skip_ids:
                continue
            shard = index // shard_size
            index += 1
            chunk.append((custom_id, shard, request))
            chunk_bytes += len(request) + len(custom_id)
            if len(chunk) >= CHUNK or chunk_bytes >= CHUNK_BYTES:
                flush()
        if chunk:
            flush()
        while sending:
            added += sending.popleft().result()[0]
    if added:
        store.reopen(batch_id)
    meta = store.meta(batch_id)
    total = int(meta.get("total", 0))
    if not jobs_left(meta):
        store.set_state(batch_id, BatchState.FINISHED, only_from=(BatchState.RUNNING,))  # empty, or all done before
    elif meta.get("state") == BatchState.RUNNING:
        # Every shard with work left gets a runner, not only those that got new jobs: a submit
        # interrupted before it enqueued, or run again, still leaves a batch that runs.
        store.wake_all_shards(batch_id)
        while store.promote_parked(limit=1000) == 1000:
            pass
    return SubmitReport(batch_id, valid, added, total, errors)
