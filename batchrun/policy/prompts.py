"""What of a request body is prompt, and how many output tokens it reserves.

Each endpoint's walker puts what it finds into a :class:`PromptParts`: the strings to tokenise,
token ids given directly (completions/embeddings token arrays), and fixed framing and media
estimates. tokens.py counts them (``estimate_tokens``, ``server_charge_estimate``), and so does
ops/estimate.py in bulk: one walk, so every count sees the same parts.

Nothing here raises on odd request bodies: bodies are validated elsewhere, and a surprise field
must cost an estimate, not a crash. Pure: no tiktoken, no Redis, no HTTP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "AUDIO_TOKENS",
    "FILE_TOKENS",
    "IMAGE_TOKENS",
    "IMAGE_TOKENS_LOW_DETAIL",
    "REPLY_PRIMING_TOKENS",
    "TOKENS_PER_ITEM",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "TOKENS_PER_TOOL",
    "TOKENS_PER_TOOL_CALL",
    "TOOLS_BLOCK_TOKENS",
    "PromptParts",
    "WalkedRequest",
    "positive_int",
    "walk_request",
]

#: Flat estimate per image part: a 1024x1024 image at high (or "auto") detail on gpt-4o
#: costs 85 + 4 tiles x 170 = 765 tokens. Larger images cost more (up to ~1,105 on
#: gpt-4o) and gpt-4o-mini bills images at many times these numbers, so this can
#: under-count; we do not fetch or decode images to find out.
IMAGE_TOKENS = 765
#: An image part with ``"detail": "low"`` is a flat 85 tokens on gpt-4o.
IMAGE_TOKENS_LOW_DETAIL = 85
#: Flat estimate per audio part: about one minute of audio (~10 tokens per second).
AUDIO_TOKENS = 600
#: Flat estimate per file part (e.g. a PDF: extracted text plus page images).
#: A rough guess; long documents cost far more.
FILE_TOKENS = 1000

# Chat framing, per OpenAI's counting for current models (the cookbook's
# num_tokens_from_messages): each message is wrapped in ~3 tokens of markup, a
# ``name`` adds one, and 3 more prime the assistant's reply.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
#: Responses API: each input item (and the instructions, and a plain-string input, which
#: the server renders as messages) gets the same framing as a chat message.
TOKENS_PER_ITEM = 3
#: Per assistant tool call, on top of its function name and arguments: the markup
#: around them (an estimate; OpenAI does not publish it).
TOKENS_PER_TOOL_CALL = 5
#: Tool / function definitions are rendered by the server in a private, TypeScript-like
#: format. We count the compact JSON of each definition (name, description,
#: parameters), which is usually a little longer than that format, plus these
#: overheads taken from OpenAI's cookbook (7 per function, 12 for the block).
TOKENS_PER_TOOL = 7
TOOLS_BLOCK_TOKENS = 12


@dataclass
class PromptParts:
    """The parts of a request's prompt, kept apart because each is counted its own way."""

    texts: list[str] = field(default_factory=list)
    token_ids: int = 0  # tokens sent as ids: exact, whatever the encoding
    overhead: int = 0  # message framing, images, audio, files, tool overheads

    def text(self, value: object) -> None:
        if isinstance(value, str) and value:
            self.texts.append(value)

    def json(self, value: object) -> None:
        # Compact JSON, non-ASCII kept as is: closest to what the model sees.
        # default=str so a surprise value is counted rather than raising.
        self.texts.append(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))


def _as_list(value: object) -> list:
    return value if isinstance(value, list) else []


