"""The gate in front of every request: the shared budget, cooldowns and the circuit breaker.

A budget is identified by the API's base URL, a fingerprint of the API key
(never the key) and the model: every worker on the same Redis sending with the
same key to the same model draws from it, whichever batch it runs. A circuit
belongs to an endpoint (base URL). Both are small hashes in Redis, changed only
by the Lua scripts (``reserve``, ``settle``, ``observe``, ``cool_down``,
``release_held``, ``circuit``) on Redis server time.

Calls from the many requests of a runner are grouped (``Batcher``), so the
gate costs a fraction of a round trip per request.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from dataclasses import dataclass
from enum import Enum
from typing import Callable, NamedTuple

import redis

from batchrun.state import keys
from batchrun.state.budget_headers import (MAX_HEADER_NUMBER, admitted_ratio, stored_number, told_bucket,
                                          usable_header_number)
from batchrun.state.budgets import HELD_REPORTS_MISSED, HELD_STALE_MS, describe_budgets, release_held
from batchrun.state.batching import Batcher
from batchrun.settings import BatchOptions, CircuitPolicy, WorkerSettings
from batchrun.state.store import BatchStore
from batchrun.text import decoded as _s
from batchrun.urls import mask_url

# Names that moved to budget_headers, budgets and keys, still importable from here.
__all__ = ["Admission", "CircuitState", "EndpointDown", "SharedLimiter", "MAX_HEADER_NUMBER", "HELD_STALE_MS", "HELD_REPORTS_MISSED",
           "budget_id", "describe_budgets", "release_held", "stored_number", "usable_header_number"]
budget_id = keys.budget_id
_admitted_ratio = admitted_ratio

LEVEL_REFRESH_S = 0.25  # how often a runner with waiting requests reads the budget's level
FRESH_HEADERS_S = 2.0  # remaining-* headers of a slower answer are too old to correct the budget
FIRST_ANSWER_S = 5.0  # a runner's other requests wait at most this long for its first answer
LAST_RESORT_S = 60.0  # a waiter goes at most this long after the wait computed at its reservation


@dataclass(frozen=True, slots=True)
class Admission:
    wait: float  # seconds to sleep before sending
    probe: bool  # this request probes an open circuit
    charge: int  # tokens taken from the budget
    mark: int  # the budget's running total of tokens taken, this request included


@dataclass(frozen=True, slots=True)
class CircuitState:
    state: str  # 'closed' or 'open'
    open_until_ms: int
    now_ms: int
    down_since_ms: int = 0  # the endpoint's first outage-like failure since its last answer (0: up)

    @property
    def open(self) -> bool:
        return self.state == "open"


class EndpointDown(Exception):
    """admit() gave way: the endpoint's circuit is open and another endpoint serves the model."""


class Grant(Enum):
    """reserve.lua's verdict on one request (the numbers are its contract)."""

    GRANTED = 0  # send after the wait
    PROBE = 2  # granted as the open circuit's one probe
    CIRCUIT_OPEN = 1  # not granted: ask again after the wait
    NEVER_FITS = -1  # more than the limit allows in a minute, judged on the smallest input estimate
    OVER_SHARE = 3  # not granted: the batch holds its fair share of the budget; ask again after the wait


class Reservation(NamedTuple):
    """reserve.lua's answer for one request."""

    wait_ms: int
    grant: Grant
    charge: int  # tokens taken (given back with settle.lua if the server charged nothing)
    mark: int  # the budget's token mark this request waits for
    mark_requests: int  # ... and its request mark


