"""The shard runner carries out each decision: what it hands the store for every outcome (a fake store,
limiter and batchers, no Redis), and whole runs against the hostile server (fakeredis)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import fakeredis
import pytest

from batchrun.policy.backoff import BackoffPolicy
from batchrun.policy.classify import Action, Verdict
from batchrun.runner.shard import ShardRunner
from batchrun.settings import BatchOptions, WorkerSettings
from batchrun.state import keys
from batchrun.policy.decision import PauseKind
from batchrun.state.items import CompleteItem, OutcomeKind, RequeueItem
from batchrun.state.limiter import CircuitState
from batchrun.state.store import BatchStore, LeasedJob
from tests.hostile import HostileServer, Reply, error_body, ok

NOW = 1_000_000
HISTORY = [{"at": 1.0, "status": 500, "error": "server_error", "message": "first", "wait": 0.5}]


class FakeStore:
    def __init__(self):
        self.states: list[tuple[str, str]] = []
        self.pause_kinds: list = []

    def set_state(self, batch_id, state, reason="", *, only_from=(), pause_kind=None):
        self.states.append((state, reason))
        self.pause_kinds.append(pause_kind)
        return True

    def history(self, batch_id, custom_id):
        return list(HISTORY)


class FakeLimiter:
    def __init__(self, circuit: CircuitState):
        self.circuit = circuit
        self.cooled: list[tuple[str, float]] = []

    async def record(self, failed, probe=False):
        return self.circuit

    async def cool_down(self, model, seconds):
        self.cooled.append((model, seconds))


class Collected:
    """A Batcher's stand-in: keeps what is submitted."""

    def __init__(self):
        self.items: list = []

    async def submit(self, item):
        self.items.append(item)


def fake_runner(circuit=CircuitState("closed", 0, NOW, 0), *, base_url="http://127.0.0.1:9/v1", max_attempts=3,
                give_up=30.0) -> ShardRunner:
    runner = ShardRunner(FakeStore(), "b", 0, WorkerSettings(base_url=base_url, api_key="sk-x"))
    runner.policy = BackoffPolicy(base=1.0, factor=2.0, cap=60.0, max_attempts=max_attempts)
    runner.give_up_seconds, runner.running_since_ms = give_up, 0.0
    runner.limiter = FakeLimiter(circuit)
    runner.requeuer, runner.completer = Collected(), Collected()
    return runner


def fail(runner, verdict, *, attempts=0, response=None, on_the_wire=True):
    job = LeasedJob("j1", attempts, {"url": "/v1/chat/completions", "body": {}})
    if on_the_wire:
        runner._on_the_wire.add("j1")
    asyncio.run(runner._handle_failure(job, "gpt-4o-mini", verdict, response, False))


SERVER_ERROR = Verdict(Action.RETRY, "server_error", "HTTP 500", circuit=True)
HTTP_500 = {"status_code": 500, "request_id": None, "body": {}}
HTTP_429 = {"status_code": 429, "request_id": None, "body": {}}


def test_a_retry_goes_back_with_its_wait_an_attempt_and_a_history_record():
    runner = fake_runner()
    fail(runner, SERVER_ERROR, response=HTTP_500)
    [item] = runner.requeuer.items
    assert isinstance(item, RequeueItem) and item.custom_id == "j1" and item.counts_attempt
    record = json.loads(item.history)
    assert record["status"] == 500 and record["error"] == "server_error"
    assert abs(item.delay_ms - record["wait"] * 1000) <= 1 and 0 <= record["wait"] <= 1.0
    assert not item.maybe_paid  # it was answered: nothing was processed
    assert runner.stats == Counter(retried=1) and not runner.completer.items


def test_an_attempt_without_an_answer_goes_back_maybe_paid():
    runner = fake_runner()
    fail(runner, Verdict(Action.RETRY, "timeout", "timed out", circuit=True))
    assert runner.requeuer.items[0].maybe_paid
    runner = fake_runner()
    fail(runner, Verdict(Action.RETRY, "connection", "refused", circuit=True), on_the_wire=False)
    assert not runner.requeuer.items[0].maybe_paid  # it never reached the server


def test_an_open_circuit_holds_the_job_without_spending_an_attempt():
    runner = fake_runner(CircuitState("open", NOW + 10_000, NOW, NOW - 1_000))
    fail(runner, SERVER_ERROR, attempts=2, response=HTTP_500)
    [item] = runner.requeuer.items
    assert not item.counts_attempt and item.history == "" and 10_000 <= item.delay_ms <= 11_000
    assert runner.stats == Counter(held_by_circuit=1)


def test_a_server_down_past_the_give_up_time_pauses_the_batch_and_keeps_the_job():
    runner = fake_runner(CircuitState("open", NOW + 10_000, NOW, NOW - 40_000))
    fail(runner, Verdict(Action.RETRY, "timeout", "timed out", circuit=True), attempts=2)
    assert runner.requeuer.items == [RequeueItem("j1", 0, False, "", True)]  # maybe paid: still counted
    [(state, reason)] = runner.store.states
    assert state == "paused" and "past --give-up-after 30 s" in reason and "batchrun resume b`" in reason
    assert runner.store.pause_kinds == [PauseKind.GAVE_UP]  # stored beside the reason: code tests the kind
    assert runner.stats == Counter(paused=1) and not runner.completer.items


