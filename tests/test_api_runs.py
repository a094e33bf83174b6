"""Several batchrun runs in one process at once (two threads, two asyncio tasks): each sends with
its own settings (base URL, API key) and has its own stop, so a Ctrl-C, a cancel or a closed
stream of one leaves the other to end whole."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest

import batchrun
from batchrun.mock import MockConfig, MockServerThread
from batchrun.mock.replies import reply_text, request_digest
from tests.helpers import assert_stopped_sending, on


def body(i: int, tag: str = "q") -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"{tag} {i}"}], "max_tokens": 8}


@pytest.fixture
def two_mocks():
    with MockServerThread(MockConfig(log_requests=True)) as a, MockServerThread(MockConfig(log_requests=True)) as b:
        yield a, b


def digests(server) -> Counter:
    return Counter(entry[1] for entry in server.stats()["log"])


def expected(bodies) -> Counter:
    return Counter(request_digest(b) for b in bodies)


def assert_whole(results, bodies) -> None:
    assert len(results) == len(bodies)
    for result, b in zip(results, bodies):
        assert result.ok, result.error
        assert result.text == reply_text("chat/completions", b)


def test_two_runs_on_two_threads_each_send_to_their_own_server_only(two_mocks):
    # Each run's shards are runners made as the run goes: run A's second shard starts after run B
    # began, and must still send to A's server (the process-wide worker settings of before were
    # B's by then).
    mock_a, mock_b = two_mocks
    mock_a.set_config(latency_ms=50)  # about 2 s a shard at concurrency 25
    mock_b.set_config(latency_ms=50)
    bodies_a = [body(i, "a") for i in range(2000)]  # two shards of 1,000
    bodies_b = [body(i, "b") for i in range(1000)]
    out: dict = {}
    errors: list = []

    def call(name, bodies, server):
        try:
            out[name] = batchrun.run(bodies, **on(server, concurrency=25))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ta = threading.Thread(target=call, args=("a", bodies_a, mock_a), daemon=True)
    tb = threading.Thread(target=call, args=("b", bodies_b, mock_b), daemon=True)
    ta.start()
    time.sleep(0.5)
    tb.start()
    ta.join(120)
    tb.join(120)
    assert not ta.is_alive() and not tb.is_alive(), "a run hung"
    assert not errors, errors
    assert_whole(out["a"], bodies_a)
    assert_whole(out["b"], bodies_b)
    assert digests(mock_a) == expected(bodies_a), "run A's requests were not each sent once to its own server"
    assert digests(mock_b) == expected(bodies_b), "run B's requests were not each sent once to its own server"


def test_a_runs_worker_leaves_another_runs_shard_to_that_run(two_mocks, monkeypatch):
    # Runs of one process share its in-process Redis and its one queue: a worker of run A that
    # dequeues run B's shard gives it back (due again at once) instead of sending it with A's
    # settings to A's server.
    import rq

    from batchrun.ops.submit import submit_requests
    from batchrun.runner import shard
    from batchrun.run_scope import RunScope, serve
    from batchrun.settings import WorkerSettings
    from batchrun.state import keys
    from batchrun.state.connections import connect
    from batchrun.state.store import BatchStore

    mock_a, _ = two_mocks
    redis = connect("memory://test-foreign-shard")
    store = BatchStore(redis)
    submit_requests(store, [body(i, "b") for i in range(3)], batch_id="run-b")
    scope = RunScope(WorkerSettings(api_key="sk-a", base_url=mock_a.base_url), batch_id="run-a")

    class Job:
        connection = redis

    got: list = []
    monkeypatch.setattr(rq, "get_current_job", lambda: Job)  # run_shard as RQ calls it
    thread = threading.Thread(target=serve(scope, lambda: got.append(shard.run_shard("run-b", 0))))
    thread.start()
    thread.join(30)
    assert got == [{}]
    assert mock_a.stats()["requests"] == 0, "run A's worker sent run B's jobs to A's server"
    assert store.counts("run-b")["done"] == 0
    due = redis.zscore(keys.PARKED, keys.parked_member("run-b", 0))
    seconds, micros = redis.time()
    now_ms = seconds * 1000 + micros / 1000
    # Due within a second or two, not after the 30 s a promoted shard whose runner never started waits.
    assert due is not None and due <= now_ms + 2000, "run B's shard was not given back to be run soon"


def test_cancelling_one_arun_task_leaves_the_other_to_end_whole(two_mocks):
    mock_a, mock_b = two_mocks
    mock_a.set_config(latency_ms=30)
    mock_b.set_config(latency_ms=30)
    bodies_a = [body(i, "a") for i in range(400)]
    bodies_b = [body(i, "b") for i in range(300)]

    async def sending(server) -> None:  # not a fixed wait: on a loaded machine a submit can take seconds
        deadline = time.monotonic() + 60
        while server.stats()["requests"] < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def main():
        a = asyncio.ensure_future(batchrun.arun(bodies_a, **on(mock_a, concurrency=4)))
        await sending(mock_a)
        b = asyncio.ensure_future(batchrun.arun(bodies_b, **on(mock_b, concurrency=10)))
        await sending(mock_b)  # both runs under way
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        return await b

    results_b = asyncio.run(main())
    assert_whole(results_b, bodies_b)
    sent_a = mock_a.stats()["requests"]
    assert 0 < sent_a < len(bodies_a), "run A was not stopped by its cancel"
    assert digests(mock_b) == expected(bodies_b)


def test_a_stream_closed_early_stops_its_own_run_only(two_mocks):
    # Closing a stream stops its run as Ctrl-C does; a run on another thread goes on to its end.
    mock_a, mock_b = two_mocks
    mock_a.set_config(latency_ms=20)
    mock_b.set_config(latency_ms=20)
    bodies_b = [body(i, "b") for i in range(200)]
    out: dict = {}

    def b():
        out["b"] = batchrun.run(bodies_b, **on(mock_b, concurrency=4))

    tb = threading.Thread(target=b, daemon=True)
    tb.start()
    stream = batchrun.stream([body(i, "a") for i in range(500)], **on(mock_a, concurrency=4))
    first = next(stream)
    assert first.ok
    stream.close()
    sent_a = mock_a.stats()["requests"]
    assert sent_a < 500
    tb.join(120)
    assert not tb.is_alive(), "run B hung after run A's stream was closed"
    assert_whole(out["b"], bodies_b)
    time.sleep(0.5)
    assert mock_a.stats()["requests"] == sent_a, "run A went on sending after its stream was closed"


def test_a_worker_process_still_stops_on_the_process_flag():
    # `batchrun worker` and RQ's work horses: SIGTERM sets the process's flag (shard.STOP), which
    # every runner without a run's own scope obeys.
    from batchrun.runner import shard
    from batchrun.run_scope import PROCESS_STOP, RunScope, current_scope, serve
    from batchrun.settings import WorkerSettings

    assert shard.STOP is PROCESS_STOP
    assert current_scope().stop is PROCESS_STOP and current_scope().serves("any-batch")
    scope = RunScope(WorkerSettings(api_key="sk-a", base_url="http://a.invalid/v1"), batch_id="mine")
    seen: list = []
    thread = threading.Thread(target=serve(scope, lambda: seen.append(current_scope())))
    thread.start()
    thread.join()
    assert seen == [scope] and seen[0].stop is not PROCESS_STOP
    assert seen[0].serves("mine") and not seen[0].serves("another")
    assert current_scope().stop is PROCESS_STOP  # this thread keeps the process's


def test_cancelling_a_task_iterating_astream_stops_its_run_and_raises_cancelled(two_mocks):
    # The task is cancelled while astream waits on its thread for the next result: closing the
    # stream's generator then (while that thread is inside it) raised "ValueError: generator
    # already executing" in place of CancelledError, and left the run sending to its end.
    mock_a, _ = two_mocks
    mock_a.set_config(latency_ms=500)  # the thread waits long for each next result: the cancel lands then
    got: list = []

    async def consume():
        async for result in batchrun.astream([body(i, "a") for i in range(300)], **on(mock_a, concurrency=2)):
            got.append(result)

    async def main():
        task = asyncio.ensure_future(consume())
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert_stopped_sending(mock_a, 300, 1.5)
