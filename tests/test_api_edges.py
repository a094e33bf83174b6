"""Edges of batchrun's Python API (review15): what breaks its promises."""

from __future__ import annotations

import threading
import time

import pytest

import batchrun
from batchrun.files.jobfile import JobFileError
from batchrun.mock import MockConfig, MockServerThread


def body(i: int) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 8}


@pytest.fixture
def mock():
    with MockServerThread(MockConfig(log_requests=True)) as server:
        yield server


def on(server, **options) -> dict:
    return {"base_url": server.base_url, "api_key": "sk-mock", "progress": False, **options}


def test_a_refused_list_names_the_request_not_a_deleted_temporary_file(mock):
    # The refusal must name the item in the caller's terms (request 1), not a line of the
    # temporary requests.jsonl (deleted once run() returns) nor the CLI's --skip-invalid flag.
    with pytest.raises(JobFileError) as exc:
        batchrun.run([{"custom_id": "a", "body": body(0)}, {"custom_id": "a", "body": body(1)}], **on(mock))
    message = str(exc.value)
    assert "duplicate custom_id 'a'" in message
    assert "request 1" in message
    assert "requests.jsonl" not in message and "--skip-invalid" not in message
    assert mock.stats()["log"] == []  # nothing was sent


def test_two_runs_on_two_threads_one_stopped_early_both_end(mock):
    # A stream closed early stops its run by setting the process-wide shard.STOP, which the
    # other thread's run also obeys (and start_threads clears it for everyone): the other
    # run must still end, with every request answered.
    out: dict = {}

    def a():
        out["a"] = batchrun.run([body(1000 + i) for i in range(200)], **on(mock, concurrency=4))

    def b():
        results = batchrun.stream([body(2000 + i) for i in range(200)], **on(mock, concurrency=4))
        next(results)
        results.close()

    mock.set_config(latency_ms=50)
    ta = threading.Thread(target=a, daemon=True)
    ta.start()
    time.sleep(0.5)
    tb = threading.Thread(target=b, daemon=True)
    tb.start()
    tb.join(60)
    ta.join(60)
    assert not tb.is_alive() and not ta.is_alive(), "a run hung"
    assert all(r.ok for r in out["a"])