def test_the_last_attempt_ends_in_an_error_carrying_the_jobs_history():
    runner = fake_runner()
    fail(runner, SERVER_ERROR, attempts=2, response=HTTP_500)
    [item] = runner.completer.items
    assert isinstance(item, CompleteItem) and item.kind is OutcomeKind.ERROR and not item.maybe_paid
    line = json.loads(item.line)
    assert line["error"]["message"] == "gave up after 3 attempts; last error: HTTP 500"
    assert line["attempts"][:1] == HISTORY and line["attempts"][1]["wait"] is None
    assert runner.stats == Counter(failed=1) and not runner.requeuer.items


def test_a_404_without_v1_fails_the_job_and_says_so():
    runner = fake_runner(base_url="http://127.0.0.1:9")
    fail(runner, Verdict(Action.FAIL, "not_found", "HTTP 404"), response={"status_code": 404, "body": {}})
    line = json.loads(runner.completer.items[0].line)
    assert "has no /v1: did you mean OPENAI_BASE_URL=http://127.0.0.1:9/v1?" in line["error"]["message"]


def test_an_empty_budget_cools_the_fleet_down_and_a_per_day_limit_pauses():
    runner = fake_runner()
    fail(runner, Verdict(Action.RETRY, "rate_limit_tokens", "TPM", hint=5.0, budget_exhausted=True), response=HTTP_429)
    assert runner.limiter.cooled == [("gpt-4o-mini", 5.0)] and runner.requeuer.items[0].delay_ms >= 5_000
    runner = fake_runner()
    fail(runner, Verdict(Action.RETRY, "rate_limit_requests", "RPD.", hint=86_400.0, budget_exhausted=True),
         response=HTTP_429)
    assert runner.limiter.cooled == [("gpt-4o-mini", 60.0)]
    assert "longer than the --backoff-cap of 60 s" in runner.store.states[0][1]
    assert runner.store.pause_kinds == [PauseKind.LONG_WAIT]
    assert runner.requeuer.items == [RequeueItem("j1", 0, False, "", False)]


# --- whole runs against the hostile server ---------------------------------------------------------

CHAT = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


def run_batch(script, n_jobs=1, **options):
    store = BatchStore(fakeredis.FakeRedis(server=fakeredis.FakeServer()))
    store.create_batch("b", BatchOptions(shard_size=1000, backoff_base=0.01, backoff_cap=0.05, **options))
    store.add_jobs("b", [(f"j{i}", 0, json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": CHAT}))
                         for i in range(n_jobs)])
    with HostileServer(script) as srv:
        settings = WorkerSettings(base_url=srv.base_url, api_key="sk-test", concurrency=4, request_timeout=5.0,
                                  park_after_seconds=30.0)
        stats = asyncio.run(asyncio.wait_for(ShardRunner(store, "b", 0, settings).run(), 60))
        return store, stats, list(srv.requests)


def results_of(store) -> list[tuple[str, dict]]:
    return [(raw[:1].decode(), json.loads(raw[1:])) for raw in store.results("b", 0, 100)]


SERVER_500 = Reply(500, body=error_body("The server had an error", "server_error"))


def test_a_job_retried_after_a_server_error_ends_in_its_result():
    store, stats, seen = run_batch([SERVER_500, ok("hello")], max_attempts=3)
    [(kind, line)] = results_of(store)
    assert kind == OutcomeKind.RESULT.value and line["custom_id"] == "j0"
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "hello"
    assert stats == {"retried": 1, "done": 1} and len(seen) == 2
    assert store.meta("b")["retries"] == "1" and store.meta("b")["state"] == "finished"


def test_a_job_failing_every_attempt_ends_in_an_error_with_each_attempt():
    store, stats, seen = run_batch([SERVER_500], max_attempts=3)
    [(kind, line)] = results_of(store)
    assert kind == OutcomeKind.ERROR.value and len(line["attempts"]) == 3 and len(seen) == 3
    assert stats == {"retried": 2, "failed": 1}


def test_a_bad_key_pauses_the_batch_with_every_job_kept():
    store, stats, seen = run_batch([Reply(401, body=error_body("Incorrect API key provided", "invalid_request_error",
                                                               "invalid_api_key"))], n_jobs=3, max_attempts=3)
    meta = store.meta("b")
    assert meta["state"] == "paused" and results_of(store) == []
    assert store.redis.zcard(keys.todo("b", 0)) == 3  # back in the queue, no attempt spent
    assert not store.redis.hvals(keys.sub("b", "attempts")) and stats["paused"] >= 1


@pytest.mark.parametrize("hint", ["86400"])
def test_a_per_day_limit_pauses_instead_of_spending_attempts(hint):
    limited = Reply(429, {"retry-after": hint}, error_body("Rate limit reached for requests per day (RPD)",
                                                           "requests", "rate_limit_exceeded"))
    store, stats, seen = run_batch([limited], max_attempts=3)
    assert store.meta("b")["state"] == "paused" and "--backoff-cap" in store.meta("b")["reason"]
    assert len(seen) == 1 and results_of(store) == []
