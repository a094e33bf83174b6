"""The contract between batchrun's lean HTTP path and the openai SDK it trims.

``batchrun.runner.lean_http`` overrides ``AsyncOpenAI._build_request`` and sends through its own
aiohttp transport, and ``runner/openai_private.py`` imports SDK internals. None of that is the
SDK's public API, so every request shape batchrun sends (chat, completions, embeddings, responses,
streamed or not, with a query in the base URL, with per-request headers, query, body and timeouts)
goes here both ways, through the SDK's public path (``AsyncOpenAI.post`` and the resource methods,
on the SDK's own HTTP client) and through the lean path, to a local server that records the raw
requests; method, URL, headers and body must be the same. An SDK upgrade that changes what the SDK
sends, or breaks an internal the lean path relies on, fails here.
"""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

import httpx2
import pytest
from openai import AsyncOpenAI, AsyncStream

from batchrun.runner import lean_http, openai_private
from batchrun.runner.sender import api_path, make_client, send
from batchrun.settings import WorkerSettings

TIMEOUT = 33.0
# Headers the HTTP stack writes on its own, not the SDK: how each transport frames a request.
TRANSPORT_HEADERS = {"host", "connection", "content-length"}


class Received(NamedTuple):
    method: str
    target: str  # path and query, as sent
    headers: tuple[tuple[str, str], ...]  # (lower-cased name, value) in the order sent
    body: bytes

    def header_map(self) -> dict[str, str]:
        return {k: v for k, v in self.headers if k not in TRANSPORT_HEADERS}

    def json(self) -> Any:
        return json.loads(self.body)


def _chunk(url: str) -> list[dict]:
    if url == "/v1/responses":
        done = {"id": "resp_1", "object": "response", "status": "completed", "output": [], "usage": None}
        return [{"type": "response.completed", "sequence_number": 1, "response": done}]
    if url == "/v1/completions":
        return [{"id": "c1", "object": "text_completion", "created": 1, "model": "m",
                 "choices": [{"index": 0, "text": "hi", "finish_reason": "stop", "logprobs": None}]}]
    return [{"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}]


# One body that every non-streamed resource method can read (embeddings checks it has data).
_ANSWER = json.dumps({"id": "x", "object": "list", "choices": [], "output": [],
                      "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}]}).encode()


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as both clients pool connections

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.received.append(Received(self.command, self.path, tuple(
            (k.lower(), v) for k, v in self.headers.items()), body))
        request = json.loads(body or b"{}")
        if request.get("stream"):
            url = "/v1" + self.path.split("?")[0].removeprefix("/v1")
            out = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in _chunk(url)) + b"data: [DONE]\n\n"
            kind = "text/event-stream"
        else:
            out, kind = _ANSWER, "application/json"
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(out)))
        self.send_header("x-request-id", "req_1")
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    srv.received = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _base(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def _sdk_client(base_url: str, query: dict | None = None) -> AsyncOpenAI:
    """What make_client configures, on the SDK's own client and HTTP stack."""
    return AsyncOpenAI(api_key="sk-test", base_url=base_url, max_retries=0, timeout=httpx2.Timeout(TIMEOUT),
                       default_query=query)


def _lean_client(base_url: str):
    return make_client(WorkerSettings(base_url=base_url, api_key="sk-test", request_timeout=TIMEOUT))


SHAPES = {
    "chat": ("/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 12,
                                      "messages": [{"role": "user", "content": "Hello ü \u2028 \"quoted\""}]}),
    "completions": ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "max_tokens": 5}),
    "embeddings": ("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b c"]}),
    "responses": ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 16}),
    "chat-stream": ("/v1/chat/completions", {"model": "gpt-4o-mini", "stream": True,
                                             "messages": [{"role": "user", "content": "Hello"}]}),
    "completions-stream": ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi",
                                               "stream": True}),
    "responses-stream": ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "stream": True}),
}


def _sent_body(url: str, body: dict) -> dict:
    """The body the lean path sends: a stream of chat or completions asks for usage in its last chunk."""
    if body.get("stream") and url in ("/v1/chat/completions", "/v1/completions"):
        return {**body, "stream_options": {"include_usage": True}}
    return body


async def _sdk_post(client: AsyncOpenAI, url: str, body: dict) -> None:
    if body.get("stream"):
        stream = await client.post(api_path(url), body=body, cast_to=dict, stream=True,
                                   stream_cls=AsyncStream[dict])
        async for _ in stream:
            pass
    else:
        await client.post(api_path(url), body=body, cast_to=httpx2.Response)


def _assert_same(lean: Received, sdk: Received, *, exact_body: bool = True) -> None:
    assert lean.method == sdk.method == "POST"
    assert lean.target == sdk.target
    assert lean.header_map() == sdk.header_map()
    # The SDK's headers in the SDK's order (the transport's own may sit anywhere).
    assert [k for k, _ in lean.headers if k in sdk.header_map()] == [k for k, _ in sdk.headers
                                                                      if k not in TRANSPORT_HEADERS]
    if exact_body:
        assert lean.body == sdk.body
    assert lean.json() == sdk.json()


