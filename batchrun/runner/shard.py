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
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
import types
import uuid
from collections import Counter
from urllib.parse import urlsplit

import aiohttp
import openai
import redis

from batchrun.runner import maintenance
from batchrun.policy.backoff import BackoffPolicy, backoff_delay, gave_up, hint_exceeds_cap
from batchrun.runner.batching import Batcher
from batchrun.policy.classify import (BATCH_ID_PLACEHOLDER, Action, Verdict, classify_answer, classify_error_object,
                               classify_exception, redact_response, remember_secrets, stream_truncated_verdict)
from batchrun.state.limiter import SharedLimiter, stored_number
from batchrun.state.retry import until_reachable
from batchrun.state.states import BatchState
from batchrun.files.outputs import error_line, result_line
from batchrun.policy.pricing import PriceTable, answer_cost, usage_total_tokens, worst_case_cost
from batchrun.runner.sender import StreamFailed, StreamTruncated, heard_at, make_client, may_have_reached_server, send
from batchrun.settings import BatchOptions, WorkerSettings, current_worker_settings
from batchrun.state.store import BatchStore, LeasedJob
from batchrun.policy.tokens import estimate_tokens, server_charge_estimate
from batchrun.urls import mask_url

log = logging.getLogger("batchrun.worker")

# Set when this process should stop taking jobs (SIGTERM in a work horse, Ctrl-C in `run`):
# runners finish their in-flight requests within the grace period and give back the rest.
STOP = threading.Event()

LEASE_BATCH = 500  # jobs per lease call at most
SUMMARY_EVERY = 5.0  # seconds between one-line summaries of retries
METRICS_EVERY = 1.0  # seconds between reports of counts for `status`
_CIRCUIT_LINES: dict[str, float] = {}  # base URL -> when this process last said its circuit is open
_V1_HINTED: set[str] = set()  # base URLs this process has said lack /v1
# Statuses of requests the server refused before processing them, charging nothing
# (OpenAI does not count refused requests against the limits).
REFUSED_UNCHARGED = frozenset({400, 401, 403, 404, 422, 429})


def run_shard(batch_id: str, shard: int) -> dict:
    """RQ entry point (JSON-serializable arguments and result)."""
    from rq import get_current_job

    job = get_current_job()
    store = BatchStore(job.connection)
    return asyncio.run(ShardRunner(store, batch_id, shard, current_worker_settings()).run())


