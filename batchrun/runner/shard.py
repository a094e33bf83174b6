"""Running one shard of a batch: the RQ job ``run_shard(batch_id, shard)``.

A shard runner leases its shard's due jobs from Redis and keeps up to
``concurrency`` requests in flight with asyncio. Each job ends one of three
ways: a result or a final error (``complete``), or a requeue with a due time
(``requeue``), which holds no slot while it waits. When only jobs waiting for
their backoff remain, the runner parks the shard and frees its RQ worker; a
worker's maintenance wakes the shard when it is due.

Running one shard twice at once is harmless: jobs are leased one by one, and
a job's first outcome wins. That is what makes recovery simple.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import threading
import time
import types
import uuid
from collections import Counter

import openai
import redis

from batchrun.policy.backoff import BackoffPolicy
from batchrun.policy.classify import BATCH_ID_PLACEHOLDER, remember_secrets
from batchrun.policy.pricing import PriceTable
from batchrun.runner import maintenance
from batchrun.runner.attempt import JobAttempts
from batchrun.runner.fairturn import FairTurn
from batchrun.state.batching import Batcher
from batchrun.state.counters import CounterNames
from batchrun.runner.routes import Routes
from batchrun.runner.sender import heard_at, send
from batchrun.runner.wording import event_phrase, human_wait, outage_cause, v1_suggestion
from batchrun.run_scope import PROCESS_STOP, current_scope
from batchrun.settings import BatchOptions, WorkerSettings
from batchrun.state.retry import until_reachable
from batchrun.state.states import BatchState, PauseKind
from batchrun.state.store import BatchStore
from batchrun.urls import mask_url

# Callers import these from here: the RQ job function, the stop flag, and (tests) the sentences.
__all__ = ["STOP", "ShardRunner", "outage_cause", "run_shard", "v1_suggestion"]

log = logging.getLogger("batchrun.worker")

# Set when this process should stop taking jobs (SIGTERM in a work horse): runners finish their
# in-flight requests within the grace period and give back the rest. A run's in-process runners
# stop on their run's own flag instead (run_scope.py).
STOP = PROCESS_STOP

LEASE_BATCH = 500  # jobs per lease call at most
SUMMARY_EVERY = 5.0  # seconds between one-line summaries of retries
FOREIGN_SHARD_DELAY_MS = 200  # another run's shard, dequeued by this run's worker, is due again after this
METRICS_EVERY = 1.0  # seconds between reports of counts for `status`
_CIRCUIT_LINES: dict[str, float] = {}  # base URL -> when this process last said its circuit is open


def run_shard(batch_id: str, shard: int) -> dict:
    """RQ entry point (JSON-serializable arguments and result)."""
    from rq import get_current_job

    job = get_current_job()
    store = BatchStore(job.connection)
    scope = current_scope()
    if not scope.serves(batch_id):
        # Another run's shard (several runs in one process): due again soon, for that run's workers.
        store.hold_shard(batch_id, shard, FOREIGN_SHARD_DELAY_MS)
        return {}
    return asyncio.run(ShardRunner(store, batch_id, shard, scope.settings, stop=scope.stop).run())


class ShardRunner(JobAttempts):
    """One shard's run: leasing, the loop, stopping; each job's attempt is JobAttempts (runner/attempt.py)."""

    def __init__(self, store: BatchStore, batch_id: str, shard: int, settings: WorkerSettings,
                 stop: threading.Event = STOP):
        self.store = store
        self.stop = stop  # this runner's stop flag: its run's, or the process's
        self.batch_id = batch_id
        self.shard = shard
        self.settings = settings
        remember_secrets(settings.api_key, settings.base_url)  # a server may echo them: messages hide them
        self.token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.owner = f"{self.token}|{shard}"
        self.lease_ms = int(settings.lease_seconds * 1000)
        self.inflight: dict[str, asyncio.Task] = {}
        self.rng = random.Random()
        self.stats = Counter()
        self.metrics = Counter()  # counts not yet reported to Redis (see store.add_metrics)
        self._on_the_wire: set[str] = set()  # jobs whose request has been sent, not yet answered
        # Jobs whose budget is taken (waiting for their turn, or sent): a yield lets them go, since
        # cancelling them wastes what they took, and a request needing more of the budget than a
        # fair turn lasts would lose its place every turn and never be sent.
        self._granted: set[str] = set()
        self._yielding = False  # the loop gave the worker back (a fair turn, max_shard_seconds)
        self._events: dict[str, tuple[int, float | None]] = {}  # event class -> (count, soonest retry)
        self._capped: dict[str, float] = {}  # event class -> longest server hint cut to the backoff cap
        self._outage: tuple[str, int, int] = ("", 0, 0)  # what the failures are, endpoint down since, now (ms)
        self._side_tasks: set[asyncio.Task] = set()
        self._day_counted: dict[str, tuple] = {}  # job -> (route, model, day, tokens) counted by day_take, not sent
        self._short_today: dict[str, dict[str, int]] = {}  # job -> {endpoint: tokens left}: too large for today
        self._said_short: set[str] = set()  # models whose jobs' wait for a new day was said (the first's)
        self._deferring: set[str] = set()  # jobs of this runner being set aside for a new day just now
        self._via: dict[tuple[str, str], CounterNames] = {}  # (endpoint, model) -> its budget's metric names
        self._avoid: dict[str, str] = {}  # custom_id -> the endpoint its last attempt failed on (a 429, an outage)
        self._last_summary = time.monotonic()
        self._awaiting = 0  # requests sent whose answer has not come back
        self._heard_at = 0.0  # time.monotonic() when an answer (or anything but a timeout) last came back
        self._waiting_since = 0.0  # time.monotonic() when requests last began to wait with none waiting before

    async def run(self) -> dict:
        store, bid = self.store, self.batch_id
        meta = await self._redis(store.meta, bid)
        if not meta:
            log.info("batch %s no longer exists (purged or expired): shard %d has nothing to do", bid, self.shard)
            await self._redis(store.unpark, bid, self.shard)
            return {}
        options = await self._usable_options(meta)
        if options is None:
            await self._redis(store.unpark, bid, self.shard)
            return {}
        await self._set_up(meta, options)
        renewer = asyncio.create_task(self._renew_leases())
        reporter = asyncio.create_task(self._report_metrics())
        log.info("batch %s shard %d: started (concurrency %d)", bid, self.shard, self.settings.concurrency)
        try:
            await self._loop()
        finally:
            await self._wind_down(renewer, reporter)
        log.info("batch %s shard %d: stopped (%s)", bid, self.shard,
                 ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items())) or "nothing to do")
        return dict(self.stats)

    async def _usable_options(self, meta: dict[str, str]) -> BatchOptions | None:
        """The batch's options; None (and the batch paused) when they cannot work."""
        try:
            options = BatchOptions.from_fields(meta)
            problems = options.problems()
        except (ValueError, TypeError, OverflowError, AttributeError) as exc:
            problems = [f"they do not read as options ({exc})"]
        if not problems:
            return options
        # Not a crash that RQ and the shard's parked entry would bring back for ever.
        bid = self.batch_id
        message = (f"its stored options cannot work: {'; '.join(problems)}; purge it (batchrun purge {bid}) "
                   f"and submit the file again with options that work")
        if await self._redis(self.store.set_state, bid, BatchState.PAUSED, message,
                             only_from=(BatchState.RUNNING,), pause_kind=PauseKind.BAD_OPTIONS):
            log.error("batch %s paused: %s", bid, message)
        return None

    async def _set_up(self, meta: dict[str, str], options: BatchOptions) -> None:
        store, bid = self.store, self.batch_id
        self.give_up_seconds = options.give_up_seconds
        self.running_since_ms = float(meta.get("running_since") or 0)  # set on resume: a fresh give-up period
        self.prices = PriceTable.from_json(meta["prices"]) if meta.get("prices") else PriceTable.load()
        self._prices_by_model: dict = {}
        self.max_cost = options.max_cost
        # The shard's parked entry is this runner's lease on it (renewed with the job leases): if
        # the runner dies, even before it leased anything, the entry comes due and a new one starts.
        await self._redis(store.hold_shard, bid, self.shard, self.lease_ms)
        self.policy = BackoffPolicy(base=options.backoff_base, factor=options.backoff_factor,
                                    cap=options.backoff_cap, max_attempts=options.max_attempts)
        self.routes = Routes(store, self.settings, options, self.token)  # its endpoints (runner/routes.py)
        self.limiter = self.routes.first.limiter
        self.client = self.routes.first.client_for("")
        self.completer = Batcher(lambda items: [store.complete(bid, items, self.owner)] * len(items), name="result")
        self.requeuer = Batcher(lambda items: [store.requeue(bid, self.owner, self.shard, items)] * len(items),
                                name="retry")
        self.coster = Batcher(self._reserve_costs, name="cost reservation", max_delay=0.002)
        self.turn = FairTurn(store, bid, self.shard, self.token,
                             [route.limiter for route in self.routes.all])  # fair share between batches
        await self._redis(self.turn.start)
        self._set_up_cache(meta, options)  # runner/cached.py

    async def _wind_down(self, renewer: asyncio.Task, reporter: asyncio.Task) -> None:
        if self.inflight:
            await self._finish_in_flight()
        if self._side_tasks:
            await asyncio.gather(*self._side_tasks, return_exceptions=True)
        await self.routes.drain()
        await self._redis(self.routes.forget_held)
        await self._redis(self.turn.stop)
        await self.coster.drain()  # before the requeues, which release what it set aside
        await self.completer.drain()
        await self.requeuer.drain()
        renewer.cancel()
        reporter.cancel()
        await self._flush_metrics()
        # Jobs left (requeued by requests still in flight when the loop ended, a yield, a pause
        # already resumed) need a runner: park the shard at their due time; else let go of it.
        if not await self._redis(self.store.park_if_waiting, self.batch_id, self.shard):
            await self._redis(self.store.unpark, self.batch_id, self.shard)
        await self.routes.close()
        self._summarise(force=True)

    async def _finish_in_flight(self) -> None:
        # Only requests on the wire are waited for: jobs waiting for the circuit, the budget or
        # the spending cap go back at once (given back by _process, no attempt lost), so neither
        # a stop nor a pause waits on a server that is down. A yield also lets the jobs whose budget
        # is taken go (bounded like the rest by the grace below): its wait is the budget's, not a server's.
        for cid, task in self.inflight.items():
            if cid not in self._on_the_wire and not (self._yielding and cid in self._granted):
                task.cancel()
        if self._yielding:
            await self._let_granted_go(self.settings.request_timeout + 5)
        # (not stopping: a request ends within its timeout, which bounds this wait too)
        grace = self.settings.grace_seconds if self.stop.is_set() else self.settings.request_timeout + 5
        if self.stop.is_set():
            log.warning("batch %s shard %d: stopping; %d request(s) in flight get %.0f s to finish, "
                        "the shard's other jobs go back to the queue", self.batch_id, self.shard,
                        len(self._on_the_wire), grace)
        late = await self._wait_in_flight(grace)
        for task in late:  # given back by _process, without costing an attempt
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def _wait_in_flight(self, limit: float) -> set[asyncio.Task]:
        """Wait up to ``limit`` s for the tasks in flight; a stop meanwhile (a Ctrl-C while a pause or a
        yield winds down) cuts it to the grace period from then. Returns the tasks still running."""
        deadline, stopping = time.monotonic() + limit, self.stop.is_set()
        pending = set(self.inflight.values())
        while pending and time.monotonic() < deadline:
            if not stopping and self.stop.is_set():
                stopping, deadline = True, min(deadline, time.monotonic() + self.settings.grace_seconds)
            _, pending = await asyncio.wait(pending, timeout=min(1.0, max(0.01, deadline - time.monotonic())))
        return pending

    async def _let_granted_go(self, limit: float) -> None:
        """A yield's jobs whose budget is taken wait for their turn and go out, within ``limit``; a
        stop meanwhile (this runner's: its run's, or the process's) sends them back like the others
        (the stop's grace is for the wire only)."""
        deadline = time.monotonic() + limit
        while not self.stop.is_set() and time.monotonic() < deadline:
            waiting = [task for cid, task in self.inflight.items() if cid not in self._on_the_wire]
            if not waiting:
                return
            await asyncio.wait(waiting, timeout=min(1.0, max(0.01, deadline - time.monotonic())))
        for cid, task in list(self.inflight.items()):
            if cid not in self._on_the_wire:
                task.cancel()

    async def _redis(self, fn, *args, **kwargs):
        """A store call from the event loop, retried while Redis is unreachable."""
        return await until_reachable(
            lambda: fn(*args, **kwargs),
            lambda exc, delay: log.warning("batch %s shard %d: Redis unreachable (%s); retrying in %.1f s",
                                           self.batch_id, self.shard, exc, delay))

    async def _loop(self) -> None:
        started = time.monotonic()
        next_due_ms = now_ms = None
        concurrency = self.settings.concurrency
        low_water = max(1, concurrency // 8)  # lease in groups, not one round trip per freed slot
        last_maintenance = last_lease = 0.0
        while True:
            if self.stop.is_set():
                return
            if time.monotonic() - last_maintenance > maintenance.INTERVAL:
                last_maintenance = time.monotonic()
                await self._redis(maintenance.run_once, self.store)
            free = concurrency - len(self.inflight)
            # With every slot waiting (for the circuit, the budget), still read the batch's state once
            # a second: a pause or a cancel then stops the waiting jobs before they are sent.
            if free >= low_water or not self.inflight or time.monotonic() - last_lease > 1.0:
                last_lease = time.monotonic()
                if time.monotonic() - started > self.settings.max_shard_seconds or (
                        self.turn.due() and await self._redis(self.turn.should_yield)):
                    # Give the RQ worker back so other batches get a turn; the shard continues later.
                    self._yielding = True
                    return  # run() parks the shard on the way out if work is left
                lease = await self._redis(self.store.lease, self.batch_id, self.shard,
                                          min(free, LEASE_BATCH), self.lease_ms, self.token)
                if lease.state != BatchState.RUNNING:
                    log.info("batch %s is %s: shard %d stops taking jobs", self.batch_id, lease.state, self.shard)
                    return
                for job in lease.jobs:
                    if job.custom_id in self.inflight:
                        # Our lease lapsed (Redis was away) and the job came back to us: the attempt in
                        # flight goes on under the new lease rather than sending it a second time.
                        continue
                    self.inflight[job.custom_id] = asyncio.create_task(self._process(job))
                next_due_ms, now_ms = lease.next_due_ms, lease.now_ms
                self.max_cost = lease.max_cost  # a cap set on a running batch applies from here
                if not lease.jobs and not self.inflight:
                    if next_due_ms is None:
                        return  # nothing left in this shard
                    wait = (next_due_ms - now_ms) / 1000
                    if wait > self.settings.park_after_seconds:  # run() parks it on the way out
                        log.info("batch %s shard %d: all remaining jobs wait for a retry; parked for %.1f s",
                                 self.batch_id, self.shard, wait)
                        return
                    await asyncio.sleep(max(wait, 0.01))
                    continue
            # Wait for a slot to free, or for the next retry to come due.
            timeout = 1.0
            if next_due_ms is not None:
                timeout = min(timeout, max(0.02, (next_due_ms - now_ms) / 1000))
            if self.inflight:
                await asyncio.wait(list(self.inflight.values()), timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            if await self._gave_up_on_silence():
                return
            self._summarise()

    async def _send(self, url: str, body: dict, client=None):
        """send(), noting when anything last came back: a server that accepts requests and never answers
        fails no attempt before the request timeout, so the give-up time is judged on the wire too."""
        if not self._awaiting:
            self._waiting_since = time.monotonic()
        self._awaiting += 1
        heard = True
        try:
            return await send(client or self.client, url, body)
        except openai.APITimeoutError:
            heard = False
            raise
        except asyncio.CancelledError:
            heard = False
            raise
        finally:
            self._awaiting -= 1
            if heard:
                self._heard_at = time.monotonic()

    async def _gave_up_on_silence(self) -> bool:
        """Requests have waited past --give-up-after with nothing at all back from the server: pause the
        batch as for a server that refuses connections, and give the requests on the wire back."""
        if not self._awaiting or not self.give_up_seconds > 0:
            return False
        silent = time.monotonic() - max(self._heard_at, heard_at(self.client), self._waiting_since)
        if silent < self.give_up_seconds:
            return False
        self._outage = (f"{self._awaiting} request(s) in flight got no answer at all", 0, 0)
        # _gave_up_message counts from the later of the outage's start and the batch's (Redis) start.
        now_ms = max(time.time() * 1000, self.running_since_ms + silent * 1000)
        circuit = types.SimpleNamespace(down_since_ms=now_ms - silent * 1000, now_ms=now_ms)
        message = self._gave_up_message(circuit).replace(BATCH_ID_PLACEHOLDER, self.batch_id)
        if await self._redis(self.store.set_state, self.batch_id, BatchState.PAUSED, message,
                             only_from=(BatchState.RUNNING,), pause_kind=PauseKind.GAVE_UP):
            log.error("batch %s paused: %s", self.batch_id, message)
        self.stats["paused"] += 1
        for cid in self._on_the_wire:  # given back by _process, without costing an attempt (maybe paid)
            if cid in self.inflight:
                self.inflight[cid].cancel()
        return True

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            try:
                await asyncio.to_thread(self.store.renew, self.batch_id, self.owner, self.lease_ms,
                                        list(self.inflight))
                await asyncio.to_thread(self.store.hold_shard, self.batch_id, self.shard, self.lease_ms)
                await asyncio.to_thread(self.routes.report_held)
                await asyncio.to_thread(self.routes.renew_slots)
                await asyncio.to_thread(self.limiter.report_held)
                await asyncio.to_thread(self._renew_cache_claims)  # claims live as long as the leases
            except Exception as exc:  # Redis away: leases may lapse; results still land once
                log.warning("could not renew leases of batch %s: %s", self.batch_id, exc)

    async def _report_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_EVERY)
            await self._flush_metrics()

    async def _flush_metrics(self) -> None:
        routes = getattr(self, "routes", None)
        if routes is not None and routes.noticed:  # budgets found with their day spent (runner/routes.py)
            self.metrics.update(routes.noticed)
            routes.noticed.clear()
        if not self.metrics:
            return
        counts, self.metrics = self.metrics, Counter()
        try:
            await asyncio.to_thread(self.store.add_metrics, self.batch_id, counts)
        except (redis.ConnectionError, redis.TimeoutError):
            self.metrics.update(counts)  # reported with the next ones

    def _reserve_costs(self, items: list[tuple[str, float]]) -> list[bool]:
        reason, allowed = self.store.reserve_cost(self.batch_id, self.owner, items)
        if reason:
            log.error("batch %s paused: %s", self.batch_id, reason)
        return allowed

    def _note_event(self, kind: str, delay: float) -> None:
        n, soonest = self._events.get(kind, (0, None))
        self._events[kind] = (n + 1, delay if soonest is None else min(soonest, delay))

    def _summarise(self, force: bool = False) -> None:
        """One line per event class every few seconds, not one per request (`-v` shows each)."""
        now = time.monotonic()
        if not self._events or (not force and now - self._last_summary < SUMMARY_EVERY):
            return
        self._last_summary = now
        for kind, (n, soonest) in sorted(self._events.items()):
            if kind == "circuit_open":
                url = self.settings.base_url
                if self.stats["paused"] or now - _CIRCUIT_LINES.get(url, -SUMMARY_EVERY) < SUMMARY_EVERY:
                    continue  # the pause said it all, or another runner of this process said it just now
                _CIRCUIT_LINES[url] = now
                cause, down_since, at = self._outage
                left = self.give_up_seconds - (at - max(down_since, self.running_since_ms)) / 1000
                log.warning("batch %s shard %d: %s is failing (%s); circuit open, %d job(s) wait %.1f s or more "
                            "without losing attempts; the batch pauses if it is still down in %.0f s",
                            self.batch_id, self.shard, mask_url(url), cause or "outage", n, soonest, max(0.0, left))
            elif kind in self._capped:
                log.warning("batch %s shard %d: %s: %d job(s) requeued, next retry in %.1f s; the server asked "
                            "for %s, capped at --backoff-cap %g s", self.batch_id, self.shard, event_phrase(kind),
                            n, soonest, human_wait(self._capped[kind]), self.policy.cap)
            else:
                log.info("batch %s shard %d: %s: %d job(s) requeued, next retry in %.1f s",
                         self.batch_id, self.shard, event_phrase(kind), n, soonest)
        self._events.clear()
        self._capped.clear()
