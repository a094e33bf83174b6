"""A runner's endpoints: for each, its budgets (a SharedLimiter), its client(s), its fleet-wide slots.

Each request is routed here (policy/routing.py picks): among the endpoints serving its model,
the one whose budget can take it soonest. The budgets' levels are read from Redis (level.lua)
at most every LEVEL_REFRESH_S per endpoint and model, and what this runner has routed since
counts against them meanwhile, so that a burst of requests spreads instead of all going to the
one that looked emptiest at the last read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import redis
from openai import AsyncOpenAI

from batchrun.endpoints import Endpoint, EndpointKind, EndpointVia, configured_endpoints
from batchrun.policy.classify import remember_secrets
from batchrun.policy.days import DaySpent
from batchrun.policy.routing import RouteOption, pick
from batchrun.runner.azure import azure_body, make_azure_client
from batchrun.runner.sender import make_client
from batchrun.settings import BatchOptions, Limits, WorkerSettings
from batchrun.state import keys
from batchrun.state.limiter import CircuitState, SharedLimiter
from batchrun.state.slots import FleetSlots
from batchrun.state.store import BatchStore
from batchrun.text import decoded as _s

log = logging.getLogger("batchrun.worker")

LEVEL_REFRESH_S = 0.25  # an endpoint's budget level is read this often at most, per model
READY_WAIT_S = 2.0  # a runner's first request waits this long at most for the endpoints' first read


def merged_limits(batch: Limits, endpoint: Limits) -> Limits:
    """The batch's --tpm/--rpm with the endpoint's own limits over them (an endpoint's limit
    of a model, or its bare one, wins over the batch's for the same model)."""
    out = {m: dict(v) for m, v in batch.by_model.items()}
    for model, entry in endpoint.by_model.items():
        out.setdefault(model, {}).update(entry)
        if model == "*":  # the endpoint's bare limit applies to the models the batch named too
            for other in out:
                for kind, value in entry.items():
                    if other != "*" and kind not in endpoint.by_model.get(other, {}):
                        out[other][kind] = value
    return Limits(out)


@dataclass
class _Level:
    read_at: float = -1e9  # time.monotonic() of the read
    tok: float = 0.0  # tokens available at the read (negative: reserved ahead)
    rate: float = 0.0  # tokens per second (0: no limit known)
    req: float = 0.0
    rate_r: float = 0.0
    cool_s: float = 0.0  # the cooldown left at the read, seconds
    reading: asyncio.Task | None = None


@dataclass
class Route:
    """One endpoint, as one runner sends to it."""

    name: str  # '' for the worker's single endpoint (no [[endpoints]])
    endpoint: Endpoint | None
    settings: WorkerSettings
    limiter: SharedLimiter
    slots: FleetSlots | None = None
    clients: dict[str, AsyncOpenAI] = field(default_factory=dict)  # deployment ('' : the one) -> client
    in_flight: int = 0
    chosen: int = 0  # requests routed here by this runner (turns among equals: a burst spreads at once)
    circuit: CircuitState | None = None  # its circuit as last seen by this runner
    levels: dict[str, _Level] = field(default_factory=dict)
    day_spent_until: dict[str, float] = field(default_factory=dict)  # model -> time.monotonic() its day restarts
    day_why: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # model -> (limit, its number, by)
    day_short: dict[str, int] = field(default_factory=dict)  # model -> tokens its day had left at a refusal

    def client_for(self, model: str) -> AsyncOpenAI:
        ep = self.endpoint
        azure = ep is not None and ep.kind is EndpointKind.AZURE
        deployment = ep.deployments.get(model, "") if azure and ep.deployment_paths else ""  # else the v1 path
        client = self.clients.get(deployment)
        if client is None:
            client = self.clients[deployment] = (make_azure_client(ep, self.settings, deployment)
                                                 if ep is not None and ep.kind is EndpointKind.AZURE
                                                 else make_client(self.settings))
        return client

    def body_for(self, body: dict) -> dict:
        """The body as this endpoint takes it (Azure's v1 path names the deployment as the model)."""
        ep = self.endpoint
        return azure_body(ep, body) if ep is not None and ep.kind is EndpointKind.AZURE else body

    def day_spent(self, store: BatchStore, model: str, tokens: int) -> tuple[float, int | None]:
        """Count this request against the endpoint's per-day limits of the model: (0, the day it
        was counted on, None with no per-day limit) when counted, else (the seconds until the
        endpoint takes the model again, None): the request is not counted. A request refused
        only for its size (the day's tokens left still take today's average request) leaves the
        endpoint to the others: ``day_short`` says how many tokens it had left."""
        rpd, tpd = self.endpoint.day_limits(model) if self.endpoint is not None else (0, 0)
        if not (rpd or tpd):
            return 0.0, None
        key = keys.day_counts(self.limiter.budget_key(model))
        refused, reset_ms, which, left = store.scripts.day_take(keys=[key], args=[rpd, tpd, tokens, self.name])
        if not int(refused):  # (called from a thread)
            return 0.0, int(reset_ms)  # (the day counted on)
        which = _s(which)
        if int(left) >= 0:  # its day still takes smaller requests: only this one is skipped here
            self.day_short[model] = int(left)
            return int(reset_ms) / 1000, None
        self.note_day(model, int(reset_ms) / 1000, which, rpd if which == "rpd" else tpd if which == "tpd" else 0,
                      "count")  # not asked again until then
        return int(reset_ms) / 1000, None

    def day_give_back(self, store: BatchStore, model: str, day: int, tokens: int) -> None:
        """A request counted against the day (on ``day``) and never sent: its count goes back."""
        store.scripts.day_give_back(keys=[keys.day_counts(self.limiter.budget_key(model))], args=[day, tokens])
        if self.day_why.get(model, ("", 0, ""))[2] == "count":  # its room is back: asked again
            self.day_spent_until.pop(model, None)

    def server_day_spent(self, store: BatchStore, model: str, seconds: float, limit: str, value: int) -> float:
        """The server's per-day 429 recorded beside the day's counts (day_spent.lua), for the fleet
        (day_take.lua refuses until then) and for `status`: the seconds until the endpoint takes
        the model again."""
        key = keys.day_counts(self.limiter.budget_key(model))
        left_ms = int(store.scripts.day_spent(keys=[key], args=[int(seconds * 1000), limit, value, self.name]))
        self.note_day(model, left_ms / 1000, limit, value, "server")
        return left_ms / 1000

    def note_day(self, model: str, seconds: float, limit: str, value: int, by: str) -> None:
        self.day_spent_until[model] = time.monotonic() + seconds
        self.day_why[model] = (limit, value, by)

    def day_record(self, model: str) -> DaySpent | None:
        """Its spent day for the model as this runner knows it (None: not known to be spent)."""
        left = self.day_until(model)
        if not left:
            return None
        limit, value, by = self.day_why.get(model, ("", 0, "count"))
        now_ms = time.time() * 1000
        return DaySpent(self.name, model, limit, value, by, now_ms + left * 1000, now_ms)

    def day_never_fits(self, model: str, tokens: int) -> bool:
        """The request is more than this endpoint's whole day of tokens for the model (its tpd):
        day_take.lua would refuse it every day, so it is never routed here."""
        _, tpd = self.endpoint.day_limits(model) if self.endpoint is not None else (0, 0)
        return bool(tpd) and tokens > tpd

    def day_until(self, model: str) -> float:
        """Seconds until this endpoint's spent day starts again for the model, as this runner learnt
        it (0: not known to be spent)."""
        return max(0.0, self.day_spent_until.get(model, 0.0) - time.monotonic())

    def circuit_open(self) -> bool:
        c = self.circuit
        return c is not None and c.open and time.time() * 1000 < c.open_until_ms


class Routes:
    """The routes of one runner: the endpoints of the worker's config, or its single endpoint."""

    def __init__(self, store: BatchStore, settings: WorkerSettings, options: BatchOptions, token: str,
                 endpoints: tuple[Endpoint, ...] | None = None):
        self._store = store
        self._options = options
        endpoints = configured_endpoints() if endpoints is None else endpoints
        if not endpoints:
            self.all = [Route("", None, settings, SharedLimiter(store, settings, options, token=token))]
        else:
            self.all = [self._route(store, settings, options, token, ep) for ep in endpoints]
        self._by_model: dict[str, list[Route]] = {}
        # ``day:BUDGET`` per budget found with its day spent (the shard runner reports them with its
        # metrics: `status` reads the records of those budgets, and of those the batch drew from)
        self.noticed: Counter = Counter()

    @staticmethod
    def _route(store, settings, options, token, ep: Endpoint) -> Route:
        s = ep.worker_settings(settings)
        remember_secrets(s.api_key, s.base_url)  # a server may echo them: messages hide them
        opts = replace(options, limits=merged_limits(options.limits, ep.limits))
        slots = FleetSlots(store, ep.base_url, ep.max_in_flight, int(settings.lease_seconds * 1000), token) \
            if ep.max_in_flight else None
        return Route(ep.name, ep, s, SharedLimiter(store, s, opts, token=token), slots)

    @property
    def first(self) -> Route:
        return self.all[0]

    @property
    def named(self) -> bool:
        return bool(self.first.name)

    def serving(self, model: str) -> list[Route]:
        routes = self._by_model.get(model)
        if routes is None:
            routes = [r for r in self.all if r.endpoint is None or r.endpoint.serves(model)]
            # A via = "batch-api" endpoint takes live requests only for a model no live endpoint serves
            # (the live share of --via auto, lines sent again live): it is there for remote batches.
            live = [r for r in routes if r.endpoint is None or r.endpoint.via is not EndpointVia.BATCH_API]
            routes = self._by_model[model] = live or routes
        return routes

    def elsewhere(self, model: str, route: Route) -> bool:
        """Another endpoint serving the model that is up (its circuit not open)."""
        return any(r is not route and not r.circuit_open() for r in self.serving(model))

    def day_too_small(self, model: str, tokens: int) -> list[Route]:
        """The endpoints serving the model, if the request is more than each one's day of tokens
        (it can never be sent); [] when one of them can take it."""
        routes = self.serving(model)
        return list(routes) if routes and all(r.day_never_fits(model, tokens) for r in routes) else []

    def choose(self, model: str, tokens: int, avoid: str | None = None, skip=()) -> Route | None:
        """The endpoint this request goes to: the soonest to take it (None: none serves the model,
        or those that do are in ``skip``)."""
        routes = [r for r in self.serving(model) if r.name not in skip and not r.day_until(model)
                  and not r.day_never_fits(model, tokens)]
        if len(routes) <= 1:
            return routes[0] if routes else None
        now = time.monotonic()
        options = []
        for r in routes:
            level = self._level(r, model, now)
            wait = level.cool_s - (now - level.read_at)
            if level.rate:
                wait = max(wait, (tokens - level.tok) / level.rate)
            if level.rate_r:
                wait = max(wait, (1 - level.req) / level.rate_r)
            cap = r.endpoint.max_in_flight if r.endpoint is not None else 0
            options.append(RouteOption(wait_s=wait, open=r.circuit_open(), avoided=r.name == avoid,
                                       load=r.in_flight / cap if cap else r.in_flight,
                                       full=bool(cap) and r.in_flight >= cap, chosen=r.chosen))
        route = routes[pick(options)]
        route.chosen += 1
        level = route.levels[model]
        level.tok -= tokens  # counts against it until the next read
        level.req -= 1
        return route

    async def ready(self, model: str) -> None:
        """Each endpoint serving the model read once before the first request chooses (its budget,
        circuit and day's record): a runner that starts after another found an endpoint's day
        spent skips it from its first request, rather than routing a burst there to wait."""
        routes = self.serving(model)
        # (one endpoint of a config too: a day the server said spent is then a pause that says until
        # when, not a burst of requests sent to be refused again)
        if not routes or not routes[0].name or all(model in r.levels and r.levels[model].read_at > 0 for r in routes):
            return
        now = time.monotonic()
        tasks = [t for t in (self._level(r, model, now).reading for r in routes) if t is not None and not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=READY_WAIT_S)

    def _level(self, route: Route, model: str, now: float) -> _Level:
        level = route.levels.get(model)
        if level is None:
            level = route.levels[model] = _Level()
        if now - level.read_at > LEVEL_REFRESH_S and (level.reading is None or level.reading.done()):
            level.reading = asyncio.get_running_loop().create_task(self._read(route, model, level))
        return level

    async def _read(self, route: Route, model: str, level: _Level) -> None:
        rpm, tpm = route.limiter.limits(model)
        try:
            out = await asyncio.to_thread(self._store.scripts.level, keys=[route.limiter.budget_key(model)],
                                          args=[rpm, tpm, self._options.burst_seconds])
        except (redis.ConnectionError, redis.TimeoutError):
            return
        now_ms, avail, rate, avail_r, rate_r, cool_until, spent, spent_r = (float(_s(x)) for x in out)
        level.read_at = time.monotonic()
        level.tok, level.rate = avail - spent, rate * 1000
        level.req, level.rate_r = avail_r - spent_r, rate_r * 1000
        level.cool_s = max(0.0, (cool_until - now_ms) / 1000)
        try:  # its circuit too: a route down is skipped while another is up; and its day's record
            (state, open_until), day = await asyncio.to_thread(self._circuit_and_day, route, model)
        except (redis.ConnectionError, redis.TimeoutError):
            return
        until, limit, value, by, tok = (_s(x) if x is not None else "" for x in day)
        # Spent, as another runner found: its requests, or the server said so. A tokens' day that
        # refused a large request may still take smaller ones: skipped only once (nearly) all used.
        whole = limit == "rpd" or by == "server" or float(tok or 0) >= 0.99 * float(value or 0)
        if until and float(until) > now_ms and whole and not route.day_until(model):
            route.note_day(model, (float(until) - now_ms) / 1000, limit, int(float(value or 0)), by or "count")
            self.noticed[f"day:{route.limiter.budget_key(model)}"] += 1
        if state is not None:
            # (open_until is server time; kept as this machine's, shifted by the difference)
            shift = time.time() * 1000 - now_ms
            route.circuit = CircuitState(_s(state), int(float(_s(open_until) or 0) + shift), int(now_ms + shift))

    def _circuit_and_day(self, route: Route, model: str):
        pipe = self._store.redis.pipeline(transaction=False)
        pipe.hmget(route.limiter.circuit_key, "state", "open_until")
        pipe.hmget(keys.day_counts(route.limiter.budget_key(model)), "spent_until", "spent_limit", "spent_of",
                   "spent_by", "tok")
        return pipe.execute()

    def days_spent(self, model: str) -> list[DaySpent]:
        """The spent days of the endpoints serving the model, as this runner knows them."""
        return [d for d in (r.day_record(model) for r in self.serving(model)) if d is not None]

    def renew_slots(self) -> None:
        for r in self.all:
            if r.slots is not None:
                r.slots.renew()

    def report_held(self) -> None:
        for r in self.all:
            r.limiter.report_held()

    def forget_held(self) -> None:
        for r in self.all:
            r.limiter.forget_held()

    async def drain(self) -> None:
        for r in self.all:
            await r.limiter.drain()

    async def close(self) -> None:
        for r in self.all:
            for client in r.clients.values():
                await client.close()
