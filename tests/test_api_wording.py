"""What batchrun's Python API says and sends, in Python's terms: refusals name the keyword to fix
(never a command-line flag), a missing path is a batchrun error naming it, complete() keeps
max_tokens=0, and /v1/responses works against the mock server, plain and streamed."""

from __future__ import annotations

import openai
import pytest

import batchrun
from batchrun.api.errors import ApiKeyMissing, RequestsError
from batchrun.files.jobfile import JobFileError
from batchrun.files.outputs import OutputFileError
from batchrun.mock import MockConfig, MockServerThread
from batchrun.mock.replies import reply_text, request_digest
from tests.helpers import on

FLAGS = ("--max-cost", "--batch-id", "--prices", "--rpm", "--tpm", "--max-attempts", "--concurrency", "--grace",
         "--skip-invalid", "--mock", "-o ", "--errors", "batchrun ")


def body(i: int, max_tokens: int = 16) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"w{i}"}], "max_tokens": max_tokens}


def assert_in_python(message: str, *keywords: str) -> None:
    for keyword in keywords:
        assert keyword in message, message
    for flag in FLAGS:
        assert flag not in message, f"{flag!r} in {message!r}"


@pytest.mark.parametrize("options, keyword", [
    ({"max_attempts": 0}, "max_attempts="),
    ({"max_cost": -1}, "max_cost="),
    ({"tpm": "lots"}, "tpm="),
    ({"rpm": {"gpt-4o-mini": 0}}, "rpm="),
    ({"concurrency": 0}, "concurrency="),
    ({"grace": -5}, "grace="),
])
def test_a_bad_option_is_refused_naming_its_keyword(mock, options, keyword):
    with pytest.raises(ValueError) as exc:  # OptionsError, a ValueError, for most
        batchrun.run([body(0)], **on(mock, **options))
    assert_in_python(str(exc.value), keyword)
    assert mock.stats()["log"] == []


def test_a_cap_without_a_price_says_max_cost_and_prices_in_python(mock):
    with pytest.raises(ValueError) as exc:
        batchrun.run([{**body(0), "model": "my-own-model"}], **on(mock, max_cost=1.0))
    assert_in_python(str(exc.value), "'my-own-model'", "max_cost=", "prices=PATH", "request 0")
    assert mock.stats()["log"] == []


def test_a_limit_for_a_model_no_request_uses_names_the_keyword(mock):
    with pytest.raises(ValueError) as exc:
        batchrun.run([body(0)], **on(mock, tpm={"gpt4o-mini": 10_000}))
    assert_in_python(str(exc.value), "'gpt4o-mini'", "rpm=/tpm= {MODEL: N}")


def test_continuing_a_batch_paused_at_its_cap_with_the_same_cap_says_max_cost(mock, real_redis_url):
    mock.set_config(latency_ms=20)
    bodies = [body(i, max_tokens=200) for i in range(60)]
    options = on(mock, redis_url=real_redis_url, batch_id="api-wording-cap", concurrency=2, max_cost=0.0005)
    first = batchrun.run(bodies, **options)
    assert any(not r.ok for r in first)
    with pytest.raises(ValueError) as exc:
        batchrun.run(bodies, **options)
    assert_in_python(str(exc.value), "batch api-wording-cap is paused at its spending cap", "max_cost=")


def test_a_cancelled_batch_id_says_to_call_with_another_batch_id(mock, real_redis_url):
    from batchrun.state.connections import connect
    from batchrun.state.states import BatchState
    from batchrun.state.store import BatchStore

    options = on(mock, redis_url=real_redis_url, batch_id="api-wording-cancelled")
    batchrun.run([body(0)], **options)
    BatchStore(connect(real_redis_url)).set_state("api-wording-cancelled", BatchState.CANCELLED)
    with pytest.raises(ValueError) as exc:
        batchrun.run([body(1)], **options)
    assert_in_python(str(exc.value), "was cancelled", "another batch_id=")


def test_no_api_key_says_api_key_in_python(mock, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ApiKeyMissing) as exc:
        batchrun.run([body(0)], base_url=mock.base_url, progress=False)
    assert_in_python(str(exc.value), "api_key=", "OPENAI_API_KEY")


def test_output_files_that_clash_are_named_by_their_keywords(mock, tmp_path):
    same = str(tmp_path / "out.jsonl")
    with pytest.raises(OutputFileError) as exc:
        batchrun.run([body(0)], **on(mock, output=same, errors=same))
    assert_in_python(str(exc.value), f"errors= {same} is also output= {same}")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(OutputFileError) as exc:
        batchrun.run(jobs, **on(mock, output=str(jobs)))
    assert_in_python(str(exc.value), f"output= {jobs} is the jobs file itself")
    assert mock.stats()["log"] == []


