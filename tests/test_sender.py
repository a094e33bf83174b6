"""The lean HTTP path of batchrun.runner.sender: the same requests, answers and exceptions as the SDK's own path.

Against the real mock server over real sockets (openai v3's HTTP stack cannot be patched).
"""

from __future__ import annotations

import asyncio
import json
import socket

import httpx2
import openai
import pytest
from openai import AsyncOpenAI
from openai._models import FinalRequestOptions

from batchrun.policy.classify import classify_exception
from batchrun.mock import MockConfig, MockServerThread, reply_text
from batchrun.runner.sender import LeanAsyncOpenAI, StreamTruncated, make_client, send
from batchrun.settings import WorkerSettings

BODY = {"model": "gpt-4o-mini", "max_tokens": 12, "messages": [{"role": "user", "content": "Hello there"}]}


@pytest.fixture(scope="module")
def mock():
    with MockServerThread(MockConfig(seed=1)) as srv:
        yield srv


def run(coro):
    return asyncio.run(coro)


async def _with_client(base_url: str, fn, **settings):
    client = make_client(WorkerSettings(base_url=base_url, api_key="sk-test", **settings))
    try:
        return await fn(client)
    finally:
        await client.close()


def test_build_request_matches_the_sdk():
    """Every request after the first reuses the template: same URL, headers (and order), timeouts, body."""
    lean = LeanAsyncOpenAI(api_key="sk-x", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout=33.0)
    sdk = AsyncOpenAI(api_key="sk-x", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout=33.0)
    for i in range(3):
        body = {**BODY, "messages": [{"role": "user", "content": f"number {i} ü"}]}
        a = lean._build_request(FinalRequestOptions.construct(method="post", url="/chat/completions", json_data=body))
        b = sdk._build_request(FinalRequestOptions.construct(method="post", url="/chat/completions", json_data=body))
        assert a.method == b.method and a.url == b.url
        assert a.headers.raw == b.headers.raw
        assert a.extensions == b.extensions
        assert a.read() == b.read()
    # Per-request headers or query parameters take the SDK's own path.
    opts = FinalRequestOptions.construct(method="post", url="/chat/completions", json_data=BODY,
                                         headers={"X-Extra": "1"}, params={"q": "1"})
    a, b = lean._build_request(opts), sdk._build_request(opts)
    assert a.headers.raw == b.headers.raw and a.url == b.url
    assert a.headers["x-extra"] == "1" and a.url.params["q"] == "1"
    # A new API key is not sent with the old key's headers.
    lean.api_key = "sk-other"
    a = lean._build_request(FinalRequestOptions.construct(method="post", url="/chat/completions", json_data=BODY))
    assert a.headers["authorization"] == "Bearer sk-other"


def test_plain_answer(mock):
    async def go(client):
        return [await send(client, "/v1/chat/completions", BODY) for _ in range(3)]

    answers = run(_with_client(mock.base_url, go))
    for answer in answers:
        assert answer.status_code == 200
        assert answer.request_id.startswith("req_")
        assert answer.headers["x-request-id"] == answer.request_id
        assert answer.body["choices"][0]["message"]["content"] == reply_text("chat/completions", BODY)
        assert answer.body["usage"]["completion_tokens"] > 0


def test_streamed_answer(mock):
    body = {**BODY, "stream": True}

    async def go(client):
        return await send(client, "/v1/chat/completions", body)

    answer = run(_with_client(mock.base_url, go))
    assert answer.body["object"] == "chat.completion"
    assert answer.body["choices"][0]["message"]["content"] == reply_text("chat/completions", body)
    assert answer.body["usage"]["completion_tokens"] > 0


def test_embeddings_and_completions(mock):
    async def go(client):
        e = await send(client, "/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"]})
        c = await send(client, "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi",
                                                   "max_tokens": 5})
        return e, c

    e, c = run(_with_client(mock.base_url, go))
    assert len(e.body["data"]) == 2
    assert c.body["choices"][0]["text"] == reply_text("completions", {"model": "gpt-3.5-turbo-instruct",
                                                                      "prompt": "hi", "max_tokens": 5})


