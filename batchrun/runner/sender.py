"""Sending one request through the official AsyncOpenAI client.

The client is created with ``max_retries=0``: batchrun owns retries. Answers
are taken as raw JSON (no model parsing on the hot path). A streamed request
is consumed here, inside the attempt, so a stream that breaks half way fails
the attempt like any other error; it is assembled into the same shape as a
non-streamed answer, and a stream that ends without a finish reason (or, on the
Responses API, without ``response.completed`` / ``response.incomplete``) raises
``StreamTruncated`` (the partial text is discarded). A stream that ends with an
error (``response.failed``, an ``error`` event) or carries an unreadable event
raises ``StreamFailed``. Whatever came back as a 2xx is returned as it is, JSON
or not (text when it is not), for ``classify.classify_answer`` to judge; an SSE
answer to a plain request is assembled as a stream, and a JSON answer to a
streamed one is taken as the plain answer it is.

The client is ``lean_http.LeanAsyncOpenAI`` over ``lean_http.LeanHttpClient`` (the hot
path), and ``send`` hands ``AsyncOpenAI.request`` a copy of one prepared
``FinalRequestOptions`` per path instead of building one per call (a pydantic model whose
construction is ~40 µs).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx2
import openai
from openai import AsyncOpenAI, AsyncStream

from batchrun.runner.lean_http import LeanAsyncOpenAI, LeanHttpClient, heard_at, may_have_reached_server
from batchrun.runner.openai_private import (FinalRequestOptions, SSEDecoder, drain_response_async, model_copy,
                                            request_exceptions, timeout_exceptions)
from batchrun.settings import WorkerSettings
from batchrun.urls import mask_url

__all__ = ["Answer", "ChunkAssembler", "LeanAsyncOpenAI", "ResponseAssembler", "StreamFailed", "StreamTruncated",
           "api_path", "heard_at", "make_client", "may_have_reached_server", "send"]

log = logging.getLogger("batchrun.worker")


class StreamTruncated(Exception):
    """The stream ended before its ending: a finish_reason for every choice, or a Responses
    ``response.completed`` / ``response.incomplete`` event."""


class StreamFailed(Exception):
    """The stream ended with an error instead of a result (``error`` is the error object, for
    ``classify.classify_error_object``), or carried an event that cannot be read."""

    def __init__(self, message: str, error: object = None):
        super().__init__(message)
        self.error = error if error is not None else {"message": message}


@dataclass(frozen=True, slots=True)
class Answer:
    status_code: int
    request_id: str | None
    headers: Any  # case-insensitive mapping
    body: Any


def make_client(settings: WorkerSettings, cls: type = LeanAsyncOpenAI) -> AsyncOpenAI:
    timeout = httpx2.Timeout(settings.request_timeout)  # every phase, connecting included, as before
    # A query in the base URL (Azure's ?api-version=...) goes to every request as the SDK's
    # default_query: left in the base URL, the SDK would append the path after it.
    base = urlsplit(settings.base_url)
    query = dict(parse_qsl(base.query, keep_blank_values=True))
    client = cls(  # (runner/azure.py's for Azure endpoints)
        api_key=settings.api_key or "unset",
        base_url=urlunsplit(base._replace(query="", fragment="")) if base.query else settings.base_url,
        max_retries=0,
        timeout=timeout,
        default_query=query or None,
        http_client=LeanHttpClient(timeout=timeout, follow_redirects=True),
    )
    client._batchrun_deadline = settings.request_timeout  # the whole request, its body included
    return client


def api_path(url: str) -> str:
    """'/v1/chat/completions' -> '/chat/completions' (the client's base URL ends in /v1)."""
    return url[3:] if url.startswith("/v1/") else url


async def send(client: AsyncOpenAI, url: str, body: dict) -> Answer:
    """Send one request; raises the SDK's exceptions for HTTP errors and broken connections.

    The request timeout bounds the whole request, its body or stream included: the per-phase
    timeouts alone let a server that trickles (keep-alive comments, a byte now and then) hold a
    request for ever."""
    try:
        async with asyncio.timeout(getattr(client, "_batchrun_deadline", None)):
            return await _send(client, url, body)
    except TimeoutError as exc:
        raise openai.APITimeoutError(request=httpx2.Request("POST", f"{client.base_url}{api_path(url).lstrip('/')}")) \
            from exc


async def _send(client: AsyncOpenAI, url: str, body: dict) -> Answer:
    if body.get("stream"):
        return await _send_streamed(client, url, body)
    resp = await client.request(httpx2.Response, _options(client, api_path(url), body))
    return Answer(resp.status_code, resp.headers.get("x-request-id"), resp.headers, _decode(url, resp))


_MAX_TEXT = 10_000  # characters kept of a body that is not JSON (a proxy's HTML page)


def _decode(url: str, resp: httpx2.Response) -> Any:
    """A read answer's body: parsed JSON, an SSE body assembled (whatever its content-type says),
    or the text of anything else ("" when empty)."""
    content = resp.content
    if resp.headers.get("content-type", "").startswith("text/event-stream") \
            or content[:64].lstrip().startswith((b"data:", b"event:")):
        return _assemble_sse(url, content)
    if not content.strip():
        return ""
    try:
        return json.loads(content)
    except ValueError:
        return content[:_MAX_TEXT].decode("utf-8", "replace")


def _assemble_sse(url: str, content: bytes) -> dict:
    """A whole SSE body (an answer that streamed though not asked to), read as a stream is."""
    ending = _ending(url)
    try:
        for sse in SSEDecoder().iter_bytes(iter([content])):
            if sse.data.startswith("[DONE]"):
                break
            if not sse.data:  # an event without data (a keep-alive): SSE allows it, it says nothing
                continue
            _add(ending, sse.json())
        return ending.result()
    except (ValueError, TypeError, AttributeError) as exc:  # not JSON, not UTF-8, not the shape
        raise StreamFailed(f"the stream carried an event that cannot be read ({type(exc).__name__})") from exc


def _ending(url: str):
    return ResponseAssembler() if url == "/v1/responses" else ChunkAssembler(chat=url == "/v1/chat/completions")


def _add(ending, event: Any) -> None:
    if not isinstance(event, dict):
        raise StreamFailed(f"the stream carried an event that is not a JSON object ({type(event).__name__})")
    if event.get("error"):  # a chunk holding an error (the SDK raises APIError for these in a stream)
        raise StreamFailed("the stream carried an error", event["error"])
    ending.add(event)


def _options(client: AsyncOpenAI, path: str, body: dict) -> FinalRequestOptions:
    """What ``client.post(path, body=body)`` would build, from a template made once per path."""
    templates = client.__dict__.setdefault("_batchrun_options", {})
    template = templates.get(path)
    if template is None:
        template = templates[path] = FinalRequestOptions.construct(method="post", url=path, json_data=None)
    options = model_copy(template)
    options.json_data = body
    return options


# (base URL, path) of servers that refused `stream_options` (a 400 or 422): asked no more (per process).
_NO_STREAM_OPTIONS: set[tuple[str, str]] = set()


def _names_stream_options(exc: openai.APIStatusError) -> bool:
    text = f"{exc.message} {exc.body}"  # the message, param or a validation error's location
    return "stream_options" in text or "include_usage" in text


async def _send_streamed(client: AsyncOpenAI, url: str, body: dict) -> Answer:
    path = api_path(url)
    server = (str(client.base_url), path)
    # Ask for usage in the last chunk, so the result carries it like a plain answer; only when the
    # request sets no stream_options of its own, and not of a server that refused them.
    ask_usage = url in ("/v1/chat/completions", "/v1/completions") and "stream_options" not in body \
        and server not in _NO_STREAM_OPTIONS
    sent = {**body, "stream_options": {"include_usage": True}} if ask_usage else body
    try:
        stream = await client.request(dict, _options(client, path, sent), stream=True, stream_cls=AsyncStream[dict])
    except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:  # 422: FastAPI-style servers
        if not (ask_usage and _names_stream_options(exc)):
            raise
        # Refused before it was processed (not charged): send it once more as the user wrote it.
        if server not in _NO_STREAM_OPTIONS:
            _NO_STREAM_OPTIONS.add(server)
            log.warning("%s%s refused stream_options; streamed requests there go without it, so their "
                        "usage is what the stream carries, if any (else each answer counts at its worst "
                        "case)", mask_url(server[0]).rstrip("/"), path)
        stream = await client.request(dict, _options(client, path, body), stream=True, stream_cls=AsyncStream[dict])
    resp = stream.response
    if not resp.headers.get("content-type", "").startswith("text/event-stream"):
        # Not a stream after all (a server that ignores "stream", a proxy's page): read it whole,
        # its errors mapped as the SDK maps them when it reads a body.
        try:
            await resp.aread()
        except timeout_exceptions() as exc:
            raise openai.APITimeoutError(request=resp.request) from exc
        except request_exceptions() as exc:
            raise openai.APIConnectionError(request=resp.request) from exc
        return Answer(resp.status_code, resp.headers.get("x-request-id"), resp.headers, _decode(url, resp))
    ending = _ending(url)
    try:
        # The SDK's stream decodes every event as JSON, those without data too: read its events here
        # (its transport errors mapped as it maps them), skipping the events SSE allows without data.
        async for sse in stream._iter_events():
            if sse.data.startswith("[DONE]"):
                await drain_response_async(resp)  # as the SDK does: the connection goes back to the pool
                break
            if sse.data:
                _add(ending, sse.json())
        result = ending.result()
    except (ValueError, TypeError, AttributeError) as exc:  # an event not JSON, not UTF-8, not the shape
        raise StreamFailed(f"the stream carried an event that cannot be read ({type(exc).__name__})") from exc
    finally:
        await resp.aclose()  # also when it ends early with an error
    return Answer(resp.status_code, resp.headers.get("x-request-id"), resp.headers, result)


class ResponseAssembler:
    """The final response of a Responses API stream: ``response.completed`` or ``response.incomplete``
    (a normal, billed ending, e.g. at max_output_tokens) carry it; ``response.failed`` and an
    ``error`` event end it with an error."""

    def __init__(self) -> None:
        self.final: dict | None = None

    def add(self, event: dict) -> None:
        kind = event.get("type")
        if kind in ("response.completed", "response.incomplete"):
            self.final = event.get("response")
        elif kind == "response.failed":
            response = event.get("response")
            error = response.get("error") if isinstance(response, dict) else None
            raise StreamFailed("the response failed", error or {"message": "the response failed"})
        elif kind == "error":
            raise StreamFailed("the stream reported an error", event)

    def result(self) -> dict:
        if not isinstance(self.final, dict):
            raise StreamTruncated("the stream ended without response.completed or response.incomplete")
        return self.final


class ChunkAssembler:
    """Builds a chat.completion (or text_completion) from its stream chunks."""

    def __init__(self, *, chat: bool):
        self.chat = chat
        self.head: dict = {}
        self.choices: dict[int, dict] = {}
        self.usage = None

    def add(self, chunk: dict) -> None:
        if not self.head:
            self.head = {k: chunk.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for c in chunk.get("choices") or ():
            i = c.get("index", 0)
            acc = self.choices.setdefault(i, {"index": i, "parts": [], "role": None, "tool_calls": {},
                                              "finish_reason": None, "refusal": None})
            if self.chat:
                delta = c.get("delta") or {}
                acc["role"] = delta.get("role") or acc["role"]
                if delta.get("content"):
                    acc["parts"].append(delta["content"])
                if delta.get("refusal"):
                    acc["refusal"] = (acc["refusal"] or "") + delta["refusal"]
                for tc in delta.get("tool_calls") or ():
                    slot = acc["tool_calls"].setdefault(tc.get("index", 0), {"id": None, "type": "function",
                                                                             "function": {"name": "", "arguments": ""}})
                    slot["id"] = tc.get("id") or slot["id"]
                    fn = tc.get("function") or {}
                    slot["function"]["name"] += fn.get("name") or ""
                    slot["function"]["arguments"] += fn.get("arguments") or ""
            elif c.get("text"):
                acc["parts"].append(c["text"])
            if c.get("finish_reason"):
                acc["finish_reason"] = c["finish_reason"]

    def result(self) -> dict:
        if not self.choices or any(c["finish_reason"] is None for c in self.choices.values()):
            raise StreamTruncated("the stream ended without a finish_reason")
        choices = []
        for i in sorted(self.choices):
            acc = self.choices[i]
            if self.chat:
                message = {"role": acc["role"] or "assistant", "content": "".join(acc["parts"]) if acc["parts"] else None,
                           "refusal": acc["refusal"]}
                if acc["tool_calls"]:
                    message["tool_calls"] = [acc["tool_calls"][k] for k in sorted(acc["tool_calls"])]
                choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": acc["finish_reason"]})
            else:
                choices.append({"index": i, "text": "".join(acc["parts"]), "logprobs": None,
                                "finish_reason": acc["finish_reason"]})
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.head.get("created") or int(time.time()), "choices": choices, "usage": self.usage}
