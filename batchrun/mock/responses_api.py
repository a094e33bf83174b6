"""The mock's ``POST /v1/responses``: OpenAI's Responses API, plain and streamed.

The answer is the mock's deterministic text (replies.reply_pieces, keyed on ``input``), in a
``response`` object whose ``output`` holds one assistant message. Its ending is that of OpenAI's
Responses API: ``status`` ``completed``, or ``incomplete`` with ``incomplete_details.reason``
``max_output_tokens`` when the answer filled ``max_output_tokens``. Streamed, it is the typed
server-sent events (``event: TYPE`` + ``data: {...}``, each with a ``sequence_number``) from
``response.created`` to ``response.completed`` / ``response.incomplete``, with the text in
``response.output_text.delta`` events, and no ``[DONE]``; the stream faults cut it short
(truncate, disconnect) or end it with a top-level ``error`` event.
"""

from __future__ import annotations

import json
import time
from typing import Any

from batchrun.mock.errors import SERVER_ERROR, invalid
from batchrun.mock.replies import new_id

MIN_OUTPUT_TOKENS = 16  # OpenAI refuses a smaller max_output_tokens


def validate(body: dict) -> dict | None:
    """OpenAI's 400 body for the first problem of a Responses request (model checked already)."""
    if "input" not in body:
        return invalid("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    value = body["input"]
    if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(i, dict) for i in value))):
        return invalid("Invalid type for 'input': expected a string or an array of input items.", "input",
                       "invalid_type")
    cap = body.get("max_output_tokens")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool)):
        return invalid("Invalid type for 'max_output_tokens': expected an integer.", "max_output_tokens",
                       "invalid_type")
    if cap is not None and cap < MIN_OUTPUT_TOKENS:
        return invalid(f"Invalid 'max_output_tokens': integer below minimum value. Expected a value >= "
                       f"{MIN_OUTPUT_TOKENS}, but got {cap} instead.", "max_output_tokens", "integer_below_min_value")
    return None


def input_texts(body: dict) -> list[str]:
    """The texts the prompt is made of: the instructions, and the input's (a string, or items
    whose content is a string or a list of parts with text)."""
    texts = [body["instructions"]] if isinstance(body.get("instructions"), str) else []
    value = body["input"]
    if isinstance(value, str):
        return texts + [value]
    for item in value:
        content = item.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        elif item.get("type") not in (None, "message"):  # a function call output, a tool item: its JSON
            texts.append(json.dumps(item))
    return texts


def usage_body(input_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def response_body(body: dict, pieces: list[str], cap: int, usage: dict, *, status: str | None = None,
                  response_id: str | None = None, message_id: str | None = None) -> dict:
    """The ``response`` object; ``status`` "in_progress" is the one the stream opens with."""
    full = len(pieces) >= cap
    ending = status or ("incomplete" if full else "completed")
    done = ending != "in_progress"
    message = {"id": message_id or new_id("msg_"), "type": "message", "status": ending if done else "in_progress",
               "role": "assistant",
               "content": [{"type": "output_text", "text": "".join(pieces), "annotations": [], "logprobs": []}]}
    return {
        "id": response_id or new_id("resp_"), "object": "response", "created_at": int(time.time()),
        "status": ending, "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if done and ending == "incomplete" else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "model": body["model"], "output": [message] if done else [], "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
        "service_tier": "default", "store": body.get("store", True), "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []), "top_p": body.get("top_p", 1.0), "truncation": "disabled",
        "usage": usage if done else None, "metadata": body.get("metadata") or {},
    }


def stream_events(body: dict, pieces: list[str], cap: int, usage: dict) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(head, content, tail): the SSE events of a Responses stream, as OpenAI sends them."""
    rid, mid = new_id("resp_"), new_id("msg_")
    counter = iter(range(1 << 30))

    def event(kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": next(counter), **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    opening = response_body(body, [], cap, usage, status="in_progress", response_id=rid, message_id=mid)
    final = response_body(body, pieces, cap, usage, response_id=rid, message_id=mid)
    item = final["output"][0]
    empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    head = [event("response.created", response=opening), event("response.in_progress", response=opening),
            event("response.output_item.added", output_index=0,
                  item={**item, "status": "in_progress", "content": []}),
            event("response.content_part.added", part=empty_part, **where)]
    content = [event("response.output_text.delta", delta=piece, logprobs=[], **where) for piece in pieces]
    text = "".join(pieces)
    tail = [event("response.output_text.done", text=text, logprobs=[], **where),
            event("response.content_part.done", part={**empty_part, "text": text}, **where),
            event("response.output_item.done", output_index=0, item=item),
            event(f"response.{final['status']}", response=final)]
    return head, content, tail


def events_to_send(head: list[bytes], content: list[bytes], tail: list[bytes], fault: str | None) -> list[bytes]:
    """All the events; with a stream fault, half the content and then nothing more (truncate,
    disconnect) or a top-level ``error`` event (a Responses stream has no ``[DONE]``)."""
    if not fault:
        return head + content + tail
    sent = head + content[: len(content) // 2]
    if fault == "stream_error":
        error = SERVER_ERROR["error"]
        data = {"type": "error", "code": error.get("code") or "server_error", "message": error["message"],
                "param": None, "sequence_number": len(sent)}
        sent.append(f"event: error\ndata: {json.dumps(data)}\n\n".encode())
    return sent