def test_an_invalid_line_of_a_path_says_skip_invalid_in_python(mock, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"custom_id": "a", "body": {"model": "gpt-4o-mini", "messages": []}}\nnot json\n')
    with pytest.raises(JobFileError) as exc:
        batchrun.run(jobs, **on(mock))
    assert_in_python(str(exc.value).splitlines()[0], "skip_invalid=True")


def test_a_missing_path_is_a_batchrun_error_naming_it(mock, tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(RequestsError, match="nowhere.jsonl: no such file") as exc:
        batchrun.run(missing, **on(mock))
    assert isinstance(exc.value, batchrun.BatchrunError) and not isinstance(exc.value, FileNotFoundError)
    with pytest.raises(RequestsError, match="is a folder"):
        batchrun.run(tmp_path, **on(mock))
    with pytest.raises(RequestsError, match="nowhere.jsonl: no such file"):
        batchrun.run(str(missing), **on(mock))
    assert mock.stats()["log"] == []


def test_complete_keeps_max_tokens_0_and_so_refuses_it(mock):
    # 0 is not None: dropped, the request went out with no cap on its answer (paid in full); kept,
    # the request is checked as any is, and refused with a sentence before anything is sent.
    with pytest.raises(JobFileError, match="request 0: max_tokens must be a whole number of at least 1, not 0"):
        batchrun.complete(["hello"], model="gpt-4o-mini", max_tokens=0, **on(mock))
    assert mock.stats()["log"] == []
    assert batchrun.complete(["hello"], model="gpt-4o-mini", max_tokens=5, **on(mock))[0]
    expected = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
    assert {entry[1] for entry in mock.stats()["log"]} == {request_digest(expected)}


RESPONSES = [
    {"model": "gpt-4o-mini", "input": "one", "max_output_tokens": 16},
    {"model": "gpt-4o-mini", "instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "two"}]}]},
    {"model": "gpt-4o-mini", "input": "three", "stream": True},
    {"model": "gpt-4o-mini", "input": [{"role": "user", "content": "four"}], "stream": True, "max_output_tokens": 16},
]


def test_responses_plain_and_streamed_give_their_text(mock):
    results = batchrun.run(RESPONSES, **on(mock, endpoint="/v1/responses"))
    for request, result in zip(RESPONSES, results):
        assert result.ok, result.error
        assert result.text == reply_text("responses", request)
        assert result.body["object"] == "response" and result.body["status"] in ("completed", "incomplete")
        assert result.usage["output_tokens"] > 0 and result.cost_usd > 0
    capped = results[0]  # 16 tokens asked, 8 to 16 answered: incomplete only when it filled them
    assert (capped.body["status"] == "incomplete") == (capped.usage["output_tokens"] == 16)


def test_the_mock_responses_endpoint_is_what_the_openai_sdk_reads():
    with MockServerThread(MockConfig()) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-mock", max_retries=0)
        plain = client.responses.create(model="gpt-4o-mini", input="hello", max_output_tokens=32)
        assert plain.output_text == reply_text("responses", {"input": "hello", "max_output_tokens": 32,
                                                             "model": "gpt-4o-mini"})
        assert plain.status in ("completed", "incomplete") and plain.usage.output_tokens > 0
        kinds = []
        with client.responses.stream(model="gpt-4o-mini", input="hello", max_output_tokens=32) as stream:
            for event in stream:
                kinds.append(event.type)
            final = stream.get_final_response()
        assert final.output_text == plain.output_text
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] in ("response.completed", "response.incomplete") and "response.output_text.delta" in kinds
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model="gpt-4o-mini", input="hello", max_output_tokens=4)


def test_a_responses_stream_cut_short_is_not_an_answer(mock):
    mock.set_config(error_rates={"stream_truncate": 1.0})
    [result] = batchrun.run([RESPONSES[2]], **on(mock, endpoint="/v1/responses", max_attempts=1))
    assert not result.ok and result.text is None
    mock.set_config(error_rates={"stream_error": 1.0})
    [result] = batchrun.run([RESPONSES[2]], **on(mock, endpoint="/v1/responses", max_attempts=1))
    assert not result.ok and result.text is None


def test_a_batch_id_given_other_requests_is_refused_not_answered_with_the_old_ones(mock, real_redis_url):
    # The same custom_ids (0..4) with other prompts: the answers the batch holds belong to the first
    # prompts, so handing them back would be wrong answers; sending nothing new would hide it.
    options = on(mock, redis_url=real_redis_url, batch_id="api-wording-other-requests")
    first = batchrun.run([body(i) for i in range(5)], **options)
    assert all(r.ok for r in first)
    with pytest.raises(ValueError) as exc:
        batchrun.run([body(i + 100) for i in range(5)], **options)
    assert "was made from other requests than these" in str(exc.value)
    again = batchrun.run([body(i) for i in range(5)], **options)  # the same requests continue the batch
    assert [r.text for r in again] == [r.text for r in first]
    sent = [entry[1] for entry in mock.stats()["log"]]
    assert sorted(sent) == sorted(request_digest(body(i)) for i in range(5))  # each first prompt once, no other