@pytest.mark.parametrize("query", [None, {"api-version": "2024-10-21"}], ids=["plain", "base-url-query"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_lean_path_sends_what_the_sdk_public_path_sends(server, shape, query):
    url, body = SHAPES[shape]
    base = _base(server)
    lean_base = f"{base}?api-version={query['api-version']}" if query else base

    async def go():
        lean = _lean_client(lean_base)
        sdk = _sdk_client(base, query)
        try:
            for _ in range(2):  # the first request builds the template, the second reuses it
                answer = await send(lean, url, body)
                assert answer.status_code == 200
            await _sdk_post(sdk, url, _sent_body(url, body))
        finally:
            await lean.close()
            await sdk.close()

    asyncio.run(go())
    first, second, sdk = server.received
    _assert_same(first, sdk)
    _assert_same(second, sdk)
    assert sdk.json() == _sent_body(url, body)
    assert sdk.target == url + (f"?api-version={query['api-version']}" if query else "")


async def _resource_call(client: AsyncOpenAI, url: str, body: dict, **extra: Any) -> None:
    """The SDK's resource method for ``url`` (its most public path), streamed ones consumed."""
    create = {"/v1/chat/completions": client.chat.completions.create, "/v1/completions": client.completions.create,
              "/v1/embeddings": client.embeddings.create, "/v1/responses": client.responses.create}[url]
    result = await create(**body, **extra)
    if body.get("stream"):
        async for _ in result:
            pass


EXTRAS = {"extra_headers": {"X-Trace-Id": "t-1", "OpenAI-Organization": "org-x"},
          "extra_query": {"tag": "a b/ü"}, "extra_body": {"metadata": {"k": "v"}}, "timeout": 7.5}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_per_request_headers_query_body_and_timeouts_go_out_as_the_sdk_sends_them(server, shape):
    """Through the resource methods with every per-request option, on the lean client (its own
    transport, the SDK's request building) and on the SDK's own client."""
    url, body = SHAPES[shape]

    async def go():
        lean, sdk = _lean_client(_base(server)), _sdk_client(_base(server))
        try:
            await _resource_call(lean, url, body, **EXTRAS)
            await _resource_call(sdk, url, body, **EXTRAS)
            await _resource_call(lean, url, body)  # and without them, on the same client afterwards
            await _resource_call(sdk, url, body)
        finally:
            await lean.close()
            await sdk.close()

    asyncio.run(go())
    lean_extra, sdk_extra, lean_plain, sdk_plain = server.received
    _assert_same(lean_extra, sdk_extra, exact_body=False)  # key order follows the method's signature
    _assert_same(lean_plain, sdk_plain, exact_body=False)
    headers = lean_extra.header_map()
    assert headers["x-trace-id"] == "t-1" and headers["openai-organization"] == "org-x"
    assert headers["x-stainless-read-timeout"] == "7.5"
    assert "tag=a+b%2F%C3%BC" in lean_extra.target or "tag=a%20b%2F%C3%BC" in lean_extra.target
    assert lean_extra.json()["metadata"] == {"k": "v"}
    assert "x-trace-id" not in lean_plain.header_map()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_template_builds_the_request_object_the_sdk_builds(shape):
    """Below the wire: the same httpx2.Request (URL, raw headers in order, timeouts, body bytes),
    for a request built by the template and one the SDK builds itself."""
    url, body = SHAPES[shape]
    settings = dict(api_key="sk-x", base_url="http://127.0.0.1:9/v1", max_retries=0, timeout=httpx2.Timeout(TIMEOUT),
                    default_query={"api-version": "1"})
    lean, sdk = lean_http.LeanAsyncOpenAI(**settings), AsyncOpenAI(**settings)
    for i in range(3):
        this = {**body, "user": f"u{i}"}
        options = openai_private.FinalRequestOptions.construct(method="post", url=api_path(url), json_data=this)
        a, b = lean._build_request(options), sdk._build_request(options)
        assert (a.method, a.url) == (b.method, b.url)
        assert a.headers.raw == b.headers.raw
        assert a.extensions == b.extensions
        assert a.read() == b.read() == openai_private.openapi_dumps(this)
    assert lean.user_agent == sdk.user_agent
    assert lean._idempotency_header is None  # else a template would repeat one request's key


def test_the_sdk_internals_the_lean_path_uses_are_there():
    """What lean_http and sender reach into besides openai_private's imports."""
    client = AsyncOpenAI(api_key="sk-x", base_url="http://127.0.0.1:9/v1")
    for name in ("_build_request", "_idempotency_key", "_idempotency_header", "_version", "_client"):
        assert hasattr(client, name), name
    assert hasattr(AsyncStream, "_iter_events")
    http = httpx2.AsyncClient()
    for name in ("_transport_for_url", "_build_redirect_request", "_default_encoding"):
        assert hasattr(http, name), name
    assert set(openai_private.__all__) <= set(vars(openai_private))
