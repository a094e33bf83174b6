"""The mock's Batch API (mock/batches.py) through the official SDK: files, the statuses a batch
goes through, its output and error files, cancel, list pages, the enqueued-token limit."""

from __future__ import annotations

import json
import time

import openai
import pytest

from batchrun.mock import MockServerThread, reply_text


def _lines(n: int, model: str = "gpt-4o-mini") -> bytes:
    return "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": model, "max_tokens": 5,
                                        "messages": [{"role": "user", "content": f"hi {i}"}]}}) + "\n"
                   for i in range(n)).encode()


@pytest.fixture
def sdk():
    with MockServerThread(batch_seconds=1.0) as srv:
        yield srv, openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)


def _wait(client, batch_id, statuses, timeout=20.0):
    deadline = time.monotonic() + timeout
    while (b := client.batches.retrieve(batch_id)).status not in statuses:
        assert time.monotonic() < deadline, f"still {b.status}"
        time.sleep(0.05)
    return b


def test_a_batch_goes_validating_in_progress_completed_with_the_live_answers(sdk):
    srv, client = sdk
    f = client.files.create(file=("in.jsonl", _lines(10)), purpose="batch")
    assert client.files.retrieve(f.id).bytes == len(_lines(10))
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"k": "v"})
    assert b.status == "validating" and b.metadata == {"k": "v"}
    seen = {_wait(client, b.id, ("in_progress", "finalizing", "completed")).status}
    done = _wait(client, b.id, ("completed",))
    assert seen <= {"in_progress", "finalizing", "completed"}
    assert (done.request_counts.total, done.request_counts.completed, done.error_file_id) == (10, 10, None)
    lines = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [x["custom_id"] for x in lines] == [f"r{i}" for i in range(10)]
    body = json.loads(_lines(10).splitlines()[3])["body"]
    assert lines[3]["response"]["body"]["choices"][0]["message"]["content"] == reply_text("chat/completions", body)


def test_expired_batches_return_the_rest_in_the_error_file(sdk):
    srv, client = sdk
    srv.set_config(batch_expire_fraction=0.3, batch_seconds=0.3)
    f = client.files.create(file=("in.jsonl", _lines(10)), purpose="batch")
    b = _wait(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h").id, ("expired",))
    errors = [json.loads(x) for x in client.files.content(b.error_file_id).text.splitlines()]
    assert len(errors) == 7 and {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert b.request_counts.completed == 3


def test_cancel_then_list_newest_first_with_pages(sdk):
    srv, client = sdk
    srv.set_config(batch_seconds=60)
    f = client.files.create(file=("in.jsonl", _lines(3)), purpose="batch")
    ids = [client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
           for _ in range(3)]
    assert client.batches.cancel(ids[0]).status == "cancelling"
    assert _wait(client, ids[0], ("cancelled",)).status == "cancelled"
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[:0:-1] and page.has_more
    assert [b.id for b in client.batches.list(limit=2, after=ids[1]).data] == [ids[0]]
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(ids[0])


def test_the_enqueued_token_limit_fails_the_batch_in_validation(sdk):
    srv, client = sdk
    srv.set_config(batch_queue_tokens=40, batch_seconds=5)  # a file of 5 counts 30
    f = client.files.create(file=("in.jsonl", _lines(5)), purpose="batch")
    first = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    second = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    failed = _wait(client, second.id, ("failed",))
    assert failed.errors.data[0].code == "token_limit_exceeded"
    assert "Enqueued token limit reached" in failed.errors.data[0].message
    assert client.batches.retrieve(first.id).status in ("validating", "in_progress")


@pytest.mark.parametrize("call, error", [
    (lambda c: c.files.create(file=("x", b"{}"), purpose="nothing"), openai.BadRequestError),
    (lambda c: c.batches.retrieve("batch_nope"), openai.NotFoundError),
    (lambda c: c.files.content("file-nope"), openai.NotFoundError),
    (lambda c: c.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                completion_window="24h"), openai.BadRequestError),
])
def test_bad_calls_get_openais_errors(sdk, call, error):
    with pytest.raises(error):
        call(sdk[1])


def test_a_file_of_two_models_fails_in_validation(sdk):
    srv, client = sdk
    srv.set_config(batch_seconds=0.2)
    f = client.files.create(file=("in.jsonl", _lines(2) + _lines(2, "gpt-4o")), purpose="batch")
    b = _wait(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h").id, ("failed",))
    assert b.errors.data[0].code == "mismatched_model"


def test_the_mock_server_command_takes_the_batch_options(spawn):
    from tests.helpers import batchrun_cmd, cli_env, spare_port

    port = spare_port()
    spawn(batchrun_cmd("mock-server", "--port", str(port), "--batch-seconds", "0.2",
                       "--batch-expire-fraction", "0.5"), env=cli_env())
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0)
    deadline = time.monotonic() + 30
    while True:
        try:
            f = client.files.create(file=("in.jsonl", _lines(4)), purpose="batch")
            break
        except openai.APIConnectionError:
            assert time.monotonic() < deadline, "the mock server did not start"
            time.sleep(0.2)
    b = _wait(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h").id, ("expired",))
    assert (b.request_counts.completed, b.request_counts.failed) == (2, 2)