class ShardRunner:
    def __init__(self, store: BatchStore, batch_id: str, shard: int, settings: WorkerSettings):
        self.store = store
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
        self._events: dict[str, tuple[int, float | None]] = {}  # event class -> (count, soonest retry)
        self._capped: dict[str, float] = {}  # event class -> longest server hint cut to the backoff cap
        self._outage: tuple[str, int, int] = ("", 0, 0)  # what the failures are, endpoint down since, now (ms)
        self._side_tasks: set[asyncio.Task] = set()
        self._via: dict[str, str] = {}  # model -> its budget's metric name
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
        try:
            options = BatchOptions.from_fields(meta)
            problems = options.problems()
        except (ValueError, TypeError, OverflowError, AttributeError) as exc:
            problems = [f"they do not read as options ({exc})"]
        if problems:  # not a crash that RQ and the shard's parked entry would bring back for ever
            message = (f"its stored options cannot work: {'; '.join(problems)}; purge it (batchrun purge {bid}) "
                       f"and submit the file again with options that work")
            if await self._redis(store.set_state, bid, BatchState.PAUSED, message, only_from=(BatchState.RUNNING,)):
                log.error("batch %s paused: %s", bid, message)
            await self._redis(store.unpark, bid, self.shard)
            return {}
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
        self.limiter = SharedLimiter(store, self.settings, options, token=self.token)
        self.client = make_client(self.settings)
        self.completer = Batcher(lambda items: [store.complete(bid, items, self.owner)] * len(items), name="result")
        self.requeuer = Batcher(lambda items: [store.requeue(bid, self.owner, self.shard, items)] * len(items),
                                name="retry")
        self.coster = Batcher(self._reserve_costs, name="cost reservation", max_delay=0.002)
        renewer = asyncio.create_task(self._renew_leases())
        reporter = asyncio.create_task(self._report_metrics())
        log.info("batch %s shard %d: started (concurrency %d)", bid, self.shard, self.settings.concurrency)
        try:
            await self._loop()
        finally:
            if self.inflight:
                # Only requests on the wire are waited for: jobs waiting for the circuit, the budget or
                # the spending cap go back at once (given back by _process, no attempt lost), so neither
                # a stop nor a pause waits on a server that is down.
                for cid, task in self.inflight.items():
                    if cid not in self._on_the_wire:
                        task.cancel()
                # (not stopping: a request ends within its timeout, which bounds this wait too)
                grace = self.settings.grace_seconds if STOP.is_set() else self.settings.request_timeout + 5
                if STOP.is_set():
                    log.warning("batch %s shard %d: stopping; %d request(s) in flight get %.0f s to finish, "
                                "the shard's other jobs go back to the queue", bid, self.shard,
                                len(self._on_the_wire), grace)
                _, late = await asyncio.wait(list(self.inflight.values()), timeout=grace)
                for task in late:  # given back by _process, without costing an attempt
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
            if self._side_tasks:
                await asyncio.gather(*self._side_tasks, return_exceptions=True)
            await self.limiter.drain()
            await self._redis(self.limiter.forget_held)
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
            await self.client.close()
            self._summarise(force=True)
        log.info("batch %s shard %d: stopped (%s)", bid, self.shard,
                 ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items())) or "nothing to do")
        return dict(self.stats)

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
            if STOP.is_set():
                return
            if time.monotonic() - last_maintenance > maintenance.INTERVAL:
                last_maintenance = time.monotonic()
                await self._redis(maintenance.run_once, self.store)
            free = concurrency - len(self.inflight)
            # With every slot waiting (for the circuit, the budget), still read the batch's state once
            # a second: a pause or a cancel then stops the waiting jobs before they are sent.
            if free >= low_water or not self.inflight or time.monotonic() - last_lease > 1.0:
                last_lease = time.monotonic()
                if time.monotonic() - started > self.settings.max_shard_seconds:
                    # Give the RQ worker back so other batches get a turn; the shard continues later.
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

    async def _send(self, url: str, body: dict):
        """send(), noting when anything last came back: a server that accepts requests and never answers
        fails no attempt before the request timeout, so the give-up time is judged on the wire too."""
        if not self._awaiting:
            self._waiting_since = time.monotonic()
        self._awaiting += 1
        heard = True
        try:
            return await send(self.client, url, body)
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
                             only_from=(BatchState.RUNNING,)):
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
                await asyncio.to_thread(self.limiter.report_held)
            except Exception as exc:  # Redis away: leases may lapse; results still land once
                log.warning("could not renew leases of batch %s: %s", self.batch_id, exc)

    async def _report_metrics(self) -> None:
        while True:
            await asyncio.sleep(METRICS_EVERY)
            await self._flush_metrics()

    async def _flush_metrics(self) -> None:
        if not self.metrics:
            return
        counts, self.metrics = self.metrics, Counter()
        try:
            await asyncio.to_thread(self.store.add_metrics, self.batch_id, counts)
        except (redis.ConnectionError, redis.TimeoutError):
            self.metrics.update(counts)  # reported with the next ones

    def _price(self, model: str):
        """The model's price, looked up once per runner (a miss walks aliases and prefixes)."""
        if model not in self._prices_by_model:
            self._prices_by_model[model] = self.prices.price_for(model)
        return self._prices_by_model[model]

    def _reserve_costs(self, items: list[tuple[str, float]]) -> list[bool]:
        reason, allowed = self.store.reserve_cost(self.batch_id, self.owner, items)
        if reason:
            log.error("batch %s paused: %s", self.batch_id, reason)
        return allowed

    async def _process(self, job: LeasedJob) -> None:
        try:
            await self._attempt(job)
        except asyncio.CancelledError:
            # Stopping: the request may have gone out (it may be sent again), its result is not lost.
            await self.requeuer.submit((job.custom_id, 0, False, "", job.custom_id in self._on_the_wire))
            raise
        except Exception as exc:
            # A bug in batchrun, not in the request: it costs the job an attempt, so that one that
            # fails every time ends in the errors file instead of looping forever.
            log.exception("batch %s: unexpected error on job %s", self.batch_id, job.custom_id)
            verdict = Verdict(Action.RETRY, "unknown", f"batchrun failed on this job: {type(exc).__name__}: {exc}")
            try:
                await self._handle_failure(job, "", verdict, None, False)
            except Exception:
                await self.requeuer.submit((job.custom_id, 5000, True, ""))
        finally:
            self.inflight.pop(job.custom_id, None)
            self._on_the_wire.discard(job.custom_id)

    async def _attempt(self, job: LeasedJob) -> None:
        url, body = job.request["url"], job.request["body"]
        model = str(body.get("model", ""))
        estimate = estimate_tokens(url, body)
        price = self._price(model)
        if self.max_cost > 0:
            if price is None:  # not the job's fault: the batch waits for a price
                message = (f"no price is known for model {model!r} (job {job.custom_id}), so the --max-cost "
                           f"cannot be kept; give its price with: batchrun resume {self.batch_id} --prices FILE")
                if await self._redis(self.store.set_state, self.batch_id, BatchState.PAUSED, message,
                                     only_from=(BatchState.RUNNING,)):
                    log.error("batch %s paused: %s", self.batch_id, message)
                await self.requeuer.submit((job.custom_id, 0, False, ""))
                return
            # The cap holds even if every request in flight costs its worst case.
            worst = worst_case_cost(price, estimate.input_tokens, estimate.output_tokens)
            if not await self.coster.submit((job.custom_id, worst)):
                await self.requeuer.submit((job.custom_id, 0, False, ""))  # the batch is paused
                return
        # The budget counts the input as OpenAI says its admission does (characters / 4) where that
        # is more than tiktoken's count; "too large" is judged on the smaller of the two.
        server_in = server_charge_estimate(url, body) - estimate.output_tokens
        budget_in = max(estimate.input_tokens, server_in)
        admission = await self.limiter.admit(model, budget_in, estimate.output_tokens,
                                             least_input=min(estimate.input_tokens, server_in))
        if admission is None:
            _, tpm = self.limiter.limits(model)
            # The budget judges by the strictest --tpm of the batches sharing it (reserve.lua keeps it).
            in_force = stored_number(await self._redis(self.store.redis.hget, self.limiter.budget_key(model), "cfg_tpm"))
            if in_force and in_force != tpm:
                limit = f"the {in_force:,.0f} tokens-per-minute limit in force (the strictest --tpm of the batches on it)"
            else:
                limit = f"--tpm {tpm}" if tpm else "the server's tokens-per-minute limit"
            await self._finish_error(job, "request_too_large",
                                     f"job {job.custom_id} needs at least "
                                     f"{min(estimate.input_tokens, server_in) + estimate.output_tokens} tokens, "
                                     f"more than {limit} allows for {model} in a minute; it can never be sent "
                                     f"(reduce its prompt or "
                                     f"max_tokens, or raise the limit)")
            return
        self.limiter.sent(model, admission)
        started = time.monotonic()
        self._on_the_wire.add(job.custom_id)
        error = None
        try:
            answer = await self._send(url, body)
        except StreamTruncated:
            verdict, response, headers = stream_truncated_verdict(), None, None
        except StreamFailed as exc:
            verdict = classify_error_object(exc.error, now=time.time(), streamed=True, fallback=str(exc))
            response, headers = None, None
        except Exception as exc:
            if not may_have_reached_server(exc):  # refused, DNS, TLS, connect timeout: nothing to pay
                self._on_the_wire.discard(job.custom_id)
            error = exc
            verdict, response = classify_exception(exc, now=time.time()), _failed_response(exc)
            headers = getattr(getattr(exc, "response", None), "headers", None)
        else:
            # A 2xx that is no result (a proxy's page, an error body, a failed response) fails like an error.
            verdict, headers = classify_answer(url, answer.headers, answer.body, now=time.time()), answer.headers
            response = {"status_code": answer.status_code, "request_id": answer.request_id, "body": answer.body}
        if verdict is None:
            self._background(self.limiter.observe(model, answer.headers, admission, time.monotonic() - started,
                                                  input_tokens=budget_in,
                                                  output_tokens=estimate.output_tokens, charged=True))
            self._background(self.limiter.record(False, admission.probe))
            line = result_line(job.custom_id, status_code=answer.status_code, request_id=answer.request_id,
                               body=answer.body)
            usage = answer.body.get("usage") if isinstance(answer.body, dict) else None
            # Priced by the dearer of the model asked for and the model that answered; usage that
            # cannot be read (missing, odd types, negative) counts as the request's worst case.
            answered = answer.body.get("model") if isinstance(answer.body, dict) else None
            cost = answer_cost([price, self._price(answered) if isinstance(answered, str) and answered else None],
                               usage, estimate.input_tokens, estimate.output_tokens)
            await self.completer.submit(("R", job.custom_id, json.dumps(line), cost))
            self._count_request(model, admission.charge, usage=usage)
            self.stats["done"] += 1
            self.metrics["ended"] += 1
            return
        # Refused before it was processed: the server charged nothing, so neither does the budget.
        refused = response is not None and response["status_code"] in REFUSED_UNCHARGED
        self._count_request(model, 0 if refused else admission.charge,
                            rate_limited=response is not None and response["status_code"] == 429)
        self._background(self.limiter.observe(model, headers, admission, time.monotonic() - started,
                                              input_tokens=budget_in,
                                              output_tokens=estimate.output_tokens, charged=not refused))
        if refused and not verdict.budget_exhausted:
            # (a 429 that says the budget is exhausted empties it instead: see cool_down)
            self._background(self.limiter.settle_unused(model, admission))
        await self._handle_failure(job, model, verdict, response, admission.probe, error)

    def _count_request(self, model: str, charged: int, *, usage: object = None,
                       rate_limited: bool = False) -> None:
        m = self.metrics
        m["requests"] += 1
        m[f"requests:{model}"] += 1
        m[f"charged:{model}"] += charged
        # Which budget (server, key, model) it drew from: `status` shows those budgets' limits.
        via = self._via.get(model) or self._via.setdefault(model, f"via:{self.limiter.budget_key(model)}")
        m[via] += 1
        m["tokens"] += usage_total_tokens(usage)  # 0 for usage that cannot be read: never raises
        if rate_limited:
            m["rate_limited"] += 1

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _handle_failure(self, job: LeasedJob, model: str, verdict: Verdict, response: dict | None,
                              probe: bool, error: BaseException | None = None) -> None:
        cid = job.custom_id
        circuit = await self.limiter.record(verdict.circuit, probe)
        status = (response or {}).get("status_code")
        if verdict.circuit:
            self._outage = (outage_cause(verdict.kind, status, error), circuit.down_since_ms, circuit.now_ms)
            if gave_up(circuit.now_ms, circuit.down_since_ms, self.running_since_ms, self.give_up_seconds):
                # Nothing runs for ever: a server that does not come back pauses the batch.
                verdict = Verdict(Action.PAUSE, verdict.kind, self._gave_up_message(circuit))
        elif verdict.budget_exhausted and hint_exceeds_cap(verdict.hint, self.policy):
            # A budget empty for longer than the cap (a per-day limit): waiting the cap again and again
            # would only hold workers and burn attempts. The fleet cools down for the cap, no longer.
            await self.limiter.cool_down(model, self.policy.cap)
            verdict = Verdict(Action.PAUSE, verdict.kind, self._long_wait_message(verdict))
        if verdict.action is Action.PAUSE:
            message = verdict.message.replace(BATCH_ID_PLACEHOLDER, self.batch_id)
            paused = await asyncio.to_thread(self.store.set_state, self.batch_id, BatchState.PAUSED, message,
                                             only_from=(BatchState.RUNNING,))
            if paused:
                log.error("batch %s paused: %s", self.batch_id, message)
            # (a give-up after a timeout: the request may have been billed, so its worst case stays counted)
            await self.requeuer.submit((cid, 0, False, "", self._maybe_paid(cid, response)))
            self.stats["paused"] += 1
            return
        if verdict.action is Action.FAIL:
            message = verdict.message
            suggestion = v1_suggestion(self.settings.base_url) if status == 404 else None
            if suggestion:
                message = f"{message}; {suggestion}"
                if self.settings.base_url not in _V1_HINTED:  # one sentence, not one per job
                    _V1_HINTED.add(self.settings.base_url)
                    log.warning("batch %s: requests are answered 404 (not found); %s", self.batch_id, suggestion)
            await self._finish_error(job, verdict.kind, message, response)
            return
        if verdict.circuit and circuit.open:
            # An outage, not this job's fault: it waits for the circuit and keeps its attempts.
            delay = max(0.0, (circuit.open_until_ms - circuit.now_ms) / 1000) + self.rng.uniform(0, 1)
            await self.requeuer.submit((cid, int(delay * 1000), False, "", self._maybe_paid(cid, response)))
            self.stats["held_by_circuit"] += 1
            self._note_event("circuit_open", delay)
            return
        if verdict.budget_exhausted:
            await self.limiter.cool_down(model, min(verdict.hint or 1.0, self.policy.cap))
        attempt = job.attempts + 1
        record = {"at": round(time.time(), 3), "status": status,
                  "error": verdict.kind, "message": verdict.message[:300]}
        if attempt >= self.policy.max_attempts:
            history = await asyncio.to_thread(self.store.history, self.batch_id, cid)
            record["wait"] = None
            await self._finish_error(job, verdict.kind,
                                     f"gave up after {attempt} attempts; last error: {verdict.message}",
                                     response, attempts=history + [record])
            return
        delay = backoff_delay(attempt, self.policy, verdict.hint, self.rng)
        record["wait"] = round(delay, 3)
        # No HTTP answer (a timeout, a broken stream): the server may have processed and billed it.
        await self.requeuer.submit((cid, int(delay * 1000), True, json.dumps(record), self._maybe_paid(cid, response)))
        self.stats["retried"] += 1
        self.metrics["retries"] += 1
        self._note_event(verdict.kind, delay)
        if hint_exceeds_cap(verdict.hint, self.policy):
            self._capped[verdict.kind] = max(self._capped.get(verdict.kind, 0.0), verdict.hint)
        log.debug("%s; job %s retries in %.1f s, attempt %d of %d", event_phrase(verdict.kind), cid, delay,
                  attempt + 1, self.policy.max_attempts)

    def _maybe_paid(self, cid: str, response: dict | None) -> bool:
        """No HTTP answer, yet the request may have reached the server: it may have been billed."""
        return response is None and cid in self._on_the_wire

    def _gave_up_message(self, circuit) -> str:
        cause, _, _ = self._outage
        since = max(circuit.down_since_ms, self.running_since_ms)
        down_for = (circuit.now_ms - since) / 1000
        what = (f"has answered only with server errors ({cause}) for {down_for:.0f} s" if cause.startswith("HTTP")
                else f"has not answered for {down_for:.0f} s ({cause})")
        return (f"the API at {mask_url(self.settings.base_url)} {what}, past --give-up-after "
                f"{self.give_up_seconds:g} s, so the batch is paused rather than waiting for ever; no job failed. "
                f"Check OPENAI_BASE_URL and that the server is up, then run `batchrun resume {BATCH_ID_PLACEHOLDER}`")

    def _long_wait_message(self, verdict: Verdict) -> str:
        hint = verdict.hint or 0.0
        after = ""
        if hint < 366 * 86400:  # a far-future date says nothing a clock time would add
            after = time.strftime(" after %H:%M UTC (%Y-%m-%d)", time.gmtime(time.time() + hint))
        return (f"{verdict.message.rstrip(' .')}; the server asks to wait {_human_wait(hint)}, longer than the "
                f"--backoff-cap of {self.policy.cap:g} s, so the batch is paused; no job failed. "
                f"Run `batchrun resume {BATCH_ID_PLACEHOLDER}`{after}, when the limit has reset")

    async def _finish_error(self, job: LeasedJob, code: str, message: str, response: dict | None = None,
                            attempts: list | None = None) -> None:
        line = error_line(job.custom_id, code=code, message=message, response=redact_response(response),
                          attempts=attempts)
        # (maybe paid: it gave up after a timeout or a broken stream, which the server may have billed)
        await self.completer.submit(("E", job.custom_id, json.dumps(line), 0,
                                     self._maybe_paid(job.custom_id, response)))
        self.stats["failed"] += 1
        self.metrics["ended"] += 1
        log.debug("job %s failed: %s", job.custom_id, message)

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
                            n, soonest, _human_wait(self._capped[kind]), self.policy.cap)
            else:
                log.info("batch %s shard %d: %s: %d job(s) requeued, next retry in %.1f s",
                         self.batch_id, self.shard, event_phrase(kind), n, soonest)
        self._events.clear()
        self._capped.clear()


