"""Edges of batchrun's Python API (review15): what breaks its promises."""

from __future__ import annotations

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


def test_run_in_progress_still_imports_for_code_that_catches_it():
    # Runs no longer exclude each other (tests/test_api_runs.py); code written against the version
    # that refused a second run still imports the class.
    from batchrun.api.errors import BatchrunError, RunInProgress

    assert batchrun.RunInProgress is RunInProgress and issubclass(RunInProgress, BatchrunError)
