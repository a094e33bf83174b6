"""A scriptable hostile OpenAI-compatible server for tests: every answer is whatever the test says.

The built-in mock server is a well-behaved OpenAI. This one is not: a test hands it a *script*, a
function of each request (or a list of replies used in turn, the last one repeating), and it answers
with exactly that: any status, headers and body (JSON, bytes, HTML), a delay, a stream of raw SSE
chunks that may stop half way, or a connection dropped without an answer. It records every request
(path, headers, JSON body, arrival time), so a test can assert on what batchrun sent and when.

    with HostileServer([Reply(429, {"retry-after": "86400"}, rate_limit_body()), ok()]) as srv:
        ... WorkerSettings(base_url=srv.base_url, ...)
        assert len(srv.requests) == 2

``closed_port()`` gives a port on which nothing listens (connection refused).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

from aiohttp import web


@dataclass
class Reply:
    """One answer. ``body``: a dict/list is sent as JSON, str/bytes as they are (set content-type in
    ``headers`` for HTML). ``events``: a streamed answer instead, raw chunks written in turn (each a
    ``bytes`` or a ``(bytes, seconds to wait before it)``). ``drop``: close the connection instead of
    answering (after ``delay``), or, with ``events``, after writing them (a broken stream)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    delay: float = 0.0
    events: Sequence[Union[bytes, tuple[bytes, float]]] | None = None
    drop: bool = False


@dataclass
class Seen:
    """A request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float  # time.time() on arrival
    query: str = ""  # the query string, as sent


Script = Union[Callable[[Seen], Reply], Sequence[Reply]]


class HostileServer:
    """An aiohttp server on 127.0.0.1 in a thread, answering every POST/GET by ``script``."""

    def __init__(self, script: Script, host: str = "127.0.0.1", port: int = 0):
        self.script = script
        self.host, self.port = host, port
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _reply_for(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            n = len(self.requests)
        if callable(self.script):
            return self.script(seen)
        replies = list(self.script)
        return replies[min(n, len(replies)) - 1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        seen = Seen(request.method, request.path, dict(request.headers), body, time.time(), request.query_string)
        reply = self._reply_for(seen)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.drop and reply.events is None:
            request.transport.close()  # no answer at all: the client sees the connection drop
            return web.Response(status=500)
        if reply.events is not None:
            resp = web.StreamResponse(status=reply.status, headers={"content-type": "text/event-stream",
                                                                    **reply.headers})
            await resp.prepare(request)
            for item in reply.events:
                chunk, wait = (item, 0.0) if isinstance(item, bytes) else item
                if wait:
                    await asyncio.sleep(wait)
                await resp.write(chunk)
            if reply.drop:
                request.transport.close()
                return resp
            await resp.write_eof()
            return resp
        headers = dict(reply.headers)
        if isinstance(reply.body, (dict, list)):
            data = json.dumps(reply.body).encode()
            headers.setdefault("content-type", "application/json")
        elif isinstance(reply.body, str):
            data = reply.body.encode()
        else:
            data = reply.body or b""
        return web.Response(status=reply.status, body=data, headers=headers)

    def start(self) -> HostileServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            # A handler still waiting (a server that never answers) is cancelled at stop() after 0.5 s,
            # not aiohttp's 60 s: stop() would otherwise wait out its 10 s join on every such test.
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            try:
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, self.host, self.port)
                loop.run_until_complete(site.start())
                self.port = site._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="hostile-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- bodies ---------------------------------------------------------------------------------------

def chat_body(content: str = "ok", *, prompt_tokens: int = 10, completion_tokens: int = 2,
              finish_reason: str = "stop", model: str = "gpt-4o-mini") -> dict:
    return {"id": "chatcmpl-hostile", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def ok(content: str = "ok", headers: dict[str, str] | None = None, **kw: Any) -> Reply:
    """A plain successful chat completion."""
    return Reply(200, dict(headers or {}), chat_body(content, **kw))


def error_body(message: str, type_: str | None = None, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def rate_limit_body(wait: str = "1s", kind: str = "tokens") -> dict:
    """OpenAI's 429 for a per-minute limit, with "Please try again in <wait>"."""
    what = "tokens per min (TPM)" if kind == "tokens" else "requests per min (RPM)"
    return error_body(f"Rate limit reached for gpt-4o-mini in organization org-x on {what}: Limit 1000, "
                      f"Used 1000, Requested 10. Please try again in {wait}. Visit "
                      f"https://platform.openai.com/account/rate-limits to learn more.",
                      kind, "rate_limit_exceeded")


def sse(*payloads: Any, event_names: Sequence[str | None] | None = None) -> list[bytes]:
    """Server-sent events: each payload (a dict, or a raw str such as "[DONE]") as one ``data:`` event,
    with an ``event:`` line where ``event_names`` gives one."""
    out = []
    for i, payload in enumerate(payloads):
        data = payload if isinstance(payload, str) else json.dumps(payload)
        name = event_names[i] if event_names and i < len(event_names) else None
        out.append((f"event: {name}\n" if name else "").encode() + f"data: {data}\n\n".encode())
    return out