def event_phrase(kind: str) -> str:
    return {
        "rate_limit_tokens": "rate limited (TPM)",
        "rate_limit_requests": "rate limited (RPM)",
        "rate_limit": "rate limited",
        "server_error": "server error",
        "stream_broken": "stream broke mid-way",
        "stream_truncated": "stream ended without a finish_reason",
    }.get(kind, kind.replace("_", " "))


def outage_cause(kind: str, status: int | None, error: BaseException | None) -> str:
    """What an outage-like failure is, in a few words: "connection refused", "DNS lookup failed",
    "TLS failed", "timed out", "HTTP 503"..."""
    if status is not None:
        return f"HTTP {status}"
    if kind == "stream_broken":
        return "streams broke off"
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        # aiohttp's connector errors hold the socket's error aside, not as a cause.
        for e in (error, getattr(error, "os_error", None), getattr(error, "certificate_error", None)):
            if isinstance(e, ConnectionRefusedError):
                return "connection refused"
            if isinstance(e, (socket.gaierror, aiohttp.ClientConnectorDNSError)):
                return "DNS lookup failed"
            if isinstance(e, (ssl.SSLError, ssl.CertificateError, aiohttp.ClientSSLError)):
                return "TLS failed"
        error = error.__cause__ or error.__context__
    return "timed out" if kind == "timeout" else "connection failed"


def v1_suggestion(base_url: str) -> str | None:
    """For a 404: the sentence that says a base URL lacks /v1, or None when it has it."""
    path = urlsplit(base_url).path.rstrip("/")
    if path.endswith("/v1") or "/deployments/" in path:  # Azure's deployment URLs have no /v1
        return None
    masked = mask_url(base_url.rstrip("/"))
    return f"the base URL {masked} has no /v1: did you mean OPENAI_BASE_URL={masked}/v1?"


def _human_wait(seconds: float) -> str:
    """86400 -> "24 h 0 min"; 432 -> "7 min 12 s"; 4.2 -> "4.2 s"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _failed_response(exc: Exception) -> dict | None:
    """The failed HTTP answer, as the Batch API error file shows it."""
    status = getattr(exc, "status_code", None)
    if status is None:
        return None
    resp = getattr(exc, "response", None)
    try:
        body = resp.json() if resp is not None else getattr(exc, "body", None)
    except Exception:
        body = getattr(exc, "body", None)
    request_id = getattr(exc, "request_id", None) or (resp.headers.get("x-request-id") if resp is not None else None)
    return {"status_code": status, "request_id": request_id, "body": body}
