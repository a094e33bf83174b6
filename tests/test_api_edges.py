"""Edges of batchrun's Python API (review15): what breaks its promises."""

from __future__ import annotations

import pytest

import batchrun
from batchrun.files.jobfile import JobFileError
from tests.helpers import on


def body(i: int) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 8}


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


def test_a_batchrun_config_that_is_not_a_file_is_refused_not_ignored(mock, tmp_path, monkeypatch):
    # Its [[endpoints]] (other keys, other limits) must not silently give way to the default endpoint.
    monkeypatch.setenv("BATCHRUN_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ValueError, match=r"BATCHRUN_CONFIG names .*nope.toml, which is not a file"):
        batchrun.run([body(1)], **on(mock))
    assert mock.stats()["requests"] == 0


def test_run_in_progress_still_imports_for_code_that_catches_it():
    # Runs no longer exclude each other (tests/test_api_runs.py); code written against the version
    # that refused a second run still imports the class.
    from batchrun.api.errors import BatchrunError, RunInProgress

    assert batchrun.RunInProgress is RunInProgress and issubclass(RunInProgress, BatchrunError)


def test_complete_refuses_a_bare_string_and_prompts_that_are_not_strings(mock):
    # complete("hi") iterated the string: two requests, "h" and "i", both paid. A prompt that is
    # not a string went to the server as the message's content.
    with pytest.raises(batchrun.RequestsError, match="a list of strings"):
        batchrun.complete("hi", model="gpt-4o-mini", **on(mock))
    with pytest.raises(batchrun.RequestsError, match="prompt 1 is of type int"):
        batchrun.complete(["a", 1], model="gpt-4o-mini", **on(mock))
    assert mock.stats()["log"] == []


@pytest.mark.parametrize("requests, words", [({"model": "gpt-4o-mini", "messages": []}, "a dict"),
                                             (None, "NoneType"), (42, "int")])
def test_requests_that_are_not_a_list_are_refused_with_a_sentence(mock, requests, words):
    # A single body (a dict) was iterated key by key ("request 0 is a str"); None and a number
    # raised a bare TypeError.
    with pytest.raises(batchrun.RequestsError, match=words) as exc:
        batchrun.run(requests, **on(mock))
    assert "list" in str(exc.value)
    assert mock.stats()["log"] == []


def test_an_interrupted_run_says_what_stopped_in_a_sentence_of_its_own(mock):
    # The exception's message took the not-run requests' reason ("was stopped before it"), whose
    # "it" is a request the message does not name.
    import _thread
    import threading
    import time

    mock.set_config(latency_ms=200)

    def interrupt_once_sending():
        deadline = time.monotonic() + 60
        while mock.stats()["requests"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_sending, daemon=True).start()
    with pytest.raises(batchrun.Interrupted) as caught:
        batchrun.run([body(i) for i in range(200)], **on(mock, concurrency=2))
    message = str(caught.value)
    assert "before it" not in message and "stopped with requests left" in message and "to continue" in message
    not_run = [r for r in caught.value.results if not r.ok]
    assert not_run and not_run[0].error.message == message


def test_a_base64_embedding_is_given_as_floats(mock):
    # encoding_format="base64" (OpenAI: the float32 vector's little-endian bytes, base64) came
    # back as embedding None on an ok result.
    line = {"url": "/v1/embeddings", "body": {"model": "text-embedding-3-small", "input": "x"}}
    plain, packed = batchrun.run([{**line, "custom_id": "f"},
                                  {**line, "custom_id": "b", "body": {**line["body"], "encoding_format": "base64"}}],
                                 **on(mock, cache=False))
    assert isinstance(packed.body["data"][0]["embedding"], str)
    assert packed.embedding == pytest.approx(plain.embedding, rel=1e-6)


def test_a_results_error_names_the_keyword_not_the_flag(mock):
    # A request larger than tpm= allows failed with "more than --tpm 100 allows": a flag the
    # library caller never typed.
    big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "word " * 500}], "max_tokens": 10}
    [result] = batchrun.run([big], tpm=100, **on(mock))
    assert result.error.code == "request_too_large"
    assert "--tpm" not in result.error.message and "tpm=100" in result.error.message
    assert mock.stats()["log"] == []


@pytest.mark.parametrize("content", [5, None, "text", {"text": "x"}])
def test_result_text_of_an_odd_responses_body_is_none_not_a_crash(content):
    # A server's message item whose content is not a list (tests/hostile.py serves such bodies):
    # Result.text raised TypeError ('int' object is not iterable).
    from batchrun.api.results import from_line

    line = {"custom_id": "a", "response": {"status_code": 200, "body": {
        "object": "response", "output": [{"type": "message", "content": content}]}}, "error": None}
    assert from_line(line).text is None


def test_a_misspelt_option_is_named_with_the_one_meant(mock):
    # It said "RunOptions.__init__() got an unexpected keyword argument", a class the caller never saw.
    with pytest.raises(TypeError, match=r"'concurency'; did you mean concurrency=\?") as exc:
        batchrun.run([body(0)], concurency=5, **on(mock))
    assert "RunOptions" not in str(exc.value)
    with pytest.raises(TypeError, match="did you mean max_cost="):
        batchrun.complete(["hi"], model="gpt-4o-mini", max_costs=1, **on(mock))
    assert mock.stats()["log"] == []