@pytest.mark.parametrize("fault, status, cls", [
    ("500", 500, openai.InternalServerError),
    ("429", 429, openai.RateLimitError),
    ("insufficient_quota", 429, openai.RateLimitError),
])
def test_http_errors_are_the_sdk_status_errors(fault, status, cls):
    with MockServerThread(MockConfig(error_rates={fault: 1.0}, rpm=1000)) as srv:
        async def go(client):
            with pytest.raises(cls) as info:
                await send(client, "/v1/chat/completions", BODY)
            return info.value

        exc = run(_with_client(srv.base_url, go))
    assert isinstance(exc, openai.APIStatusError)
    assert exc.status_code == status
    assert exc.response.headers["x-ratelimit-limit-requests"] == "1000"
    assert isinstance(exc.body, dict) and exc.body.get("message")
    assert classify_exception(exc, now=0).kind  # classified, never "unexpected"


def test_bad_request_is_a_400(mock):
    async def go(client):
        with pytest.raises(openai.BadRequestError) as info:
            await send(client, "/v1/chat/completions", {"model": "gpt-4o-mini"})
        return info.value

    exc = run(_with_client(mock.base_url, go))
    assert exc.status_code == 400 and "messages" in exc.body["message"]


def test_connection_refused_is_an_api_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def go(client):
        with pytest.raises(openai.APIConnectionError) as info:
            await send(client, "/v1/chat/completions", BODY)
        return info.value

    exc = run(_with_client(f"http://127.0.0.1:{port}/v1", go))
    assert not isinstance(exc, openai.APITimeoutError)
    assert classify_exception(exc, now=0).kind == "connection"


def test_timeout_is_an_api_timeout_error():
    with MockServerThread(MockConfig(latency_ms=2000)) as srv:
        async def go(client):
            with pytest.raises(openai.APITimeoutError):
                await send(client, "/v1/chat/completions", BODY)

        run(_with_client(srv.base_url, go, request_timeout=0.3))


def test_broken_streams():
    with MockServerThread(MockConfig(error_rates={"stream_disconnect": 1.0})) as srv:
        async def go(client):
            with pytest.raises(Exception) as info:
                await send(client, "/v1/chat/completions", {**BODY, "stream": True})
            return info.value

        exc = run(_with_client(srv.base_url, go))
    assert isinstance(exc, (StreamTruncated, httpx2.TransportError, openai.APIError)), repr(exc)
    assert classify_exception(exc, now=0).action.name == "RETRY" or isinstance(exc, StreamTruncated)

    with MockServerThread(MockConfig(error_rates={"stream_truncate": 1.0})) as srv:
        async def go2(client):
            with pytest.raises(StreamTruncated):
                await send(client, "/v1/chat/completions", {**BODY, "stream": True})

        run(_with_client(srv.base_url, go2))


def test_many_in_flight(mock):
    async def go(client):
        bodies = [{**BODY, "messages": [{"role": "user", "content": f"q{i}"}]} for i in range(300)]
        answers = await asyncio.gather(*(send(client, "/v1/chat/completions", b) for b in bodies))
        return bodies, answers

    bodies, answers = run(_with_client(mock.base_url, go))
    for body, answer in zip(bodies, answers):
        assert answer.body["choices"][0]["message"]["content"] == reply_text("chat/completions", body)
    assert json.dumps(answers[0].body)


def test_idempotency_keys_are_random_uuids():
    import uuid

    lean = LeanAsyncOpenAI(api_key="sk-x", base_url="http://127.0.0.1:9/v1", max_retries=0)
    keys = {lean._idempotency_key() for _ in range(600)}
    assert len(keys) == 600
    for key in list(keys)[:20]:
        assert key.startswith("stainless-python-retry-")
        u = uuid.UUID(key.removeprefix("stainless-python-retry-"))
        assert u.version == 4 and str(u) == key.removeprefix("stainless-python-retry-")


def test_a_server_that_never_reads_the_body_times_out_instead_of_hanging():
    """aiohttp has no write timeout of its own: a big body to a server that stops reading must
    still end in the SDK's timeout error, not hang the job forever."""
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    port = listener.getsockname()[1]

    async def go():
        client = make_client(WorkerSettings(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-x",
                                            request_timeout=1.0))
        big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 8_000_000}]}
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            with pytest.raises(openai.APITimeoutError):
                await send(client, "/v1/chat/completions", big)
            return loop.time() - started
        finally:
            await client.close()

    try:
        assert asyncio.run(asyncio.wait_for(go(), 30)) < 10
    finally:
        for conn, _ in accepted:
            conn.close()
        listener.close()


