"""One leased job's attempt inside a shard runner: send it, judge the answer, carry out the outcome.

What a failed attempt leads to is decided by ``policy.decision.decide``; this module does the I/O
around it (the cost cap, the rate budget, the circuit, the store) and words its messages.
``JobAttempts`` is a part of ``ShardRunner`` (runner/shard.py), whose ``__init__`` and ``run``
set up the state it uses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from batchrun.files.outputs import error_line, result_line
from batchrun.policy.backoff import hint_exceeds_cap
from batchrun.policy.classify import (BATCH_ID_PLACEHOLDER, Action, Verdict, classify_answer, classify_error_object,
                                      classify_exception, redact_response, stream_truncated_verdict)
from batchrun.policy.decision import (Fail, GiveBack, GiveUp, HoldForCircuit, Outcome, Pause, PauseKind, Requeue,
                                      cost_cap_outcome, decide)
from batchrun.policy.pricing import answer_cost, usage_total_tokens, worst_case_cost
from batchrun.policy.tokens import TokenEstimate, estimate_tokens, server_charge_estimate
from batchrun.runner.cached import CacheSteps
from batchrun.runner.days import DaySteps, day_too_large_sentence
from batchrun.runner.sender import Answer, StreamFailed, StreamTruncated, may_have_reached_server
from batchrun.runner.wording import event_phrase, gave_up_sentence, long_wait_sentence, outage_cause, v1_suggestion
from batchrun.policy.days import per_day_limit
from batchrun.policy.routing import MAX_ENDPOINT_COOLDOWN_S, is_endpoint_trouble, is_per_day, reroute
from batchrun.runner.routes import Route
from batchrun.state.counters import counter_names, status_class
from batchrun.state.items import CompleteItem, OutcomeKind, RequeueItem
from batchrun.state.limiter import Admission, CircuitState, stored_number
from batchrun.state.states import BatchState
from batchrun.state.store import LeasedJob

log = logging.getLogger("batchrun.worker")

# Statuses of requests the server refused before processing them, charging nothing
# (OpenAI does not count refused requests against the limits).
REFUSED_UNCHARGED = frozenset({400, 401, 403, 404, 422, 429})
_V1_HINTED: set[str] = set()  # base URLs this process has said lack /v1
GIVE_BACK_DELAY_MS = 50  # a job given back to go elsewhere comes due again after this
ENDPOINT_FIELD = "batchrun_endpoint"  # the result line's field naming the endpoint that answered


def unserved_job_sentence(custom_id: str, model: str, routes) -> str:
    names = ", ".join(r.name for r in routes.all)
    return (f"job {custom_id} asks for model {model!r}, which no endpoint of this worker's config serves "
            f"(endpoints: {names}); add it to an endpoint's models and submit the job again")


def endpoint_key_phrase(route) -> str:
    """' (its key from $VAR)': which variable to fix when an endpoint refuses its key."""
    env = route.endpoint.api_key_env if route.endpoint is not None else ""
    return f" (its key from ${env})" if env else ""


@dataclass(frozen=True, slots=True)
class Sending:
    """An attempt on the wire: what it was sent with."""

    job: LeasedJob
    model: str
    price: Any  # the model's price (pricing.Price); None: unknown
    estimate: TokenEstimate
    budget_in: int  # input tokens the budget counts
    admission: Admission
    started: float  # time.monotonic() when it was sent
    route: Route  # the endpoint it went to (runner/routes.py)


@dataclass(frozen=True, slots=True)
class Exchange:
    """What came back: a verdict (None for a result) and the answer or the error."""

    verdict: Verdict | None
    answer: Answer | None = None
    response: dict | None = None  # the HTTP answer as the error file shows it (None: no answer)
    headers: Any = None
    error: BaseException | None = None


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


class JobAttempts(CacheSteps, DaySteps):
    async def _process(self, job: LeasedJob) -> None:
        try:
            await self._attempt(job)
        except asyncio.CancelledError:
            # Stopping: the request may have gone out (it may be sent again), its result is not lost.
            await self.requeuer.submit(RequeueItem(job.custom_id, 0, False, "", job.custom_id in self._on_the_wire))
            raise
        except Exception as exc:
            # A bug in batchrun, not in the request: it costs the job an attempt, so that one that
            # fails every time ends in the errors file instead of looping forever.
            log.exception("batch %s: unexpected error on job %s", self.batch_id, job.custom_id)
            verdict = Verdict(Action.RETRY, "unknown", f"batchrun failed on this job: {type(exc).__name__}: {exc}")
            try:
                await self._handle_failure(job, "", verdict, None, False)
            except Exception:
                await self.requeuer.submit(RequeueItem(job.custom_id, 5000, True))
        finally:
            self.inflight.pop(job.custom_id, None)
            self._on_the_wire.discard(job.custom_id)
            self._granted.discard(job.custom_id)
            if (counted := self._day_counted.pop(job.custom_id, None)) is not None:  # counted, never sent
                self._background(self._give_day_back(*counted))

    async def _attempt(self, job: LeasedJob) -> None:
        key = self._cache_key_of(job)  # None: the batch or the line bypasses the cache (runner/cached.py)
        if key is not None and await self._served_from_cache(job, key):
            return  # no budget, no money
        try:
            await self._send_attempt(job)
        finally:
            self._release_claim(job.custom_id)  # after the answer is stored: those waiting take it

    async def _send_attempt(self, job: LeasedJob) -> None:
        url, body = job.request["url"], job.request["body"]
        model = str(body.get("model", ""))
        estimate = estimate_tokens(url, body)
        price = self._price(model)
        if self.max_cost > 0 and not await self._within_cost_cap(job, model, price, estimate):
            return
        # The budget counts the input as OpenAI says its admission does (characters / 4) where that
        # is more than tiktoken's count; "too large" is judged on the smaller of the two.
        server_in = server_charge_estimate(url, body) - estimate.output_tokens
        budget_in = max(estimate.input_tokens, server_in)
        least_input = min(estimate.input_tokens, server_in)
        if too_small := self.routes.day_too_small(model, budget_in + estimate.output_tokens):  # (as day_take counts)
            await self._finish_error(job, "request_too_large", day_too_large_sentence(
                job.custom_id, budget_in + estimate.output_tokens, model, too_small))
            return
        route, admission = await self._route_and_admit(job, model, budget_in, estimate.output_tokens, least_input)
        if route is None and admission is not None:  # every endpoint's day is spent: back when one starts again
            if short := self._short_today.pop(job.custom_id, None):  # or too small today for this one request
                await self._wait_for_a_day(job, model, budget_in + estimate.output_tokens, short, admission)
                return
            if admission > self.policy.cap:  # hours, not seconds: a pause that says until when, not a silent wait
                await self._pause_for_days(job, model)
                return
            await self.requeuer.submit(RequeueItem(job.custom_id, int(admission * 1000), False, "", False))
            self._note_event("day_limit", admission)
            return
        if route is None:
            await self._finish_error(job, "model_not_served", unserved_job_sentence(job.custom_id, model, self.routes))
            return
        if admission is None:
            await self._fail_too_large(job, model, least_input + estimate.output_tokens, route)
            return
        route.in_flight += 1
        slot = None
        try:
            if route.slots is not None:  # the endpoint's fleet-wide max_in_flight (state/slots.py)
                slot = await route.slots.acquire()
            route.limiter.sent(model, admission)
            sending = Sending(job, model, price, estimate, budget_in, admission, time.monotonic(), route)
            self._day_counted.pop(job.custom_id, None)  # sent: its day's count stays
            self._on_the_wire.add(job.custom_id)
            exchange = await self._exchange(job, url, route.body_for(body), route)
        finally:
            route.in_flight -= 1
            if slot is not None:
                await asyncio.shield(route.slots.release(slot))
        if exchange.verdict is None:
            await self._record_result(sending, exchange.answer)
        else:
            await self._record_failure(sending, exchange)

    async def _within_cost_cap(self, job: LeasedJob, model: str, price, estimate: TokenEstimate) -> bool:
        """Under --max-cost: set the job's worst case aside, or give the job back (False)."""
        outcome = cost_cap_outcome(price_known=price is not None)
        if outcome is None:
            # The cap holds even if every request in flight costs its worst case.
            worst = worst_case_cost(price, estimate.input_tokens, estimate.output_tokens)
            outcome = cost_cap_outcome(price_known=True, reserved=await self.coster.submit((job.custom_id, worst)))
        if outcome is None:
            return True
        if isinstance(outcome, Pause):  # no price: not the job's fault, the batch waits for one
            message = (f"no price is known for model {model!r} (job {job.custom_id}), so the --max-cost "
                       f"cannot be kept; give its price with: batchrun resume {self.batch_id} --prices FILE")
            if await self._redis(self.store.set_state, self.batch_id, BatchState.PAUSED, message,
                                 only_from=(BatchState.RUNNING,), pause_kind=PauseKind.NO_PRICE):
                log.error("batch %s paused: %s", self.batch_id, message)
        await self.requeuer.submit(RequeueItem(job.custom_id, 0, False, "", outcome.maybe_paid))
        return False

    async def _fail_too_large(self, job: LeasedJob, model: str, least_tokens: int, route: Route) -> None:
        _, tpm = route.limiter.limits(model)
        # The budget judges by the strictest --tpm of the batches sharing it (reserve.lua keeps it).
        in_force = stored_number(await self._redis(self.store.redis.hget, route.limiter.budget_key(model), "cfg_tpm"))
        if in_force and in_force != tpm:
            limit = f"the {in_force:,.0f} tokens-per-minute limit in force (the strictest --tpm of the batches on it)"
        else:
            limit = f"--tpm {tpm}" if tpm else "the server's tokens-per-minute limit"
        await self._finish_error(job, "request_too_large",
                                 f"job {job.custom_id} needs at least {least_tokens} tokens, "
                                 f"more than {limit} allows for {model} in a minute; it can never be sent "
                                 f"(reduce its prompt or max_tokens, or raise the limit)")

    async def _exchange(self, job: LeasedJob, url: str, body: dict, route: Route) -> Exchange:
        try:
            answer = await self._send(url, body, route.client_for(str(body.get("model", ""))))
        except StreamTruncated:
            return Exchange(stream_truncated_verdict())
        except StreamFailed as exc:
            return Exchange(classify_error_object(exc.error, now=time.time(), streamed=True, fallback=str(exc)))
        except Exception as exc:
            if not may_have_reached_server(exc):  # refused, DNS, TLS, connect timeout: nothing to pay
                self._on_the_wire.discard(job.custom_id)
            verdict = classify_exception(exc, now=time.time())
            return Exchange(verdict, response=_failed_response(exc),
                            headers=getattr(getattr(exc, "response", None), "headers", None), error=exc)
        # A 2xx that is no result (a proxy's page, an error body, a failed response) fails like an error.
        verdict = classify_answer(url, answer.headers, answer.body, now=time.time())
        response = {"status_code": answer.status_code, "request_id": answer.request_id, "body": answer.body}
        return Exchange(verdict, answer, response, answer.headers)

    async def _record_result(self, sent: Sending, answer: Answer) -> None:
        model, admission, estimate, cid = sent.model, sent.admission, sent.estimate, sent.job.custom_id
        limiter = sent.route.limiter
        self._background(limiter.observe(model, answer.headers, admission, time.monotonic() - sent.started,
                                              input_tokens=sent.budget_in,
                                              output_tokens=estimate.output_tokens, charged=True))
        self._background(self._record_circuit(sent.route, False, admission.probe))
        line = result_line(cid, status_code=answer.status_code, request_id=answer.request_id, body=answer.body)
        if sent.route.name:  # which endpoint answered (a batchrun extension field of the output line)
            line[ENDPOINT_FIELD] = sent.route.name
        self._store_in_cache(cid, answer)
        usage = answer.body.get("usage") if isinstance(answer.body, dict) else None
        # Priced by the dearer of the model asked for and the model that answered; usage that
        # cannot be read (missing, odd types, negative) counts as the request's worst case.
        answered = answer.body.get("model") if isinstance(answer.body, dict) else None
        cost = answer_cost([sent.price, self._price(answered) if isinstance(answered, str) and answered else None],
                           usage, estimate.input_tokens, estimate.output_tokens)
        await self.completer.submit(CompleteItem(OutcomeKind.RESULT, cid, json.dumps(line), cost))
        self._count_request(model, admission.charge, sent.route, usage=usage, status_code=answer.status_code)
        self.stats["done"] += 1
        self.metrics["ended"] += 1

    async def _record_failure(self, sent: Sending, exchange: Exchange) -> None:
        verdict, response, admission = exchange.verdict, exchange.response, sent.admission
        # Refused before it was processed: the server charged nothing, so neither does the budget.
        refused = response is not None and response["status_code"] in REFUSED_UNCHARGED
        self._count_request(sent.model, 0 if refused else admission.charge, sent.route,
                            rate_limited=response is not None and response["status_code"] == 429,
                            status_code=None if response is None else response["status_code"])
        self._background(sent.route.limiter.observe(sent.model, exchange.headers, admission,
                                              time.monotonic() - sent.started, input_tokens=sent.budget_in,
                                              output_tokens=sent.estimate.output_tokens, charged=not refused))
        if refused and not verdict.budget_exhausted:
            # (a 429 that says the budget is exhausted empties it instead: see cool_down)
            self._background(sent.route.limiter.settle_unused(sent.model, admission))
        await self._handle_failure(sent.job, sent.model, verdict, response, admission.probe, exchange.error,
                                   sent.route)

    def _count_request(self, model: str, charged: int, route: Route, *, usage: object = None,
                       rate_limited: bool = False, status_code: int | None = None) -> None:
        m = self.metrics
        m["requests"] += 1
        m[f"requests:{model}"] += 1
        m[f"charged:{model}"] += charged
        # Which budget (server, key, model) it drew from: `status` shows those budgets' limits,
        # the dashboard and /metrics its requests by answer (names made once per endpoint and model).
        names = self._via.get((route.name, model)) or self._via.setdefault(
            (route.name, model), counter_names(route.limiter.budget_key(model)))
        m[names.via] += 1
        m[names.tokens] += charged
        m[names.by_class[status_class(status_code)]] += 1
        if route.name:  # pace per endpoint, for `status`, the progress line and the library's events
            m[f"endpoint:{route.name}"] += 1
            m[f"endpoint_tok:{route.name}"] += charged
        m["tokens"] += usage_total_tokens(usage)  # 0 for usage that cannot be read: never raises
        if rate_limited:
            m["rate_limited"] += 1
            m[names.rate_limited] += 1

    async def _handle_failure(self, job: LeasedJob, model: str, verdict: Verdict, response: dict | None,
                              probe: bool, error: BaseException | None = None, route: Route | None = None) -> None:
        # (route None: a failure before any endpoint was chosen, judged on the first one's circuit)
        limiter = route.limiter if route is not None else self.limiter
        if verdict.action is Action.PAUSE and route is not None and route.name:  # (a refused key): whose
            verdict = dataclasses.replace(verdict, message=f"endpoint {route.name!r}{endpoint_key_phrase(route)}: "
                                                           f"{verdict.message}")
        circuit = await limiter.record(verdict.circuit, probe)
        if route is not None:
            route.circuit = circuit
        if verdict.circuit:
            status = (response or {}).get("status_code")
            self._outage = (outage_cause(verdict.kind, status, error), circuit.down_since_ms, circuit.now_ms)
            self._outage_url = (route.settings if route is not None else self.settings).base_url
        decision = decide(verdict, attempt=job.attempts + 1, policy=self.policy, circuit=circuit,
                          give_up=GiveUp(self.give_up_seconds, self.running_since_ms),
                          maybe_paid=self._maybe_paid(job.custom_id, response), rng=self.rng)
        status = (response or {}).get("status_code")
        if route is not None and len(self.routes.serving(model)) > 1:  # another endpoint may take it: its next attempt goes there
            decision = reroute(decision, verdict, status, elsewhere=self.routes.elsewhere(model, route),
                               cap=self.policy.cap)
            if is_endpoint_trouble(verdict, status):
                self._avoid[job.custom_id] = route.name
        if decision.cool_down is not None:
            await limiter.cool_down(model, decision.cool_down)
        if route is not None and route.name and status == 429 and is_per_day(verdict) and verdict.hint:
            # the server's own day spent: recorded beside the day's counts, as a day counted spent is
            limit, value = per_day_limit(verdict.kind, verdict.message)
            await self._redis(route.server_day_spent, self.store, model, min(verdict.hint, MAX_ENDPOINT_COOLDOWN_S),
                              limit, value)
            self.routes.noticed[f"day:{route.limiter.budget_key(model)}"] += 1
        await self._carry_out(job, decision.outcome, verdict, response, circuit)

    async def _carry_out(self, job: LeasedJob, outcome: Outcome, verdict: Verdict, response: dict | None,
                         circuit: CircuitState) -> None:
        cid = job.custom_id
        match outcome:
            case Pause(kind=kind, maybe_paid=paid):
                message = self._pause_message(kind, verdict, circuit).replace(BATCH_ID_PLACEHOLDER, self.batch_id)
                if await asyncio.to_thread(self.store.set_state, self.batch_id, BatchState.PAUSED, message,
                                           only_from=(BatchState.RUNNING,), pause_kind=kind):
                    log.error("batch %s paused: %s", self.batch_id, message)
                # (a give-up after a timeout: the request may have been billed, so its worst case stays counted)
                await self.requeuer.submit(RequeueItem(cid, 0, False, "", paid))
                self.stats["paused"] += 1
            case Fail():
                await self._fail(job, outcome, verdict, response)
            case HoldForCircuit(delay=delay, maybe_paid=paid):
                await self.requeuer.submit(RequeueItem(cid, int(delay * 1000), False, "", paid))
                self.stats["held_by_circuit"] += 1
                self._note_event("circuit_open", delay)
            case Requeue():
                await self._retry(job, outcome, verdict, response)
            case GiveBack(maybe_paid=paid):
                # (due a moment later, not at once: leased again before this task has ended, the job
                # would be taken for this attempt still in flight, skipped, and held until its lease ran out)
                await self.requeuer.submit(RequeueItem(cid, GIVE_BACK_DELAY_MS, False, "", paid))

    def _pause_message(self, kind: PauseKind, verdict: Verdict, circuit: CircuitState) -> str:
        if kind is PauseKind.GAVE_UP:
            return self._gave_up_message(circuit)
        if kind is PauseKind.LONG_WAIT:
            return self._long_wait_message(verdict)
        return verdict.message

    async def _fail(self, job: LeasedJob, outcome: Fail, verdict: Verdict, response: dict | None) -> None:
        message, attempts = outcome.message, None
        if outcome.exhausted:
            history = await asyncio.to_thread(self.store.history, self.batch_id, job.custom_id)
            attempts = history + [self._attempt_record(verdict, response, wait=None)]
        elif (response or {}).get("status_code") == 404 and (suggestion := v1_suggestion(self.settings.base_url)):
            message = f"{message}; {suggestion}"
            if self.settings.base_url not in _V1_HINTED:  # one sentence, not one per job
                _V1_HINTED.add(self.settings.base_url)
                log.warning("batch %s: requests are answered 404 (not found); %s", self.batch_id, suggestion)
        await self._finish_error(job, outcome.code, message, response, attempts=attempts, maybe_paid=outcome.maybe_paid)

    async def _retry(self, job: LeasedJob, outcome: Requeue, verdict: Verdict, response: dict | None) -> None:
        cid, delay = job.custom_id, outcome.delay
        record = self._attempt_record(verdict, response, wait=round(delay, 3))
        # No HTTP answer (a timeout, a broken stream): the server may have processed and billed it.
        await self.requeuer.submit(RequeueItem(cid, int(delay * 1000), True, json.dumps(record), outcome.maybe_paid))
        self.stats["retried"] += 1
        self.metrics["retries"] += 1
        self._note_event(verdict.kind, delay)
        if hint_exceeds_cap(verdict.hint, self.policy):
            self._capped[verdict.kind] = max(self._capped.get(verdict.kind, 0.0), verdict.hint)
        log.debug("%s; job %s retries in %.1f s, attempt %d of %d", event_phrase(verdict.kind), cid, delay,
                  job.attempts + 2, self.policy.max_attempts)

    @staticmethod
    def _attempt_record(verdict: Verdict, response: dict | None, *, wait: float | None) -> dict:
        """A failed attempt as the job's history keeps it."""
        return {"at": round(time.time(), 3), "status": (response or {}).get("status_code"),
                "error": verdict.kind, "message": verdict.message[:300], "wait": wait}

    def _maybe_paid(self, cid: str, response: dict | None) -> bool:
        """No HTTP answer, yet the request may have reached the server: it may have been billed."""
        return response is None and cid in self._on_the_wire

    def _gave_up_message(self, circuit) -> str:
        cause, _, _ = self._outage
        since = max(circuit.down_since_ms, self.running_since_ms)
        return gave_up_sentence(getattr(self, "_outage_url", self.settings.base_url), cause, (circuit.now_ms - since) / 1000, self.give_up_seconds)

    def _long_wait_message(self, verdict: Verdict) -> str:
        return long_wait_sentence(verdict.message, verdict.hint or 0.0, self.policy.cap)

    async def _finish_error(self, job: LeasedJob, code: str, message: str, response: dict | None = None,
                            attempts: list | None = None, maybe_paid: bool = False) -> None:
        line = error_line(job.custom_id, code=code, message=message, response=redact_response(response),
                          attempts=attempts)
        # (maybe paid: it gave up after a timeout or a broken stream, which the server may have billed)
        await self.completer.submit(CompleteItem(OutcomeKind.ERROR, job.custom_id, json.dumps(line), 0, maybe_paid))
        self.stats["failed"] += 1
        self.metrics["ended"] += 1
        log.debug("job %s failed: %s", job.custom_id, message)

    async def _record_circuit(self, route: Route, failed: bool, probe: bool) -> CircuitState:
        route.circuit = state = await route.limiter.record(failed, probe)
        return state

    def _price(self, model: str):
        """The model's price, looked up once per runner (a miss walks aliases and prefixes)."""
        if model not in self._prices_by_model:
            self._prices_by_model[model] = self.prices.price_for(model)
        return self._prices_by_model[model]

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