def positive_int(value: object) -> int | None:
    """``value`` as a positive int, or None when it is missing or not a usable number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):  # before isfinite, which overflows on huge ints
        return value if value > 0 else None
    if isinstance(value, float) and math.isfinite(value) and value > 0:
        return math.ceil(value)
    return None


def _content(value: object, prompt: PromptParts) -> None:
    """Message content (chat or responses): a string, null, or a list of parts."""
    if isinstance(value, str):
        prompt.text(value)
        return
    for part in _as_list(value):
        if isinstance(part, str):
            prompt.text(part)
            continue
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind == "image_url":  # chat: {"image_url": {"url": ..., "detail": ...}}
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, Mapping) else None
            prompt.overhead += IMAGE_TOKENS_LOW_DETAIL if detail == "low" else IMAGE_TOKENS
        elif kind == "input_image":  # responses: {"image_url": "...", "detail": ...}
            low = part.get("detail") == "low"
            prompt.overhead += IMAGE_TOKENS_LOW_DETAIL if low else IMAGE_TOKENS
        elif kind in ("input_audio", "audio"):
            prompt.overhead += AUDIO_TOKENS
        elif kind in ("file", "input_file"):
            prompt.overhead += FILE_TOKENS
        elif kind == "refusal":
            prompt.text(part.get("refusal"))
        else:
            # "text", "input_text", "output_text", and unknown kinds: their text if any.
            prompt.text(part.get("text"))


def _function_call(call: object, prompt: PromptParts) -> None:
    """{"name": ..., "arguments": ...} of a tool call or legacy function_call."""
    if isinstance(call, Mapping):
        prompt.overhead += TOKENS_PER_TOOL_CALL
        prompt.text(call.get("name"))
        prompt.text(call.get("arguments"))


def _tool_definitions(tools: object, prompt: PromptParts) -> None:
    """Chat ``tools`` ({"type": "function", "function": {...}}), legacy ``functions``
    ({...}) and responses ``tools`` (flat {"type": "function", "name": ...}, or built-ins
    like {"type": "web_search"}): the JSON of each definition plus overheads."""
    defined = [tool for tool in _as_list(tools) if isinstance(tool, Mapping)]
    if not defined:
        return
    prompt.overhead += TOOLS_BLOCK_TOKENS
    for tool in defined:
        function = tool.get("function")
        prompt.json(function if isinstance(function, Mapping) else tool)
        prompt.overhead += TOKENS_PER_TOOL


def _chat(body: Mapping, prompt: PromptParts) -> None:
    for message in _as_list(body.get("messages")):
        prompt.overhead += TOKENS_PER_MESSAGE
        if not isinstance(message, Mapping):
            continue
        for key, value in message.items():
            if key == "content":
                _content(value, prompt)
            elif key == "tool_calls":
                for call in _as_list(value):
                    if isinstance(call, Mapping):
                        _function_call(call.get("function"), prompt)
            elif key == "function_call":
                _function_call(value, prompt)
            elif isinstance(value, str):
                # role, name, tool_call_id, refusal, ...: every string is in the prompt.
                prompt.text(value)
                if key == "name":
                    prompt.overhead += TOKENS_PER_NAME
    prompt.overhead += REPLY_PRIMING_TOKENS
    _tool_definitions(body.get("tools"), prompt)
    _tool_definitions(body.get("functions"), prompt)
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and isinstance(response_format.get("json_schema"), Mapping):
        prompt.json(response_format["json_schema"])


def _token_input(value: object, prompt: PromptParts) -> None:
    """Completions ``prompt`` / embeddings ``input``: a string, a list of strings, a
    token array (list of ints), or a list of token arrays."""
    if isinstance(value, str):
        prompt.text(value)
        return
    for element in _as_list(value):
        if isinstance(element, str):
            prompt.text(element)
        elif isinstance(element, int) and not isinstance(element, bool):
            prompt.token_ids += 1  # one id of a flat token array
        elif isinstance(element, list):
            prompt.token_ids += len(element)  # one token array among several


def _completions(body: Mapping, prompt: PromptParts) -> None:
    _token_input(body.get("prompt"), prompt)
    prompt.text(body.get("suffix"))


def _embeddings(body: Mapping, prompt: PromptParts) -> None:
    _token_input(body.get("input"), prompt)


# Identifiers and bookkeeping on responses input items, not prompt text.
_ITEM_SKIP_KEYS = frozenset({"type", "id", "status"})


def _responses(body: Mapping, prompt: PromptParts) -> None:
    # The server renders instructions and a string input as messages, so they get the
    # same framing as an input item.
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        prompt.overhead += TOKENS_PER_ITEM
        prompt.text(instructions)
    items = body.get("input")
    if isinstance(items, str):
        prompt.overhead += TOKENS_PER_ITEM
        prompt.text(items)
    for item in _as_list(items):
        prompt.overhead += TOKENS_PER_ITEM
        if isinstance(item, str):
            prompt.text(item)
        if not isinstance(item, Mapping):
            continue
        for key, value in item.items():
            if key in ("content", "output"):  # message content, function_call_output
                _content(value, prompt)
            elif key not in _ITEM_SKIP_KEYS and isinstance(value, str):
                prompt.text(value)  # role, name, arguments, call_id, ...
    prompt.overhead += REPLY_PRIMING_TOKENS  # the reply is primed as in chat
    _tool_definitions(body.get("tools"), prompt)
    text = body.get("text")
    text_format = text.get("format") if isinstance(text, Mapping) else None
    if isinstance(text_format, Mapping) and text_format.get("type") == "json_schema":
        prompt.json(text_format)


# --- Output reservations -----------------------------------------------------------


def _chat_output(body: Mapping, default: int) -> int:
    per_choice = (
        positive_int(body.get("max_completion_tokens"))
        or positive_int(body.get("max_tokens"))
        or default
    )
    return per_choice * (positive_int(body.get("n")) or 1)


def _completions_output(body: Mapping, default: int) -> int:
    # The legacy API's own default is 16 tokens; we reserve ``default`` instead, which
    # only over-counts, to keep one rule across endpoints. The server generates
    # best_of completions (it must be >= n) and returns the best n.
    per_choice = positive_int(body.get("max_tokens")) or default
    n = positive_int(body.get("n")) or 1
    best_of = positive_int(body.get("best_of")) or 1
    return per_choice * max(n, best_of)


def _embeddings_output(body: Mapping, default: int) -> int:
    return 0


def _responses_output(body: Mapping, default: int) -> int:
    return positive_int(body.get("max_output_tokens")) or default


# url -> (prompt walker, output reservation)
_ENDPOINTS = {
    "/v1/chat/completions": (_chat, _chat_output),
    "/v1/completions": (_completions, _completions_output),
    "/v1/embeddings": (_embeddings, _embeddings_output),
    "/v1/responses": (_responses, _responses_output),
}


class WalkedRequest(NamedTuple):
    """What a request body holds to be counted: its prompt, and the output tokens it reserves."""

    prompt: PromptParts
    output_tokens: int


def walk_request(url: str, body: Mapping, default_max_output: int) -> WalkedRequest:
    """The prompt parts and output reservation of one request to ``url`` (ValueError for a url
    that is not one of the four endpoints). ``default_max_output`` is reserved per answer when the
    body sets no max_tokens / max_completion_tokens / max_output_tokens."""
    try:
        walk_prompt, reserve_output = _ENDPOINTS[url]
    except (KeyError, TypeError):  # TypeError: an unhashable url
        raise ValueError(
            f"cannot estimate tokens for url {url!r}: expected one of {', '.join(_ENDPOINTS)}"
        ) from None
    if not isinstance(body, Mapping):
        body = {}
    prompt = PromptParts()
    walk_prompt(body, prompt)
    return WalkedRequest(prompt, reserve_output(body, default_max_output))
