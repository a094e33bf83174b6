"""Edges of the fair share between batches (issue 20), on the real Redis with `batchrun worker`
processes and the mock server: what a yield does to a request that waits for its turn in the budget."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from batchrun.mock import MockConfig, MockServerThread
from batchrun.state.connections import connect
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore
from tests.helpers import batchrun_cmd, cli_env, write_jobs

pytestmark = pytest.mark.redis


def test_a_large_request_is_sent_although_its_runner_yields_to_a_batch_that_shares_its_budget(
        spawn, real_redis_url, tmp_path):
    """One worker, two batches on one budget of 6,000 TPM (100 tokens a second). The big batch's one
    request takes ~1,000 tokens: about 10 s of the budget, longer than a fair turn on the worker. A
    runner that yields gives up the request's place (and the budget it took) every turn, so without a
    fix it is never sent while the other batch has shards waiting; today's behaviour sends it in ~10 s."""
    with MockServerThread(MockConfig()) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
        store = BatchStore(connect(real_redis_url))
        big = tmp_path / "big.jsonl"
        big.write_text(json.dumps({"custom_id": "big-0", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "gpt-4o-mini", "max_tokens": 950,
                                            "messages": [{"role": "user", "content": "Say a long thing."}]}}) + "\n")
        small = write_jobs(tmp_path / "small.jsonl", 600, prefix="small", max_tokens=10)
        worker = spawn(batchrun_cmd("-q", "worker", "--concurrency", "8", "--grace", "5"), env=env)
        try:
            for path, name, extra in ((big, "big", ()), (small, "small", ("--shard-size", "20"))):
                proc = subprocess.run(batchrun_cmd("submit", str(path), "--tpm", "6000", "--batch-id", name, *extra),
                                      env=env, capture_output=True, text=True, timeout=60)
                assert proc.returncode == 0, proc.stderr
            deadline = time.monotonic() + 60
            while store.meta("big").get("state") != BatchState.FINISHED.value:
                assert time.monotonic() < deadline, (
                    f"the big request was not sent in 60 s: {store.meta('big')}, "
                    f"small done {store.meta('small').get('done')}")
                time.sleep(0.5)
        finally:
            for b in store.active_batches():
                store.set_state(b, BatchState.CANCELLED, "test over")
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)


def _run(env, *args):
    return subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=60)


def test_priority_of_a_batch_that_does_not_run_says_when_it_applies(real_redis_url, tmp_path):
    """`batchrun priority` on a cancelled or paused batch must not promise that its runners apply it
    within seconds: a cancelled one has none and never will; a paused one takes it when resumed."""
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    for name in ("c1", "p1"):
        assert _run(env, "submit", str(jobs), "--batch-id", name).returncode == 0
    assert _run(env, "cancel", "c1").returncode == 0
    BatchStore(connect(real_redis_url)).set_state("p1", BatchState.PAUSED, "paused by the test")
    proc = _run(env, "priority", "c1", "high")
    assert proc.returncode == 0, proc.stderr
    assert "within seconds" not in proc.stdout and "cancelled, so nothing of it runs any more" in proc.stdout
    proc = _run(env, "priority", "p1", "low")
    assert proc.returncode == 0 and "when the batch is resumed (batchrun resume p1)" in proc.stdout
    assert _run(env, "purge", "c1", "--yes").returncode == 0
    proc = _run(env, "priority", "c1", "high")
    assert proc.returncode == 1 and "no batch 'c1' in this Redis" in proc.stderr and "Traceback" not in proc.stderr


def test_one_worker_a_weighted_batch_still_takes_turns_and_nobody_yields_to_get_its_worker_back():
    from batchrun.policy.fairshare import should_yield

    # One worker, weights 2:1 (or high against normal): the weighted batch must still give its turn,
    # else the other one never runs while it has work (strict priority, not a share).
    assert should_yield("a", {"a": 2.0, "b": 1.0}, {"a": 1}, {"b"})
    assert should_yield("a", {"a": 4.0, "b": 1.0}, {"a": 1}, {"b"})
    # Two workers, high a and normal b on one each, a with shards waiting: b giving its worker up would
    # see it come straight back (the free worker's fair choice is b again): a yield for nothing.
    assert not should_yield("b", {"a": 4.0, "b": 1.0}, {"a": 1, "b": 1}, {"a"})


def test_a_batch_keeps_its_turn_in_proportion_to_its_weight():
    from batchrun.policy.fairshare import turn_seconds

    assert turn_seconds(1.0, 3.0) == 3.0 and turn_seconds(0.0, 3.0) == 3.0
    assert turn_seconds(4.0, 3.0) == 12.0  # high against normal on one worker: 12 s turns against 3 s, 80/20


from hypothesis import given, strategies as st  # noqa: E402


@given(st.dictionaries(st.sampled_from("abcde"), st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0]), min_size=2),
       st.dictionaries(st.sampled_from("abcde"), st.integers(0, 6)), st.sampled_from("abcde"), st.data())
def test_a_runner_yields_exactly_when_the_free_worker_would_go_to_another_batch(ws, running, own, data):
    from batchrun.policy.fairshare import next_batch, should_yield

    ws = {**ws, own: ws.get(own, 1.0)}
    running = {**running, own: max(1, running.get(own, 0))}
    waiting = set(data.draw(st.lists(st.sampled_from(sorted(ws)), unique=True))) - {own}
    served = {b: float(i) for i, b in enumerate(sorted(ws))}
    served[own] = 100.0  # it was served last: it got its worker at the start of its turn
    after = {**running, own: running[own] - 1}
    choice = next_batch(waiting | {own}, ws, after, served)
    assert should_yield(own, ws, running, waiting) == (choice != own), (choice, after)


def test_one_worker_a_normal_batch_is_not_stuck_behind_a_high_one(spawn, real_redis_url, tmp_path):
    """One worker, a big `high` batch holding it: a small `normal` batch still gets turns (shorter ones)
    and finishes long before the big one, rather than waiting for it to end (strict priority)."""
    with MockServerThread(MockConfig()) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
        store = BatchStore(connect(real_redis_url))
        worker = spawn(batchrun_cmd("-q", "worker", "--concurrency", "50", "--grace", "5"), env=env)
        try:
            for name, n, extra in (("hi", 3000, ("--priority", "high", "--shard-size", "3000")),
                                   ("norm", 10, ())):
                path = write_jobs(tmp_path / f"{name}.jsonl", n, prefix=name)
                proc = _run(env, "submit", str(path), "--tpm", "60000", "--batch-id", name, *extra)
                assert proc.returncode == 0, proc.stderr
                deadline = time.monotonic() + 30
                while name == "hi" and int(store.meta("hi").get("done", 0)) < 20:
                    assert time.monotonic() < deadline, "the high batch did not start"
                    time.sleep(0.2)
            started = time.monotonic()
            while int(store.meta("norm").get("done", 0)) < 10:
                assert time.monotonic() - started < 45, (
                    f"the normal batch waits behind the high one: hi done {store.meta('hi').get('done')}")
                time.sleep(0.2)
            assert int(store.meta("hi").get("done", 0)) < 3000  # the high one was still running
        finally:
            for b in store.active_batches():
                store.set_state(b, BatchState.CANCELLED, "test over")
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
