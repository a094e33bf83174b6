"""Sending one request through the official AsyncOpenAI client.

The client is created with ``max_retries=0``: batchrun owns retries. Answers
are taken as raw JSON (no model parsing on the hot path). A streamed request
is consumed here, inside the attempt, so a stream that breaks half way fails
the attempt like any other error; it is assembled into the same shape as a
non-streamed answer, and a stream that ends without a finish reason raises
``StreamTruncated`` (the partial text is discarded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx2
from openai import AsyncOpenAI, AsyncStream

from batchrun.settings import WorkerSettings


class StreamTruncated(Exception):
    """The stream ended before any choice had a finish_reason."""


@dataclass(frozen=True, slots=True)
class Answer:
    status_code: int
    request_id: str | None
    headers: Any  # case-insensitive mapping
    body: Any


def make_client(settings: WorkerSettings) -> AsyncOpenAI:
    return AsyncOpenAI(
        api_key=settings.api_key or "unset",
        base_url=settings.base_url,
        max_retries=0,
        timeout=settings.request_timeout,
    )


def api_path(url: str) -> str:
    """'/v1/chat/completions' -> '/chat/completions' (the client's base URL ends in /v1)."""
    return url[3:] if url.startswith("/v1/") else url


async def send(client: AsyncOpenAI, url: str, body: dict) -> Answer:
    """Send one request; raises the SDK's exceptions for HTTP errors and broken connections."""
    if body.get("stream"):
        return await _send_streamed(client, url, body)
    resp = await client.post(api_path(url), body=body, cast_to=httpx2.Response)
    return Answer(resp.status_code, resp.headers.get("x-request-id"), resp.headers, resp.json())


async def _send_streamed(client: AsyncOpenAI, url: str, body: dict) -> Answer:
    if url == "/v1/chat/completions" or url == "/v1/completions":
        # Ask for usage in the last chunk, so the result carries it like a plain answer.
        body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
    stream = await client.post(api_path(url), body=body, cast_to=dict, stream=True, stream_cls=AsyncStream[dict])
    resp = stream.response
    if url == "/v1/responses":
        final = None
        async for event in stream:
            if event.get("type") == "response.completed":
                final = event.get("response")
        if final is None:
            raise StreamTruncated("the stream ended without a response.completed event")
        return Answer(resp.status_code, resp.headers.get("x-request-id"), resp.headers, final)
    assembler = ChunkAssembler(chat=url == "/v1/chat/completions")
    async for chunk in stream:
        assembler.add(chunk)
    return Answer(resp.status_code, resp.headers.get("x-request-id"), resp.headers, assembler.result())


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
