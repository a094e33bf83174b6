"""``stream: true`` answers: OpenAI's SSE chunks, paced over time, cut short by stream faults."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, NamedTuple

from aiohttp import web

from batchrun.mock.config import SYSTEM_FINGERPRINT
from batchrun.mock.errors import SERVER_ERROR
from batchrun.mock.replies import new_id

DONE = b"data: [DONE]\n\n"


class StreamEvents(NamedTuple):
    """The SSE events of a whole stream."""

    head: list[bytes]  # the opening (chat: one role delta per choice)
    content: list[bytes]  # one per token and choice
    tail: list[bytes]  # finish reasons, then usage if asked for


def stream_events(
    endpoint: str,
    body: dict,
    answers: list[list[str]],
    n: int,
    cap: int,
    usage: dict,
    include_usage: bool,
) -> StreamEvents:
    """SSE events of a stream, as OpenAI sends them."""
    chat = endpoint == "chat/completions"
    base: dict[str, Any] = {
        "id": new_id("chatcmpl-" if chat else "cmpl-"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": body["model"],
    }
    if chat:
        base["service_tier"] = "default"
    base["system_fingerprint"] = SYSTEM_FINGERPRINT

    def event(choices: list, usage_value: Any = None) -> bytes:
        chunk = {**base, "choices": choices}
        if include_usage:  # with include_usage every chunk has the key, null until the last
            chunk["usage"] = usage_value
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def choice(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
        if not chat:
            return {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": "", "refusal": None}
        elif text is not None:
            delta = {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    # (choice index, tokens) pairs: chat answers n times the one answer; completions n per prompt
    streams = [(i * n + j, pieces) for i, pieces in enumerate(answers) for j in range(n)]
    head = [event([choice(index, None, None, role=True)]) for index, _ in streams] if chat else []
    content = [
        event([choice(index, pieces[t], None)])
        for t in range(max(len(p) for _, p in streams))
        for index, pieces in streams
        if t < len(pieces)
    ]
    tail = [
        event([choice(index, None if chat else "", "length" if len(pieces) == cap else "stop")])
        for index, pieces in streams
    ]
    if include_usage:
        tail.append(event([], usage))
    return StreamEvents(head, content, tail)


def events_to_send(events: StreamEvents, fault: str | None) -> list[bytes]:
    """The events a stream sends: all of them and [DONE], or, with a stream fault, half the
    content and then [DONE] (truncate), nothing more (disconnect) or an error event."""
    if fault:  # cut the stream halfway through the content
        sent = events.head + events.content[: len(events.content) // 2]
    else:
        sent = events.head + events.content + events.tail
    if fault != "stream_disconnect" and fault != "stream_error":
        sent.append(DONE)
    if fault == "stream_error":
        sent.append(b"data: " + json.dumps(SERVER_ERROR).encode() + b"\n\n")
    return sent


async def send_stream(
    request: web.Request, response: web.StreamResponse, events: list[bytes], per_event: float,
    disconnect: bool,
) -> None:
    """Open ``response`` on ``request``, send ``events``, then end it (or with ``disconnect``, break it)."""
    try:
        await response.prepare(request)
        await _send_paced(response, events, per_event)
        if disconnect:
            # Close without the chunked-encoding terminator: the client sees a broken body.
            if request.transport is not None:
                request.transport.close()
            return
        await response.write_eof()
    except ConnectionError:  # the client went away; nothing left to tell it
        pass


async def _send_paced(response: web.StreamResponse, events: list[bytes], per_event: float) -> None:
    """Write the events spread evenly over time; ticks shorter than the timer resolution are
    coalesced into one write."""
    if per_event <= 0:
        await response.write(b"".join(events))
        return
    loop = asyncio.get_running_loop()
    start = loop.time()
    pending: list[bytes] = []
    for i, event in enumerate(events):
        delay = start + i * per_event - loop.time()
        if delay > 0.002:
            if pending:
                await response.write(b"".join(pending))
                pending.clear()
            await asyncio.sleep(delay)
        pending.append(event)
    await response.write(b"".join(pending))