# --- endings against the hostile server (tests/test_endings.py runs them through a runner) -------

from tests.hostile import HostileServer, Reply, chat_body, error_body, ok, sse  # noqa: E402


def _send_to(base_url: str, url: str, bodies: list[dict]):
    async def go(client):
        out = []
        for body in bodies:
            try:
                out.append(await send(client, url, body))
            except Exception as exc:  # noqa: BLE001 - what send raises is the point
                out.append(exc)
        return out
    return run(_with_client(base_url, go, request_timeout=5.0))


CHUNKS = sse({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
              "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]}, "[DONE]")


def test_a_422_naming_stream_options_is_resent_without_them_and_remembered(caplog):
    """A FastAPI-style server refuses unknown fields with a 422 whose detail names the field."""
    def script(seen):
        if "stream_options" in seen.body:
            return Reply(422, {}, {"detail": [{"loc": ["body", "stream_options"], "msg": "extra fields not permitted",
                                               "type": "value_error.extra"}]})
        return Reply(events=CHUNKS)

    caplog.set_level("WARNING", logger="batchrun.worker")
    body = {**BODY, "stream": True}
    with HostileServer(script) as srv:
        answers = _send_to(srv.base_url, "/v1/chat/completions", [body, body])
        seen = list(srv.requests)
    assert [a.body["choices"][0]["message"]["content"] for a in answers] == ["Hi", "Hi"]
    assert len(seen) == 3 and "stream_options" in seen[0].body
    assert all("stream_options" not in s.body for s in seen[1:])
    assert answers[0].body["usage"] is None  # the stream carried none
    warnings = [r.getMessage() for r in caplog.records if "refused stream_options" in r.getMessage()]
    assert warnings == [f"{srv.base_url}/chat/completions refused stream_options; streamed requests there go "
                        "without it, so their usage is what the stream carries, if any (else each answer counts "
                        "at its worst case)"]


def test_a_400_about_something_else_is_raised_as_it_is():
    reply = Reply(400, {}, error_body("Invalid value for 'stream_mode'.", "invalid_request_error", None, "messages"))
    with HostileServer([reply]) as srv:
        [exc] = _send_to(srv.base_url, "/v1/chat/completions", [{**BODY, "stream": True}])
        assert isinstance(exc, openai.BadRequestError) and len(srv.requests) == 1


def test_a_failed_response_stream_raises_stream_failed_with_its_error_and_frees_the_connection():
    from batchrun.runner.sender import StreamFailed

    error = {"code": "server_error", "message": "The server had an error."}
    failed = sse({"type": "response.created", "response": {"status": "in_progress"}},
                 {"type": "response.failed", "response": {"status": "failed", "error": error}},
                 event_names=["response.created", "response.failed"])
    done = sse({"type": "response.completed", "response": {"status": "completed", "output": []}},
               event_names=["response.completed"])
    body = {"model": "gpt-4o-mini", "input": "hi", "stream": True}
    with HostileServer([Reply(events=failed), Reply(events=done)]) as srv:
        first, second = _send_to(srv.base_url, "/v1/responses", [body, body])
    assert isinstance(first, StreamFailed) and first.error == error
    assert "stream_options" not in srv.requests[0].body  # never added to the Responses API
    assert second.body == {"status": "completed", "output": []}


def test_a_plain_answer_that_is_not_json_comes_back_as_its_text():
    with HostileServer([Reply(200, {"content-type": "text/html"}, "<html>" + "x" * 20_000 + "</html>")]) as srv:
        [answer] = _send_to(srv.base_url, "/v1/chat/completions", [BODY])
    assert answer.status_code == 200 and isinstance(answer.body, str)
    assert answer.body.startswith("<html>xxx") and len(answer.body) == 10_000  # bounded


# --- the request timeout bounds the whole request; SSE events without data; a base URL's query ---


def _chunk(content=None, finish=None) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]}


