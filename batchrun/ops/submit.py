"""Submitting a JSONL file: validate it, load its jobs into Redis, enqueue its shards."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from batchrun.state import keys
from batchrun.files.jobfile import MAX_LINE_BYTES, Job, JobFileError, LineError, iter_requests, read_jobs, validate_file
from batchrun.files.joblines import parse_line
from batchrun.files.seen_ids import SeenIds
from batchrun.ops.resume import merged_prices
from batchrun.ops.submit_cache import HitServer
from batchrun.policy.cache_entries import RequestKeys
from batchrun.policy.pricing import PriceTable
from batchrun.endpoints import (CONFIG_ENV, configured_endpoints, remote_endpoint, remote_models, unserved_models,
                                unserved_sentence)
from batchrun.remote.start import remote_models_of, request_plan, sends_remote
from batchrun.settings import BatchOptions, auto_shard_size
from batchrun.state.jobcounts import jobs_left
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore

CHUNK = 2000  # jobs per add_jobs call (one Lua call, one round trip)
# ... and bytes at most: Redis drops a client whose command passes its query buffer limit (1 GB by default).
CHUNK_BYTES = 64 << 20
# Jobs of a new batch's first shard while shards are enqueued early (`run` on the in-process Redis):
# sending starts once they have landed, not once a whole shard of up to 10,000 has.
FIRST_SHARD_JOBS = 500


@dataclass
class SubmitReport:
    batch_id: str
    valid: int  # valid lines in the file
    added: int  # jobs new to the batch (0 when the file was submitted before)
    total: int  # jobs in the batch now
    skipped: list[LineError] = field(default_factory=list)
    served: int = 0  # jobs ended at submit with answers from the response cache (never in a shard)


class _Source:
    """Where the jobs come from, for the checks and their sentences: a job file (read again for
    each check) or requests given in Python (held, validated, as Jobs)."""

    def __init__(self, path=None, endpoint: str = "", jobs: list[Job] | None = None):
        self.path, self.endpoint, self.jobs = path, endpoint, jobs

    def iter_jobs(self):
        if self.jobs is not None:
            return iter(self.jobs)
        return read_jobs(self.path, endpoint=self.endpoint, skip_invalid=True)

    @property
    def name(self) -> str:
        return str(self.path) if self.jobs is None else "the requests"

    def where(self, job: Job) -> str:
        return f"on line {job.line_no}" if self.jobs is None else f"in request {job.line_no - 1}"

    def option(self, name: str) -> str:
        """An option as the caller gave it: a flag for a file, a keyword for requests from Python."""
        flags = {"max_cost": "--max-cost", "prices": "--prices FILE", "limits": "--rpm/--tpm MODEL=N", "via": "--via"}
        keywords = {"max_cost": "max_cost=", "prices": "prices=PATH", "limits": "rpm=/tpm= {MODEL: N}", "via": "via="}
        return (flags if self.jobs is None else keywords)[name]

    @property
    def of(self) -> str:
        return "the file's" if self.jobs is None else "the requests'"


def _check_prices(source: _Source, table: PriceTable) -> None:
    """A spending cap needs a price for every model of the file (an extra pass, only then)."""
    missing: dict[str, str] = {}
    for job in source.iter_jobs():
        model = str(job.body.get("model", ""))
        if model not in missing and table.price_for(model) is None:
            missing[model] = source.where(job)
    if missing:
        listed = ", ".join(f"{m!r} (first {where})" for m, where in missing.items())
        raise ValueError(f"{source.name}: no price is known for {listed}, so {source.option('max_cost')} cannot be "
                         f"kept; give the price with {source.option('prices')}"
                         + (" (see `batchrun estimate`)" if source.jobs is None else " (a TOML price file)"))


def _check_limit_models(source: _Source, options: BatchOptions) -> None:
    """A MODEL=N limit for a model no job uses is a typo (`gpt4o-mini`): say so, with the file's
    models (an extra pass, only when limits name models)."""
    named = options.limits.models()
    if not named:
        return
    used = {str(job.body.get("model", "")) for job in source.iter_jobs()}
    unused = sorted(named - used)
    if unused:
        listed = ", ".join(repr(m) for m in unused)
        raise ValueError(f"{source.name}: no job uses {listed}, so its limit would never apply; {source.of} models "
                         f"are {', '.join(repr(m) for m in sorted(used))} (check the name in {source.option('limits')}); "
                         f"nothing was submitted")


def _fingerprint(path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def new_batch_id() -> str:
    return time.strftime("batch-%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def submit_file(store: BatchStore, path: str, *, batch_id: str | None = None, options: BatchOptions | None = None,
                endpoint: str = "/v1/chat/completions", skip_invalid: bool = False,
                on_skip: Callable[[LineError], None] | None = None,
                skip_ids: set[str] | None = None, prices: str | None = None,
                on_loading: Callable[[str], None] | None = None,
                request_keys: RequestKeys | None = None) -> SubmitReport:
    """Load the jobs of ``path`` into batch ``batch_id`` (new if None) and enqueue the shards that got jobs.

    Nothing is written unless the whole file is valid or ``skip_invalid`` is set. Jobs whose
    custom_id is in ``skip_ids`` (already in the output files) are left out. ``prices`` is a
    user's price file over the shipped table; the batch keeps the merged table.

    With ``on_loading``, a new batch's shards are enqueued as they fill, and ``on_loading(batch_id)``
    is called once the first can run: workers may send while the rest of the file loads. It is not
    called for a batch that existed (its workers start after the submit, as without it).

    With ``request_keys`` (how the workers that will run the batch key a request: `run`'s), the
    lines the response cache answers end at once as cached results and are not loaded as jobs
    (ops/submit_cache.py), unless the batch bypasses the cache.
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
    # validate_file has checked every line: the second pass trusts them (see iter_requests).
    requests = iter_requests(path, endpoint=endpoint, skip_lines=[e.line_no for e in errors], size=validated[0])
    return _submit_valid(store, _Source(path, endpoint), requests, valid, errors, batch_id=batch_id,
                         options=options, on_skip=on_skip, skip_ids=skip_ids, prices=prices, on_loading=on_loading,
                         request_keys=request_keys)


_FIRST_ON_LINE = re.compile(r"\(first on line (\d+)\)")


class RequestError(LineError):
    """Why one request given in Python (not a line of a file) cannot be submitted."""

    def __str__(self) -> str:
        return f"request {self.line_no}: {self.reason}"


def submit_requests(store: BatchStore, lines: Iterable[dict], *, batch_id: str | None = None,
                    options: BatchOptions | None = None, endpoint: str = "/v1/chat/completions",
                    skip_invalid: bool = False, on_skip: Callable[[LineError], None] | None = None,
                    skip_ids: set[str] | None = None, prices: str | None = None,
                    on_loading: Callable[[str], None] | None = None,
                    request_keys: RequestKeys | None = None) -> SubmitReport:
    """``submit_file`` for requests given in Python: Batch API lines as dicts (custom_id, method,
    url, body), or bare bodies. Every request is checked as a line of a file is, with the same
    sentences naming its index (``request 3: ...``), BEFORE anything is written: nothing is
    submitted unless all are valid or ``skip_invalid`` is set. No file is written or read."""
    seen = SeenIds()
    dumps = json.dumps
    jobs: list[Job] = []
    raws: list[bytes] = []
    errors: list[LineError] = []
    for index, line in enumerate(lines):
        try:
            raw = dumps(line).encode()
        except (TypeError, ValueError) as exc:
            errors.append(RequestError("the requests", index, f"cannot be written as JSON ({exc})"))
            continue
        if len(raw) > MAX_LINE_BYTES:
            errors.append(RequestError("the requests", index,
                                       f"longer than {MAX_LINE_BYTES >> 20} MB, more than a job can hold"))
            continue
        job = parse_line(raw, index + 1, endpoint, seen, True)  # 1-based, as SeenIds keeps line numbers
        if job.__class__ is str:
            errors.append(RequestError("the requests", index, _FIRST_ON_LINE.sub(
                lambda m: f"(first in request {int(m.group(1)) - 1})", job)))
            continue
        jobs.append(job)
        # A Batch API line is passed on as it is (its custom_id key is extra), as iter_requests does.
        raws.append(raw if "body" in line else dumps({"method": job.method, "url": job.url, "body": job.body}).encode())
    if errors and not skip_invalid:
        n = len(errors)
        raise JobFileError(errors, headline=f"{n} of the requests {'is' if n == 1 else 'are'} invalid; nothing was "
                                            f"submitted (skip_invalid=True submits the valid ones):")
    if not jobs:
        raise ValueError(f"there is no request to submit ({'none is valid' if errors else 'none was given'}); "
                         f"nothing was submitted")
    pairs = ((job.custom_id, raw) for job, raw in zip(jobs, raws))
    digest = hashlib.sha256(b"\n".join(raws)).hexdigest()[:32]  # which requests made the batch
    return _submit_valid(store, _Source(jobs=jobs), pairs, len(jobs), errors, batch_id=batch_id, options=options,
                         on_skip=on_skip, skip_ids=skip_ids, prices=prices, on_loading=on_loading,
                         requests_digest=digest, request_keys=request_keys)


def _check_served_models(source: _Source, via: str) -> set[str]:
    """With [[endpoints]] in the config file (an extra pass, only then): a model no endpoint serves
    could never be sent, nor one bound for the Batch API that no endpoint takes remote batches of.
    Returns the models the endpoints send through the Batch API under --via live (every endpoint
    serving them is via = "batch-api")."""
    endpoints = configured_endpoints()
    if not endpoints:
        return set()
    path = os.environ.get(CONFIG_ENV, "")
    models = {str(job.body.get("model", "")) for job in source.iter_jobs()}
    unserved = unserved_models(endpoints, models)
    if unserved:
        raise ValueError(f"{source.name}: {unserved_sentence(path, endpoints, unserved)}; nothing was submitted")
    remote = remote_models(endpoints, models) if via == "live" else models
    stuck = sorted(m for m in remote if remote_endpoint(endpoints, m) is None)
    if stuck:
        listed = ", ".join(repr(m) for m in stuck)
        raise ValueError(f"{source.name}: {listed} would go through the Batch API ({source.option('via')} {via}), "
                         f"but every endpoint of {path} serving {'them' if len(stuck) > 1 else 'it'} is Azure "
                         f"OpenAI, which batchrun sends no remote batches to; serve it from an OpenAI endpoint "
                         f"too, or send the batch {source.option('via')} live; nothing was submitted")
    return remote if via == "live" else set()


def _submit_valid(store: BatchStore, source: _Source, requests: Iterable[tuple[str, bytes]], valid: int,
                  errors: list[LineError], *, batch_id: str | None, options: BatchOptions | None,
                  on_skip, skip_ids: set[str] | None, prices: str | None, on_loading,
                  requests_digest: str = "", request_keys: RequestKeys | None = None) -> SubmitReport:
    """The submit once every job is known valid: the batch made (or extended), its jobs loaded."""
    if batch_id is not None and not keys.BATCH_ID_RE.match(batch_id):
        raise ValueError(f"batch id {batch_id!r} must be letters, digits, '.', '_' or '-' (at most 128)")
    batch_id = batch_id or new_batch_id()
    options = options or BatchOptions()
    if not options.shard_size:
        options = dataclasses.replace(options, shard_size=auto_shard_size(valid))
    existing = store.meta(batch_id)
    made_from = existing.get("requests_digest")
    if made_from and requests_digest and made_from != requests_digest:
        # The same custom_ids would come back with the answers to the requests the batch was made of.
        raise ValueError(f"batch {batch_id} was made from other requests than these: a batch id continues the "
                         f"requests it was made of; give another batch id for new ones (nothing was submitted)")
    table = merged_prices(existing.get("prices"), prices)  # jobs added to a batch: its own table, updated by a new file
    if options.max_cost or float(existing.get("max_cost") or 0):
        _check_prices(source, table)
    _check_limit_models(source, options)
    remote_models = _check_served_models(source, existing.get("via") or options.via)
    store.create_batch(batch_id, options, source=source.name, prices=table.to_json(), requests_digest=requests_digest)
    if remote_models:  # per-endpoint via: these models go through the Batch API (the runner reads them)
        store.redis.hset(keys.batch(batch_id), "remote_models",
                         json.dumps(sorted(remote_models | remote_models_of(existing))))
    if existing and prices:
        store.set_prices(batch_id, table.to_json())
    if errors and on_skip is not None:
        for err in errors:
            on_skip(err)
    batch_options = store.options(batch_id)  # an existing batch keeps its own
    remote = sends_remote(store.meta(batch_id))  # --via batch-api (or its endpoints'): remote batches first
    loader = _Loader(store, batch_id, batch_options.shard_size,
                     early=None if existing or remote else on_loading, reserve=valid)
    pairs = (cid_req for cid_req in requests if not (skip_ids and cid_req[0] in skip_ids))
    # A rerun's hits end here, never leased or uploaded (--via batch-api): only misses are loaded.
    hits = HitServer.open(store, batch_id, batch_options, request_keys, table) if request_keys else None
    added = loader.load(hits.misses(pairs) if hits else pairs)
    served = hits.served if hits else 0
    if added or served:
        store.reopen(batch_id)  # (a finished batch's keys no longer expire; it finishes again below)
    meta = store.meta(batch_id)
    total = int(meta.get("total", 0))
    if not jobs_left(meta):
        # Empty, all done before, or all served from the cache: finished, unless another submit
        # added jobs since the counts above were read (judged again in the script, as they are then).
        store.finish_ended(batch_id)
    elif remote:
        request_plan(store, batch_id)
    elif meta.get("state") == BatchState.RUNNING and not loader.ready_below:
        # Every shard with work left gets a runner, not only those that got new jobs: a submit
        # interrupted before it enqueued, or run again, still leaves a batch that runs. (Shards
        # enqueued while loading have theirs already.)
        store.wake_all_shards(batch_id)
        while store.promote_parked(limit=1000) == 1000:
            pass
    return SubmitReport(batch_id, valid, added, total, errors, served)


class _Loader:
    """Sends a file's jobs to Redis in chunks, from two threads while the caller reads on: while
    Redis runs one chunk's script, the other thread sends the next (packing a chunk takes about as
    long as Redis takes to add it). Chunks may land in any order: each job's shard is fixed here. At
    most three chunks wait, so memory stays flat.

    With ``early`` (a new batch), every shard is enqueued as soon as all its jobs have landed, and
    ``early(batch_id)`` is called at the first. Until the load ends, the batch's total holds
    ``reserve`` jobs more than it has (at least as many as will be added): a shard that ends before
    the rest is loaded must not see its jobs as the whole batch and finish it."""

    def __init__(self, store: BatchStore, batch_id: str, shard_size: int, *,
                 early: Callable[[str], None] | None, reserve: int):
        self.store, self.batch_id, self.shard_size = store, batch_id, shard_size
        self.early, self.reserve = early, reserve if early else 0
        # Smaller chunks while shards are enqueued early, and a small first shard: it is ready sooner.
        self.chunk_jobs = min(CHUNK, max(100, shard_size // 2)) if early else CHUNK
        self.first = min(shard_size, FIRST_SHARD_JOBS) if early else shard_size
        self.added = 0
        self.ready_below = 0  # shards below this one are enqueued
        self.sending: deque[tuple[Future, int]] = deque()  # (add_jobs call, first shard of the next chunk)

    def load(self, requests) -> int:
        """Load (custom_id, request JSON) pairs; returns how many jobs were new to the batch."""
        if self.reserve:
            self._count_total(self.reserve)
        try:
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="batchrun-submit") as self.sender:
                shards = self._send_all(requests)
                while self.sending:
                    self._land()
                # Every chunk has landed: the last shard too is whole, also when the last chunk was
                # full and so ended inside it (300 jobs, shards of 200, chunks of 100).
                self._ready(shards)
        finally:
            if self.reserve:
                self._count_total(-self.reserve)
        return self.added

    def _send_all(self, requests) -> int:
        """Send every chunk; returns how many shards the jobs fill."""
        chunk: list[tuple[str, int, bytes]] = []
        index = chunk_bytes = 0
        for custom_id, request in requests:
            chunk.append((custom_id, self.shard_of(index), request))
            index += 1
            chunk_bytes += len(request) + len(custom_id)
            # The first shard's jobs go as one chunk of their own.
            if len(chunk) >= self.chunk_jobs or chunk_bytes >= CHUNK_BYTES or index == self.first:
                self._flush(chunk, self.shard_of(index))
                chunk, chunk_bytes = [], 0
        shards = self.shard_of(index - 1) + 1 if index else 0
        if chunk:
            self._flush(chunk, shards)
        return shards

    def shard_of(self, index: int) -> int:
        """The shard of the job at ``index`` (from 0): the first ``first`` jobs, then ``shard_size`` each."""
        return 0 if index < self.first else 1 + (index - self.first) // self.shard_size

    def _flush(self, chunk: list, next_shard: int) -> None:
        self.sending.append((self.sender.submit(self.store.add_jobs, self.batch_id, chunk), next_shard))
        while len(self.sending) > 3 or (self.sending and self.sending[0][0].done()):
            self._land()

    def _land(self) -> None:
        """Wait for the oldest chunk; the chunks before it have landed, so every shard below the
        next chunk's first one has all its jobs."""
        future, next_shard = self.sending.popleft()
        self.added += future.result()[0]
        self._ready(next_shard)

    def _ready(self, next_shard: int) -> None:
        """Every shard below ``next_shard`` has all its jobs: enqueue those not enqueued yet."""
        if self.early is None or next_shard <= self.ready_below:
            return
        for shard in range(self.ready_below, next_shard):
            self.store.park(self.batch_id, shard, None)  # due now; shards without jobs are skipped
        self.store.promote_parked(limit=1000)
        if self.ready_below == 0:
            self.early(self.batch_id)
        self.ready_below = next_shard

    def _count_total(self, n: int) -> None:
        self.store.redis.hincrby(keys.batch(self.batch_id), "total", n)
