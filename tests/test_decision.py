"""policy.decision: what a failed attempt leads to, as a table and as properties (no I/O, no Redis)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrun.policy.backoff import HINT_CEILING, BackoffPolicy
from batchrun.policy.classify import KINDS, Action, Verdict
from batchrun.policy.decision import (Decision, Fail, GiveBack, GiveUp, HoldForCircuit, Pause, PauseKind, Requeue,
                                      cost_cap_outcome, decide)
from batchrun.state.limiter import CircuitState

POLICY = BackoffPolicy(base=1.0, factor=2.0, cap=60.0, max_attempts=3)
NOW = 1_000_000
UP = CircuitState("closed", 0, NOW, 0)
DOWN = CircuitState("closed", 0, NOW, NOW - 5_000)  # failing for 5 s, circuit not yet open
OPEN = CircuitState("open", NOW + 10_000, NOW, NOW - 5_000)  # open for 10 s more
GIVE_UP = GiveUp(seconds=30.0)

RETRY = Verdict(Action.RETRY, "server_error", "HTTP 500", circuit=True)
TIMEOUT = Verdict(Action.RETRY, "timeout", "timed out", circuit=True)
RATE = Verdict(Action.RETRY, "rate_limit_tokens", "TPM", hint=5.0, budget_exhausted=True)
RATE_NO_HINT = Verdict(Action.RETRY, "rate_limit_tokens", "TPM", budget_exhausted=True)
PER_DAY = Verdict(Action.RETRY, "rate_limit_requests", "RPD.", hint=86_400.0, budget_exhausted=True)
BAD = Verdict(Action.FAIL, "bad_request", "bad request")
AUTH = Verdict(Action.PAUSE, "auth", "bad key; run `batchrun resume BATCH_ID`")


def _decide(verdict, attempt=1, circuit=UP, give_up=GIVE_UP, maybe_paid=False, policy=POLICY) -> Decision:
    return decide(verdict, attempt=attempt, policy=policy, circuit=circuit, give_up=give_up,
                  maybe_paid=maybe_paid, rng=random.Random(7))


# --- the table ---------------------------------------------------------------------------------

@pytest.mark.parametrize("verdict, kw, expected", [
    # a fault that may pass: retried with backoff while attempts are left, then an error with history
    (RETRY, {}, Requeue),
    (RETRY, {"attempt": 2}, Requeue),
    (RETRY, {"attempt": 3}, Fail),
    # a bad request never succeeds: it fails at once, whatever attempts it has left
    (BAD, {}, Fail),
    # no job can succeed (bad key, quota): the batch pauses, the job keeps its attempts
    (AUTH, {}, Pause),
    (AUTH, {"attempt": 3}, Pause),
    # an outage: the job waits for the open circuit without spending an attempt...
    (RETRY, {"circuit": OPEN}, HoldForCircuit),
    (RETRY, {"circuit": OPEN, "attempt": 3}, HoldForCircuit),
    # ...but not while the circuit is still closed
    (RETRY, {"circuit": DOWN}, Requeue),
    # down past --give-up-after: the batch pauses, even for a verdict that would fail the job
    (RETRY, {"circuit": CircuitState("open", NOW + 1, NOW, NOW - 30_000)}, Pause),
    (Verdict(Action.FAIL, "server_error", "x", circuit=True), {"circuit": CircuitState("closed", 0, NOW, 1)}, Pause),
    # the give-up period counts from the batch's last start (a resume) when that is later
    (RETRY, {"circuit": CircuitState("open", NOW + 1, NOW, NOW - 30_000),
             "give_up": GiveUp(30.0, running_since_ms=NOW - 1_000)}, HoldForCircuit),
    # no give-up period: never gives up
    (RETRY, {"circuit": CircuitState("open", NOW + 1, NOW, 1), "give_up": GiveUp(0.0)}, HoldForCircuit),
    # an empty budget: retried after the server's hint, or the batch pauses when that is past the cap
    (RATE, {}, Requeue),
    (RATE, {"attempt": 3}, Fail),
    (PER_DAY, {}, Pause),
    (PER_DAY, {"attempt": 3}, Pause),
])
def test_the_outcome_of_a_failed_attempt(verdict, kw, expected):
    assert type(_decide(verdict, **kw).outcome) is expected


def test_a_retry_waits_its_backoff_and_spends_an_attempt():
    outcome = _decide(RETRY, attempt=2).outcome
    assert outcome == Requeue(outcome.delay, maybe_paid=False)
    assert 0 <= outcome.delay <= POLICY.ceiling(2)
    assert _decide(RETRY, attempt=2).cool_down is None  # not a budget's fault


def test_the_last_attempt_fails_with_the_count_and_the_last_error():
    assert _decide(RETRY, attempt=3, maybe_paid=True) == Decision(
        Fail("server_error", "gave up after 3 attempts; last error: HTTP 500", maybe_paid=True, exhausted=True))


def test_a_verdict_that_fails_keeps_its_message():
    assert _decide(BAD) == Decision(Fail("bad_request", "bad request"))


def test_a_pause_says_why():
    assert _decide(AUTH) == Decision(Pause(PauseKind.VERDICT))
    assert _decide(RETRY, circuit=CircuitState("open", NOW + 1, NOW, NOW - 30_000), maybe_paid=True) == \
        Decision(Pause(PauseKind.GAVE_UP, maybe_paid=True))


def test_a_hold_lasts_until_the_circuit_closes_plus_a_second_of_jitter():
    outcome = _decide(RETRY, circuit=OPEN).outcome
    assert 10.0 <= outcome.delay <= 11.0
    assert 0.0 <= _decide(RETRY, circuit=CircuitState("open", NOW - 5, NOW, NOW - 1)).outcome.delay <= 1.0


def test_an_empty_budget_cools_the_fleet_down_for_the_hint_at_most_the_cap():
    decision = _decide(RATE)
    assert decision.cool_down == 5.0 and decision.outcome.delay >= 5.0
    assert _decide(RATE_NO_HINT).cool_down == 1.0  # no hint: a second
    assert _decide(RATE, attempt=3).cool_down == 5.0  # the last attempt empties the budget all the same
    assert _decide(PER_DAY) == Decision(Pause(PauseKind.LONG_WAIT), cool_down=POLICY.cap)


def test_an_outage_holding_a_job_does_not_cool_the_budget_down():
    verdict = Verdict(Action.RETRY, "server_error", "x", hint=3.0, budget_exhausted=True, circuit=True)
    assert _decide(verdict, circuit=OPEN).cool_down is None


def test_the_cost_cap():
    assert cost_cap_outcome(price_known=False) == Pause(PauseKind.NO_PRICE)
    assert cost_cap_outcome(price_known=True, reserved=False) == GiveBack()
    assert cost_cap_outcome(price_known=True) is None


# --- properties --------------------------------------------------------------------------------

policies = st.builds(BackoffPolicy, base=st.floats(0, 10), factor=st.floats(1, 4),
                     cap=st.floats(0.1, 600), max_attempts=st.integers(1, 12))
# What classify gives: no hint, or a positive number of seconds (at most backoff.HINT_CEILING).
hints = st.one_of(st.none(), st.floats(0, HINT_CEILING, exclude_min=True))
verdicts = st.builds(Verdict, action=st.sampled_from(Action), kind=st.sampled_from(sorted(KINDS)),
                     message=st.text(max_size=20), hint=hints, budget_exhausted=st.booleans(), circuit=st.booleans())


@st.composite
def circuits(draw):
    now = draw(st.integers(1, 10 ** 13))
    down = draw(st.one_of(st.just(0), st.integers(1, now)))
    return CircuitState(draw(st.sampled_from(["open", "closed"])), draw(st.integers(0, 2 * now)), now, down)


give_ups = st.builds(GiveUp, seconds=st.floats(0, 10 ** 5), running_since_ms=st.floats(0, 10 ** 13))


@settings(max_examples=400, deadline=None)
@given(verdict=verdicts, policy=policies, attempt=st.integers(1, 15), circuit=circuits(), give_up=give_ups,
       maybe_paid=st.booleans(), seed=st.integers())
def test_properties(verdict, policy, attempt, circuit, give_up, maybe_paid, seed):
    decision = decide(verdict, attempt=attempt, policy=policy, circuit=circuit, give_up=give_up,
                      maybe_paid=maybe_paid, rng=random.Random(seed))
    outcome = decision.outcome
    # A request that may have been billed is never given back (or failed) as one that was not.
    assert outcome.maybe_paid == maybe_paid
    # A retryable verdict never fails before the last attempt.
    if verdict.action is Action.RETRY and attempt < policy.max_attempts:
        assert not isinstance(outcome, Fail)
    # Only an outage holds a job for the circuit, and only an open one.
    if isinstance(outcome, HoldForCircuit):
        assert verdict.circuit and circuit.open and outcome.delay >= 0
    # Every wait is within the cap; a retry spends an attempt that was left.
    if isinstance(outcome, Requeue):
        assert 0 <= outcome.delay <= policy.cap and attempt < policy.max_attempts
    # The budget cools down only when it is empty, and never past the cap.
    if decision.cool_down is not None:
        assert verdict.budget_exhausted and 0 < decision.cool_down <= policy.cap
    # A pause by the verdict, the give-up time or a long wait; nothing else pauses.
    if isinstance(outcome, Pause):
        assert outcome.kind in (PauseKind.VERDICT, PauseKind.GAVE_UP, PauseKind.LONG_WAIT)
        if outcome.kind is PauseKind.VERDICT:
            assert verdict.action is Action.PAUSE
        if outcome.kind is PauseKind.GAVE_UP:
            assert verdict.circuit
    # The same inputs, the same decision: nothing but the arguments counts.
    assert decide(verdict, attempt=attempt, policy=policy, circuit=circuit, give_up=give_up,
                  maybe_paid=maybe_paid, rng=random.Random(seed)) == decision


def test_the_policy_layer_imports_no_layer_above_it():
    import ast
    from pathlib import Path

    import batchrun.policy.decision as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    above = ("batchrun.state", "batchrun.runner", "batchrun.ops", "batchrun.cli")
    assert not [name for name in imported if name and name.startswith(above)]