class SharedLimiter:
    def __init__(self, store: BatchStore, settings: WorkerSettings, options: BatchOptions, token: str = ""):
        self._store = store
        self._settings = settings
        self._options = options
        self._circuit: CircuitPolicy = settings.circuit
        self._token = token
        self.circuit_key = keys.circuit(keys.endpoint_id(settings.base_url))
        self._gates: dict[str, Batcher] = {}
        self._settlers: dict[str, Batcher] = {}
        self._observers: dict[str, Batcher] = {}
        self._held: dict[str, list[int]] = {}  # model -> [requests, tokens] reserved but not sent yet
        self._recorder = Batcher(self._flush_outcomes, name="circuit outcome", max_delay=0.02)
        self._waiters: dict[str, list] = {}  # model -> heap of (mark, request mark, seq, deadline, future)
        self._schedulers: dict[str, asyncio.Task] = {}
        self._seq = itertools.count()
        self._rng = random.Random()
        self._first_answer: asyncio.Future | None = None  # set when this runner's first request is answered
        self._first_admission: Admission | None = None
        self._reported = False  # this runner's held reservations are in Redis (report_held)
        self._rereport: asyncio.Task | None = None
        self._share: tuple[str, float] | None = None  # (batch id, weight): its fair share of each budget

    def share_as(self, batch_id: str, weight: float) -> None:
        """Draw from each budget as ``batch_id``, with this weight (policy/fairshare.py; 0: low)."""
        self._share = (batch_id, weight)

    def limits(self, model: str) -> tuple[int, int]:
        """The configured (rpm, tpm) of a model; 0 where none (the budget may have learnt one)."""
        return self._options.limits.for_model(model)

    def budget_key(self, model: str) -> str:
        return keys.budget(keys.budget_id(self._settings.base_url, self._settings.key_fingerprint(), model))

    # -- before sending ------------------------------------------------------------

    async def admit(self, model: str, input_tokens: int, output_tokens: int, *,
                    least_input: int | None = None, wait_turn: bool = True,
                    give_way: Callable[[], bool] | None = None,
                    on_granted: Callable[[], None] | None = None) -> Admission | None:
        """Wait for the circuit if it is open, reserve, and wait for this request's turn;
        None if it can never fit, judged on ``least_input`` (the smallest input estimate; default
        ``input_tokens``) + output. On return the request may be sent (with ``wait_turn=False``:
        after ``admission.wait``, as things stood when it was reserved). With ``give_way``, an open
        circuit for which it returns True raises EndpointDown instead of waiting (another endpoint
        takes the request). ``on_granted`` is called once the budget is taken, before the wait for
        its turn (a runner that yields its worker lets such a request go rather than waste it)."""
        gate = self._gates.get(model)
        if gate is None:
            gate = self._gates[model] = Batcher(self._reserver(model), name="reservation", max_delay=0.002)
            self._held[model] = [0, 0]
        first = await self._after_first_answer() if wait_turn else False
        while True:
            least = input_tokens if least_input is None else min(least_input, input_tokens)
            ms, grant, charge, mark, mark_r = await gate.submit((input_tokens, output_tokens, least))
            if grant is Grant.NEVER_FITS:
                self._answered()  # nothing will be sent for it
                return None
            if grant is Grant.CIRCUIT_OPEN and give_way is not None and give_way():
                self._answered()  # nothing is sent here: another endpoint takes it (runner/routes.py)
                raise EndpointDown(self._settings.base_url)
            if grant is Grant.CIRCUIT_OPEN:  # come back when it may have closed, not all at once
                await asyncio.sleep(ms / 1000 + self._rng.uniform(0, 0.5))
                continue
            if grant is Grant.OVER_SHARE:  # together (no jitter): they ask again in the order they asked
                await asyncio.sleep(ms / 1000)
                continue
            held = self._held[model]
            held[0] += 1
            held[1] += charge
            if on_granted is not None:
                on_granted()
            if ms > 0 and wait_turn:  # granted (as the probe or not): wait for its turn
                if not await self._wait_turn(model, mark, mark_r, ms / 1000):
                    held[0] -= 1  # the budget was lost, and this reservation with it: reserve again
                    held[1] -= charge
                    continue
            admission = Admission(ms / 1000, probe=grant is Grant.PROBE, charge=charge, mark=mark)
            if first:
                self._first_admission = admission
            return admission

    async def _after_first_answer(self) -> bool:
        """A runner's first request goes alone (True for it). Until it is answered the client has
        no connection (and the SDK is not warmed up), so requests reserved meanwhile would reach
        the server together, later than the budget let them go: more than its burst at once. The
        first one reaches it late too: observe.lua counts it again, as arriving with its answer."""
        if self._first_answer is None:
            self._first_answer = asyncio.get_running_loop().create_future()
            return True
        if not self._first_answer.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._first_answer), FIRST_ANSWER_S)
            except asyncio.TimeoutError:
                pass
        return False

    def _answered(self) -> None:
        if self._first_answer is not None and not self._first_answer.done():
            self._first_answer.set_result(None)

    async def _wait_turn(self, model: str, mark: int, mark_r: int, wait: float) -> bool:
        """Wait until the budget's level reaches this reservation's marks. The level, not the
        wait computed at reservation, decides: headers that move the budget move the waiters too,
        who still go in the order they reserved. ``wait`` is used when no rate is known, and as a
        last resort (``wait`` + LAST_RESORT_S). False: the budget was lost, reserve again."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        heapq.heappush(self._waiters.setdefault(model, []), (mark, mark_r, next(self._seq), loop.time() + wait, future))
        task = self._schedulers.get(model)
        if task is None or task.done():
            self._schedulers[model] = loop.create_task(self._schedule(model))
        return await future

    async def _schedule(self, model: str) -> None:
        loop = asyncio.get_running_loop()
        rpm, tpm = self.limits(model)
        key, burst = self.budget_key(model), self._options.burst_seconds
        waiters = self._waiters[model]
        while waiters:
            horizon = next(self._seq)  # waiters queued before this read reserved before it too
            try:
                level = await asyncio.to_thread(self._store.scripts.level, keys=[key], args=[rpm, tpm, burst])
            except (redis.ConnectionError, redis.TimeoutError):
                await asyncio.sleep(1)  # Redis away: the waiters keep waiting, then carry on
                continue
            now_ms, avail, rate, avail_r, rate_r, cool_until, spent, spent_r = (float(_s(x)) for x in level)
            read_at = loop.time()
            # Totals taken only grow: a waiter's mark above them was made in a budget since lost.
            lost = [w for w in waiters if w[2] < horizon and (w[0] > spent or w[1] > spent_r)]
            if lost:
                waiters[:] = [w for w in waiters if w not in lost]
                heapq.heapify(waiters)
                for *_, future in lost:
                    if not future.done():
                        future.set_result(False)
            while waiters and loop.time() - read_at < LEVEL_REFRESH_S:
                elapsed_ms = (loop.time() - read_at) * 1000
                level, level_r = avail + rate * elapsed_ms, avail_r + rate_r * elapsed_ms
                cooling = now_ms + elapsed_ms < cool_until
                while waiters:
                    mark, mark_r, _, deadline, future = waiters[0]
                    if rate or rate_r:
                        due = not cooling and (not rate or mark <= level) and (not rate_r or mark_r <= level_r)
                        due = due or loop.time() >= deadline + LAST_RESORT_S  # every wait is capped
                    else:
                        due = loop.time() >= deadline
                    if not due:
                        break
                    heapq.heappop(waiters)
                    if not future.done():
                        future.set_result(True)
                if not waiters:
                    break
                mark, mark_r, _, deadline, _ = waiters[0]
                if rate or rate_r:
                    sleep = max((mark - level) / rate if rate else 0, (mark_r - level_r) / rate_r if rate_r else 0,
                                (cool_until - now_ms - elapsed_ms) if cooling else 0) / 1000
                else:
                    sleep = deadline - loop.time()
                await asyncio.sleep(min(max(sleep, 0.001), LEVEL_REFRESH_S - (loop.time() - read_at)))

    def sent(self, model: str, admission: Admission) -> None:
        """The request left: the server may charge it now (it is no longer held)."""
        held = self._held[model]
        held[0] -= 1
        held[1] -= admission.charge
        # Report the change soon: a runner killed before its next periodic report must not have
        # what it already sent (and the server charged) given back by release_held.lua.
        if self._reported and self._rereport is None:
            self._rereport = asyncio.get_running_loop().create_task(self._report_soon())

    async def _report_soon(self) -> None:
        await asyncio.sleep(0.05)  # one report for the sends of a moment
        self._rereport = None  # sends from now on schedule the next one
        try:
            await asyncio.to_thread(self.report_held)
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # the periodic report carries on when Redis is back

    def _reserver(self, model: str):
        rpm, tpm = self.limits(model)
        args = [rpm, tpm, self._options.burst_seconds, 0]
        keys_ = [self.budget_key(model), self.circuit_key, keys.BUDGETS]

        fair_keys = list(keys.fair_share(keys_[0]))

        def flush(items: list[tuple[int, int, int]]) -> list[Reservation]:
            flat = [x for item in items for x in item]
            share = self._share  # read at each call: a priority changed on a running batch applies
            call_keys, call_args = (keys_, args) if share is None else ([*keys_, *fair_keys], [*args, *share])
            out = [int(x) for x in self._store.scripts.reserve(keys=call_keys, args=[*call_args, *flat])]
            return [Reservation(out[i], Grant(out[i + 1]), *out[i + 2:i + 5]) for i in range(0, len(out), 5)]

        return flush

    # -- after the answer --------------------------------------------------------------

    async def settle_unused(self, model: str, admission: Admission) -> None:
        """The server did not charge this request (it refused it): give its reservation back."""
        settler = self._settlers.get(model)
        if settler is None:
            key = self.budget_key(model)

            def flush(items):
                self._store.scripts.settle(keys=[key], args=[sum(r for r, _ in items), sum(t for _, t in items)])

            settler = self._settlers[model] = Batcher(flush, name="settlement", max_delay=0.01)
        try:
            await settler.submit((1, admission.charge))
        finally:
            self._answered()

    async def observe(self, model: str, headers, admission: Admission, latency: float, *,
                      input_tokens: int, output_tokens: int, charged: bool) -> None:
        """After an answer: the server's x-ratelimit-* headers correct the budget (limits, burst,
        sync), and what it admitted feeds the calibration of its charge."""
        has_headers = headers is not None and ("x-ratelimit-remaining-tokens" in headers
                                               or "x-ratelimit-remaining-requests" in headers)
        if not has_headers and not charged:
            self._answered()
            return
        observer = self._observers.get(model)
        if observer is None:
            key = self.budget_key(model)
            rpm, tpm = self.limits(model)

            def flush(items):
                # What was admitted adds up; of the headers, the latest say the most.
                sent_in = sum(i[0] for i in items)
                sent_out = sum(i[1] for i in items)
                latest = next((i[2] for i in reversed(items) if i[2] is not None), None)
                head = latest or ("", "", "", "", 0, "0", 0)
                *head, mark = head
                late = sum(i[3] for i in items)
                bucket = next((i[4] for i in reversed(items) if i[4]), "")
                self._store.scripts.observe(keys=[key], args=[*head, rpm, tpm, mark, sent_in, sent_out,
                                                              self._options.burst_seconds, admitted_ratio(items),
                                                              late, bucket])

            observer = self._observers[model] = Batcher(flush, name="observation", max_delay=0.05)
        seen, bucket = None, ""
        if has_headers:
            bucket = told_bucket(headers, admission.charge) if latency <= FRESH_HEADERS_S else ""
            seen = (*(usable_header_number(headers.get(f"x-ratelimit-{name}", ""), remaining=name.startswith("rem"))
                      for name in ("limit-requests", "limit-tokens", "remaining-requests", "remaining-tokens")),
                    admission.charge, "1" if latency <= FRESH_HEADERS_S else "0", admission.mark)
        late = admission.charge if charged and admission is self._first_admission else 0
        try:
            await observer.submit((input_tokens if charged else 0, output_tokens if charged else 0, seen, late, bucket))
        finally:
            self._answered()  # after the observation: the requests it lets go see its effect

    async def cool_down(self, model: str, seconds: float) -> None:
        """The server said this budget is exhausted: the whole fleet holds off for ``seconds``."""
        rpm, tpm = self.limits(model)
        await asyncio.to_thread(self._store.scripts.cool_down, keys=[self.budget_key(model)],
                                args=[max(1, int(seconds * 1000)), rpm, tpm])

    # -- reservations held, for when this runner dies ------------------------------------

    def report_held(self) -> None:
        """Tell the fleet what this runner holds (called periodically from a thread)."""
        if not self._held:
            return
        sec, usec = self._store.redis.time()
        now_ms = int(sec) * 1000 + int(usec) // 1000
        pipe = self._store.redis.pipeline()
        # Runners report every lease / 3 (shard.py): a long lease must not make a live one look dead.
        stale_ms = max(HELD_STALE_MS, int(HELD_REPORTS_MISSED * self._settings.lease_seconds / 3 * 1000))
        for model, (r, t) in self._held.items():
            pipe.hset(keys.held(self.budget_key(model)), self._token,
                      f"{max(r, 0)}|{max(t, 0)}|{now_ms}|{stale_ms}")
        if self._reported is not None:  # not after forget_held
            pipe.execute()
            self._reported = True

    def forget_held(self) -> None:
        self._reported = None  # a report of sends still on its way must not bring the entry back
        pipe = self._store.redis.pipeline()
        for model in self._held:
            pipe.hdel(keys.held(self.budget_key(model)), self._token)
        pipe.execute()

    # -- the circuit ------------------------------------------------------------------

    async def record(self, failed: bool, probe: bool = False) -> CircuitState:
        """Count an outcome toward the endpoint's circuit (failed = outage-like)."""
        return await self._recorder.submit((failed, probe))

    def _flush_outcomes(self, items: list[tuple[bool, bool]]) -> list[CircuitState]:
        ok = sum(1 for failed, probe in items if not failed and not probe)
        fail = sum(1 for failed, probe in items if failed and not probe)
        probes = [failed for failed, probe in items if probe]
        probe_result = "" if not probes else ("0" if probes[-1] else "1")
        p = self._circuit
        out = self._store.scripts.circuit(
            keys=[self.circuit_key],
            args=[mask_url(self._settings.base_url), p.window_ms, p.min_outcomes, p.failure_share,
                  p.first_cooling_ms, p.max_cooling_ms, ok, fail, probe_result,
                  int(self._options.give_up_seconds * 1000)])
        state = CircuitState(_s(out[0]), int(out[1]), int(out[2]), int(out[3]))
        return [state] * len(items)

    async def drain(self) -> None:
        for group in (self._gates, self._settlers, self._observers):
            for b in group.values():
                await b.drain()
        await self._recorder.drain()
        if self._rereport is not None:
            await asyncio.gather(self._rereport, return_exceptions=True)
