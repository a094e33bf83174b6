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


def test_a_second_run_beside_the_first_is_refused_and_the_first_ends_whole(mock):
    # Runs share the process's local workers, their stop flag and their settings (base URL, API
    # key): a stream closed early used to stop a run on another thread, which then hung. A second
    # run while one goes is refused with a sentence; the first ends with every request answered.
    from batchrun.api.errors import RunInProgress

    out: dict = {}

    def a():
        out["a"] = batchrun.run([body(1000 + i) for i in range(200)], **on(mock, concurrency=4))

    mock.set_config(latency_ms=20)
    ta = threading.Thread(target=a, daemon=True)
    ta.start()
    time.sleep(0.5)
    assert batchrun.RunInProgress is RunInProgress
    with pytest.raises(RunInProgress, match="another batchrun run is going on in this process"):
        next(batchrun.stream([body(2000 + i) for i in range(5)], **on(mock)))
    ta.join(60)
    assert not ta.is_alive(), "the first run hung"
    assert len(out["a"]) == 200 and all(r.ok for r in out["a"])
    assert len(batchrun.run([body(3000)], **on(mock))) == 1  # and the next run may go
