"""A shard runner's per-day steps (an endpoint's rpd/tpd, day_take.lua): which endpoint takes an
attempt and whether its day still can, the count given back for a request never sent, the wait of
a request too large for what is left today, the pause when every endpoint has spent its day.
``DaySteps`` is a part of ``JobAttempts`` (runner/attempt.py), as ``CacheSteps`` is."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from batchrun.policy.classify import BATCH_ID_PLACEHOLDER
from batchrun.policy.days import all_spent_sentence, resume_words_at
from batchrun.policy.decision import PauseKind
from batchrun.runner.routes import Route
from batchrun.state.items import RequeueItem
from batchrun.state.limiter import CircuitState, EndpointDown
from batchrun.state.states import BatchState
from batchrun.state.store import LeasedJob

log = logging.getLogger("batchrun.worker")


def day_too_large_sentence(custom_id: str, tokens: int, model: str, routes) -> str:
    days = ", ".join(f"{r.name} tpd {r.endpoint.day_limits(model)[1]:,}" for r in routes)
    return (f"job {custom_id} needs up to {tokens:,} tokens, more than a whole day of {model} on every endpoint "
            f"serving it ({days}); it can never be sent (reduce its prompt or max_tokens, or raise the tpd)")


def _day_short_words(custom_id: str, tokens: int, model: str, left: str) -> str:
    return (f"job {custom_id} needs up to {tokens:,} tokens, more than what is left today of the tokens-per-day "
            f"limit of {model} on every endpoint serving it that has not spent its day (tokens left: {left})")


def day_short_sentence(custom_id: str, tokens: int, model: str, left: str, seconds: float) -> str:
    return (f"{_day_short_words(custom_id, tokens, model, left)}; the batch's other jobs go on while this one "
            f"waits for room, at the latest until the day starts again at {resume_words_at(seconds)}")


def day_short_pause_sentence(custom_id: str, tokens: int, model: str, left: str, seconds: float, cap: float) -> str:
    return (f"{_day_short_words(custom_id, tokens, model, left)}, and no other job of the batch is ready to go; "
            f"a day starts again at {resume_words_at(seconds)}, longer than the --backoff-cap of {cap:g} s, so the "
            f"batch is paused; no job failed. Run `batchrun resume {BATCH_ID_PLACEHOLDER}` after "
            f"{time.strftime('%H:%M UTC (%Y-%m-%d)', time.gmtime(time.time() + seconds))}")


class DaySteps:
    async def _route_and_admit(self, job: LeasedJob, model: str, budget_in: int, output: int, least_input: int):
        """The endpoint for this attempt and its budget's admission: an endpoint found down on the
        way (its circuit open) or with its day's limit spent gives way to another one serving the
        model, while there is one. (route, None): it can never fit; (None, seconds): every endpoint
        serving it has spent its day, the soonest starts again in that many seconds."""
        avoid = self._avoid.pop(job.custom_id, None)
        spent: dict[str, float] = {}  # endpoint -> seconds until its day starts again
        short: dict[str, int] = {}  # endpoint -> its day's tokens left, too few for this request alone
        self._short_today.pop(job.custom_id, None)
        await self.routes.ready(model)
        while True:
            route = self.routes.choose(model, budget_in + output, avoid, skip=spent)
            if route is None:  # none serves it, or every one that does has spent its day
                lefts = [r.day_until(model) for r in self.routes.serving(model)] + list(spent.values())
                if short:  # (some only too small for this request today: _send_attempt says so)
                    self._short_today[job.custom_id] = short
                return None, min((left for left in lefts if left > 0), default=None)
            day_left = route.day_until(model)
            if not day_left:
                day_left, day = await self._redis(route.day_spent, self.store, model, budget_in + output)
                if day_left and not route.day_until(model):  # its day takes smaller requests, not this one
                    short[route.name] = route.day_short.get(model, 0)
                elif day_left:  # `status` reads this budget's record
                    self.routes.noticed[f"day:{route.limiter.budget_key(model)}"] += 1
                elif day is not None:  # counted: given back if it is never sent (_process)
                    self._day_counted[job.custom_id] = (route, model, day, budget_in + output)
            if day_left:  # (requests it counted already go on: a cooldown of its budget would hold them too)
                spent[route.name] = day_left
                continue
            give_way = (lambda: self.routes.elsewhere(model, route)) if len(self.routes.serving(model)) > 1 else None
            try:
                return route, await route.limiter.admit(model, budget_in, output, least_input=least_input,
                                                        give_way=give_way,
                                                        on_granted=lambda: self._granted.add(job.custom_id))
            except EndpointDown:
                route.circuit = CircuitState("open", int(time.time() * 1000) + 1000, int(time.time() * 1000))
                avoid = route.name
                if (counted := self._day_counted.pop(job.custom_id, None)) is not None:  # not sent there
                    await self._give_day_back(*counted)

    async def _give_day_back(self, route: Route, model: str, day: int, tokens: int) -> None:
        try:
            await asyncio.to_thread(route.day_give_back, self.store, model, day, tokens)
        except Exception as exc:  # Redis away: the count stays (a request of the day lost, no more)
            log.debug("batch %s: a day's count of %s could not be given back: %s", self.batch_id, route.name, exc)

    async def _wait_for_a_day(self, job: LeasedJob, model: str, tokens: int, short: dict[str, int],
                              seconds: float) -> None:
        """The request needs more tokens than what is left of the day on each endpoint serving its
        model that still takes smaller ones: not a spent day, so the batch's other jobs go on and
        this one waits (no attempt lost), up to the backoff cap at a time; when no other job of the
        batch is in flight or due, the batch pauses with a sentence saying until when."""
        left = ", ".join(f"{name} {n:,}" for name, n in sorted(short.items()))
        self._deferring.add(job.custom_id)
        try:
            counts = await self._redis(self.store.counts, self.batch_id)
            others = counts.get("in_flight", 0) - len(self._deferring) > 0 or counts.get("queued", 0) > 0
        except Exception:  # Redis away: wait as if the others went on (the run says what is wrong)
            others = True
        finally:
            self._deferring.discard(job.custom_id)
        if seconds > self.policy.cap and not others:
            await self._pause_until_a_day(job, day_short_pause_sentence(job.custom_id, tokens, model, left, seconds,
                                                                        self.policy.cap))
            return
        # (spread: two such jobs of two workers, back at the same moment, would each see the other in flight)
        delay = min(seconds, self.policy.cap * (0.5 + random.random() / 2))
        await self.requeuer.submit(RequeueItem(job.custom_id, int(delay * 1000), False, "", False))
        self._note_event("day_too_small", delay)
        if model not in self._said_short:  # (once per model: the next ones are counted in the shard's summary line)
            self._said_short.add(model)
            log.warning("batch %s: %s", self.batch_id, day_short_sentence(job.custom_id, tokens, model, left, seconds))

    async def _pause_for_days(self, job: LeasedJob, model: str) -> None:
        """Every endpoint serving the model has spent its day, and the first resumes later than the
        backoff cap: the batch pauses with a sentence saying when (the job keeps its attempts)."""
        await self._pause_until_a_day(job, all_spent_sentence(model, self.routes.days_spent(model), self.policy.cap))

    async def _pause_until_a_day(self, job: LeasedJob, message: str) -> None:
        """The batch pauses (a long wait, said with when it can go on); the job goes back, attempts kept."""
        message = message.replace(BATCH_ID_PLACEHOLDER, self.batch_id)
        if await self._redis(self.store.set_state, self.batch_id, BatchState.PAUSED, message,
                             only_from=(BatchState.RUNNING,), pause_kind=PauseKind.LONG_WAIT):
            log.error("batch %s paused: %s", self.batch_id, message)
        await self.requeuer.submit(RequeueItem(job.custom_id, 0, False, "", False))
        self.stats["paused"] += 1