def _timed(base_url: str, body: dict, request_timeout: float):
    async def go(client):
        started = asyncio.get_running_loop().time()
        try:
            await send(client, "/v1/chat/completions", body)
            return None, asyncio.get_running_loop().time() - started
        except Exception as exc:  # noqa: BLE001 - what send raises is the point
            return exc, asyncio.get_running_loop().time() - started
    return run(_with_client(base_url, go, request_timeout=request_timeout))


@pytest.mark.parametrize("kind", ["keep-alive comments", "a JSON body a little at a time"])
def test_a_server_that_trickles_times_out_at_the_request_timeout(kind):
    """Every read gets an answer within the timeout, yet the request as a whole must not outlast it."""
    if kind == "keep-alive comments":
        reply = Reply(events=[(b": ping\n\n", 0.5)] * 40 + sse(_chunk(finish="stop"), "[DONE]"))
        body = {**BODY, "stream": True}
    else:
        data = json.dumps(chat_body()).encode()
        reply = Reply(200, {"content-type": "application/json"},
                      events=[(data[i:i + 10], 0.5) for i in range(0, len(data), 10)])
        body = BODY
    with HostileServer([reply]) as srv:
        exc, took = _timed(srv.base_url, body, request_timeout=2.0)
    assert isinstance(exc, openai.APITimeoutError), repr(exc)
    assert 1.9 <= took < 4, took
    verdict = classify_exception(exc, now=0)
    assert verdict.kind == "timeout" and verdict.circuit  # an outage-like failure for the circuit


def test_an_answer_past_the_size_bound_fails_as_a_server_fault(monkeypatch):
    import batchrun.runner.lean_http as lean_http

    monkeypatch.setattr(lean_http, "MAX_BODY_BYTES", 100_000)
    endless = Reply(events=sse(*[_chunk("x" * 1000)] * 500, _chunk(finish="stop"), "[DONE]"))
    with HostileServer([endless, Reply(200, {}, {**chat_body("y" * 200_000)})]) as srv:
        streamed, plain = _send_to(srv.base_url, "/v1/chat/completions", [{**BODY, "stream": True}, BODY])
    for exc in (streamed, plain):
        assert isinstance(exc, openai.APIConnectionError), repr(exc)
        verdict = classify_exception(exc, now=0)
        assert verdict.action.name == "RETRY" and "larger than" in verdict.message, verdict.message


@pytest.mark.parametrize("events", [
    [b"event: keepalive\n\n"],
    [b"data:\n\n", b"id: 5\nretry: 10\n\n", b": a comment\n\n", b"event: weird\n\n"],
])
def test_sse_events_without_data_are_skipped(events):
    chunks = events + sse(_chunk("hi"), _chunk(finish="stop"), "[DONE]")
    with HostileServer([Reply(events=chunks), Reply(200, {"content-type": "text/event-stream"}, b"".join(chunks))]) as srv:
        streamed, plain = _send_to(srv.base_url, "/v1/chat/completions", [{**BODY, "stream": True}, BODY])
    for answer in (streamed, plain):  # a stream, and an SSE answer to a plain request
        assert not isinstance(answer, Exception), repr(answer)
        assert answer.body["choices"][0]["message"]["content"] == "hi"
        assert answer.body["choices"][0]["finish_reason"] == "stop"


def test_sse_data_that_is_not_json_is_still_a_fault():
    from batchrun.runner.sender import StreamFailed

    with HostileServer([Reply(events=[b"data: not json\n\n"] + sse(_chunk(finish="stop"), "[DONE]"))]) as srv:
        [exc] = _send_to(srv.base_url, "/v1/chat/completions", [{**BODY, "stream": True}])
    assert isinstance(exc, StreamFailed) and "JSONDecodeError" in str(exc)


@pytest.mark.parametrize("query", ["api-version=2024-10-21", "api-key=s3&x="])
def test_a_base_url_with_a_query_keeps_the_path_and_the_query(query):
    with HostileServer(lambda seen: Reply(events=CHUNKS) if seen.body.get("stream") else ok()) as srv:
        answers = _send_to(f"{srv.base_url}?{query}", "/v1/chat/completions",
                           [BODY, BODY, {**BODY, "stream": True}])  # the second through the lean path's template
        seen = list(srv.requests)
    assert all(not isinstance(a, Exception) for a in answers), answers
    assert [(s.path, s.query) for s in seen] == [("/v1/chat/completions", query)] * 3
