"""What becomes of a job whose attempt did not give a result: the runner's rules as one pure function.

``decide`` takes what is known once an attempt has failed (the classifier's verdict, the attempt
number, the backoff policy, the circuit breaker's reading, the give-up period, whether the request
may have been billed) and returns an :class:`Outcome`: fail the job, requeue it with a delay, hold
it for the open circuit, or pause the batch. It does no I/O: the shard runner carries the outcome
out (writes the error line, requeues, pauses, cools the budget down) and words its messages.

A rule of every outcome that gives a job back: a request that may have been processed (no answer,
yet it reached the server) stays marked maybe paid, so its worst case keeps counting under
--max-cost.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol, Union

from batchrun.enums import StoredText
from batchrun.policy.backoff import BackoffPolicy, backoff_delay, gave_up, hint_exceeds_cap
from batchrun.policy.classify import Action, Verdict

__all__ = [
    "CircuitReading",
    "Decision",
    "Fail",
    "GiveBack",
    "GiveUp",
    "HoldForCircuit",
    "Outcome",
    "Pause",
    "PauseKind",
    "Requeue",
    "cost_cap_outcome",
    "decide",
]


class PauseKind(StoredText):
    """Why a batch paused (no job fails, and the job that saw it keeps its attempts). Stored as the
    batch's ``pause_kind`` beside its reason, so that code tests the kind, never the words."""

    VERDICT = "verdict"  # the answer says no job can succeed (auth, quota): the verdict's message says why
    GAVE_UP = "gave_up"  # the server has been down past --give-up-after
    LONG_WAIT = "long_wait"  # the budget is empty for longer than --backoff-cap (a per-day limit)
    NO_PRICE = "no_price"  # --max-cost is set and the model has no price
    COST_CAP = "cost_cap"  # the next job would cross --max-cost (reserve_cost.lua): resume with a higher one
    BAD_OPTIONS = "bad_options"  # the batch's stored options cannot work (purge it, submit again)


@dataclass(frozen=True, slots=True)
class Fail:
    """The job ends in the errors file."""

    code: str  # the error's kind, as the error line names it
    message: str
    maybe_paid: bool = False
    exhausted: bool = False  # it used its last attempt (the line carries the job's history)


@dataclass(frozen=True, slots=True)
class Requeue:
    """A retry: the job comes due again after ``delay`` seconds, one attempt spent."""

    delay: float
    maybe_paid: bool = False


@dataclass(frozen=True, slots=True)
class HoldForCircuit:
    """An outage, not the job's fault: it waits for the open circuit and keeps its attempts."""

    delay: float
    maybe_paid: bool = False


@dataclass(frozen=True, slots=True)
class Pause:
    """The batch pauses; the job goes back at once, its attempts kept."""

    kind: PauseKind
    maybe_paid: bool = False


@dataclass(frozen=True, slots=True)
class GiveBack:
    """The job goes back at once, its attempts kept (stopping, or the cap refused it)."""

    maybe_paid: bool = False


Outcome = Union[Fail, Requeue, HoldForCircuit, Pause, GiveBack]


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    cool_down: float | None = None  # seconds the fleet's budget for the model cools down first (None: not)


class CircuitReading(Protocol):
    """The circuit breaker's state once this failure is counted (state.limiter.CircuitState)."""

    @property
    def open(self) -> bool: ...
    @property
    def open_until_ms(self) -> int: ...
    @property
    def now_ms(self) -> int: ...
    @property
    def down_since_ms(self) -> int: ...  # the endpoint's first outage-like failure since its last answer (0: up)


@dataclass(frozen=True, slots=True)
class GiveUp:
    """--give-up-after, counted from the later of an outage's start and the batch's last start."""

    seconds: float
    running_since_ms: float = 0.0


def decide(verdict: Verdict, *, attempt: int, policy: BackoffPolicy, circuit: CircuitReading, give_up: GiveUp,
           maybe_paid: bool, rng: random.Random) -> Decision:
    """The outcome of failed attempt number ``attempt`` (1 for a job's first) judged ``verdict``."""
    if verdict.circuit:
        if gave_up(circuit.now_ms, circuit.down_since_ms, give_up.running_since_ms, give_up.seconds):
            # Nothing runs for ever: a server that does not come back pauses the batch.
            return Decision(Pause(PauseKind.GAVE_UP, maybe_paid))
    elif verdict.budget_exhausted and hint_exceeds_cap(verdict.hint, policy):
        # Waiting the cap again and again would only hold workers and burn attempts: the fleet
        # cools down for the cap, no longer, and the batch pauses.
        return Decision(Pause(PauseKind.LONG_WAIT, maybe_paid), cool_down=policy.cap)
    if verdict.action is Action.PAUSE:
        return Decision(Pause(PauseKind.VERDICT, maybe_paid))
    if verdict.action is Action.FAIL:
        return Decision(Fail(verdict.kind, verdict.message, maybe_paid))
    if verdict.circuit and circuit.open:
        wait = max(0.0, (circuit.open_until_ms - circuit.now_ms) / 1000) + rng.uniform(0, 1)
        return Decision(HoldForCircuit(wait, maybe_paid))
    cool_down = min(verdict.hint or 1.0, policy.cap) if verdict.budget_exhausted else None
    if attempt >= policy.max_attempts:
        message = f"gave up after {attempt} attempts; last error: {verdict.message}"
        return Decision(Fail(verdict.kind, message, maybe_paid, exhausted=True), cool_down)
    return Decision(Requeue(backoff_delay(attempt, policy, verdict.hint, rng), maybe_paid), cool_down)


def cost_cap_outcome(*, price_known: bool, reserved: bool = True) -> Outcome | None:
    """Under --max-cost, before a job is sent: a model without a price pauses the batch (not the
    job's fault: it waits for a price); a job whose worst case the cap refused goes back (the
    reservation paused the batch). None: it may be sent."""
    if not price_known:
        return Pause(PauseKind.NO_PRICE)
    if not reserved:
        return GiveBack()
    return None
