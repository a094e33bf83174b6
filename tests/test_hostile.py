"""The hostile server fixture answers exactly as scripted (so tests built on it test batchrun, not it)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from batchrun.runner.sender import make_client, send
from batchrun.settings import WorkerSettings
from tests.hostile import HostileServer, Reply, chat_body, closed_port, ok, rate_limit_body, sse

BODY = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def _send(base_url: str, body: dict = BODY, timeout: float = 5.0):
    async def go():
        client = make_client(WorkerSettings(base_url=base_url, api_key="sk-test", request_timeout=timeout))
        try:
            return await send(client, "/v1/chat/completions", body)
        finally:
            await client.close()
    return asyncio.run(go())


def test_replies_in_turn_and_records_requests():
    with HostileServer([Reply(429, {"retry-after": "3"}, rate_limit_body("3s")), ok("second")]) as srv:
        with pytest.raises(openai.RateLimitError) as info:
            _send(srv.base_url)
        assert info.value.response.headers["retry-after"] == "3"
        assert _send(srv.base_url).body["choices"][0]["message"]["content"] == "second"
        assert _send(srv.base_url).body["choices"][0]["message"]["content"] == "second"  # the last repeats
        assert [r.path for r in srv.requests] == ["/v1/chat/completions"] * 3
        assert srv.requests[0].body == BODY
        assert srv.requests[0].headers["Authorization"] == "Bearer sk-test"


def test_a_dropped_connection_and_a_closed_port_are_connection_errors():
    with HostileServer([Reply(drop=True)]) as srv:
        with pytest.raises(openai.APIConnectionError):
            _send(srv.base_url)
    with pytest.raises(openai.APIConnectionError):
        _send(f"http://127.0.0.1:{closed_port()}/v1")


def test_streams_are_written_as_scripted():
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "delta": {"content": "hey"}, "finish_reason": "stop"}]}
    with HostileServer(lambda seen: Reply(events=sse(chunk, "[DONE]"))) as srv:
        answer = _send(srv.base_url, {**BODY, "stream": True})
        assert answer.status_code == 200
    assert chat_body()["usage"]["total_tokens"] == 12
