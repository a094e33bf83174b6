"""The mock server's fault injection (batchrun/mock/faults.py, and streaming.py's broken streams)."""

from __future__ import annotations

import re

import openai
import pytest

from batchrun.mock import MockServerThread, reply_text
from tests.test_mock_server import HI


@pytest.fixture
def srv():
    with MockServerThread(seed=1) as server:
        yield server


@pytest.fixture
def client(srv):
    with openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0) as c:
        yield c


# --- faults ---------------------------------------------------------------------------------------


def test_http_faults_switched_at_run_time(srv, client):
    srv.set_config(error_rates={"500": 1.0})
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert info.value.status_code == 500
    assert info.value.body == {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    srv.set_config(error_rates={"503": 1.0})
    with pytest.raises(openai.InternalServerError) as info:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert info.value.status_code == 503 and info.value.body["message"].startswith("The engine is currently overloaded")
    srv.set_config(error_rates={"insufficient_quota": 1.0})
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert info.value.body == {
        "message": "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
    srv.set_config(error_rates={"429": 1.0})
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert info.value.code == "rate_limit_exceeded"
    assert 20 <= int(re.search(r"Please try again in (\d+)ms\.", info.value.message)[1]) <= 500
    srv.set_config(error_rates={"stream_disconnect": 1.0})  # stream faults spare plain requests
    client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    srv.set_config(error_rates={})
    client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    stats = srv.stats()
    assert stats["by_status"] == {"200": 2, "429": 2, "500": 1, "503": 1}
    assert stats["faults"] == {
        "500": 1,
        "503": 1,
        "429": 1,
        "insufficient_quota": 1,
        "stream_disconnect": 0,
        "stream_truncate": 0,
        "stream_error": 0,
    }


def test_fault_rates_are_random_but_seeded():
    def run():
        with MockServerThread(seed=7, error_rates={"500": 0.3}) as srv, openai.OpenAI(
            base_url=srv.base_url, api_key="sk", max_retries=0
        ) as client:
            outcomes = []
            for _ in range(40):
                try:
                    client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2)
                    outcomes.append(200)
                except openai.InternalServerError:
                    outcomes.append(500)
            return outcomes

    first = run()
    assert 4 <= first.count(500) <= 24
    assert run() == first


def stream_pieces(client, fault: str, srv: MockServerThread) -> tuple[list, Exception | None]:
    srv.set_config(error_rates={fault: 1.0})
    chunks: list = []
    try:
        for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=40, stream=True):
            chunks.append(chunk)
    except Exception as exc:  # noqa: BLE001 - the test inspects what was raised
        return chunks, exc
    return chunks, None


def test_stream_disconnect_raises_during_iteration(srv, client):
    chunks, exc = stream_pieces(client, "stream_disconnect", srv)
    assert isinstance(exc, openai.APIConnectionError)
    assert len(chunks) > 2  # some content came first
    assert not any(c.choices[0].finish_reason for c in chunks)


def test_stream_truncate_ends_without_finish_reason(srv, client):
    chunks, exc = stream_pieces(client, "stream_truncate", srv)
    assert exc is None and len(chunks) > 2
    assert not any(c.choices and c.choices[0].finish_reason for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    full = reply_text("chat/completions", {"model": "gpt-4o-mini", "messages": HI, "max_tokens": 40})
    assert full.startswith(text) and text != full


def test_stream_error_event_raises_api_error(srv, client):
    chunks, exc = stream_pieces(client, "stream_error", srv)
    assert type(exc) is openai.APIError
    assert exc.message.startswith("The server had an error") and exc.type == "server_error"
    assert len(chunks) > 2
    assert srv.stats()["faults"]["stream_error"] == 1
