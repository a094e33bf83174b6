"""Estimate what a request costs against the account's tokens-per-minute (TPM) limit.

OpenAI admits a request by charging its estimated prompt tokens plus its output
reservation (``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``, times
``n``) against the TPM budget. batchrun must reserve the same amount *before* sending,
so every estimate here leans conservative: counting a little too much costs a little
throughput, counting too little earns 429s for the whole fleet.

Prompt text is counted with tiktoken. When tiktoken cannot load its encoding (no cache
and no internet, as behind a firewall) we fall back to ``ceil(chars / 3)``, which
over-counts English (OpenAI's rule of thumb is ~4 chars per token), and say so once in
the log. Nothing in here raises on odd request bodies: bodies are validated elsewhere,
and a surprise field must cost an estimate, not a crash.

Everything is pure: no Redis, no HTTP.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import tiktoken
from tiktoken.model import encoding_name_for_model

__all__ = [
    "AUDIO_TOKENS",
    "DEFAULT_MAX_OUTPUT_TOKENS",
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
    "TokenEstimate",
    "clear_cache",
    "count_text",
    "encoding_for",
    "estimate_tokens",
    "server_charge_estimate",
]

log = logging.getLogger("batchrun.tokens")

# --- Documented constants ----------------------------------------------------------

#: Output reservation when a request sets none of max_tokens / max_completion_tokens /
#: max_output_tokens. The API would then allow up to the model's whole output window, so
#: any default is a guess: users should set max_tokens for accurate budgeting. Callers
#: can override it per call with ``default_max_output=``.
DEFAULT_MAX_OUTPUT_TOKENS = 1024

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

# Model names tiktoken does not know (new releases, fine-tune aliases, Azure deployment
# names) get the encoding of every current OpenAI model.
FALLBACK_ENCODING = "o200k_base"

# The character fallback: OpenAI averages ~4 chars per token for English; 3 over-counts
# English on purpose because an under-estimate earns 429s.
_FALLBACK_CHARS_PER_TOKEN = 3
# OpenAI's own admission estimate is believed to be ~4 chars per token.
_SERVER_CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class TokenEstimate:
    """Tokens a request will be charged: prompt plus output reservation."""

    input_tokens: int
    output_tokens: int
    exact: bool  # False when prompt text was counted by the character fallback

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


# --- Encodings ---------------------------------------------------------------------

_warn_lock = threading.Lock()
_warned = False


@functools.lru_cache(maxsize=256)
def encoding_for(model: str) -> tiktoken.Encoding | None:
    """The tiktoken encoding for ``model``, or None if it cannot be loaded.

    Unknown model names fall back to o200k_base. If the encoding cannot be loaded at all
    (no cache and no internet, a corrupt cache, ...), returns None so callers count
    characters instead, and logs one warning per process. Cached, including the None,
    so a failed download is not retried on every request.
    """
    try:
        name = encoding_name_for_model(model)
    except KeyError:
        name = FALLBACK_ENCODING
    try:
        # Looked up on the module at call time so tests can monkeypatch it.
        return tiktoken.get_encoding(name)
    except Exception as exc:  # network errors are OSErrors, a bad cache a ValueError
        _warn_fallback(model, exc)
        return None


def _warn_fallback(model: str, exc: Exception) -> None:
    global _warned
    with _warn_lock:
        if _warned:
            return
        _warned = True
    # One sentence with the fix; the model is not named (the first lookup may be a preload's,
    # not a model of the file), and the exception's text (often a long ConnectionError) is for -v.
    log.warning(
        "tiktoken could not load its encoding files, so tokens are estimated from characters "
        "(≈ chars/3, conservative); to count exactly, point TIKTOKEN_CACHE_DIR at a folder that holds them, "
        "or allow this machine to download them once"
    )
    log.debug("tiktoken's error for %s: %s: %s", model, type(exc).__name__, exc)


def clear_cache() -> None:
    """Forget loaded encodings and the warning already given (for tests)."""
    global _warned
    encoding_for.cache_clear()
    _counts.clear()
    with _warn_lock:
        _warned = False


def _fallback_count(text: str) -> int:
    return -(-len(text) // _FALLBACK_CHARS_PER_TOKEN)  # ceil without floats


def count_text(text: str, model: str) -> int:
    """Tokens in ``text`` for ``model``: tiktoken, or ceil(len / 3) if it is unavailable.

    The fallback over-counts English prose; dense code and non-Latin scripts can still
    exceed it (Russian runs ~1 token per 2 chars in cl100k_base).

    Special-token strings such as "<|endoftext|>" are counted as ordinary text, which is
    how the API treats them in user content (and tiktoken's ``encode`` would raise).
    """
    enc = encoding_for(model)
    if enc is None:
        return _fallback_count(text)
    return len(enc.encode_ordinary(text))


# Counts of the texts that recur from request to request (roles, a shared system prompt,
# tool definitions), so that each is encoded once rather than once per request. Bounded: it
# is emptied when full, and long texts are not kept. A count is the same either way.
_COUNTS_KEPT = 4096
_COUNTED_TEXT_MAX = 1024  # at most ~4 MB of texts kept (4096 x 1 KB, up to 4 bytes a character)
_counts: dict[tuple[str, str], int] = {}


def _encoded_length(enc: tiktoken.Encoding, text: str) -> int:
    if len(text) > _COUNTED_TEXT_MAX:
        return len(enc.encode_ordinary(text))  # ordinary: "<|endoftext|>" in user text must not raise
    key = (enc.name, text)
    n = _counts.get(key)
    if n is None:
        n = len(enc.encode_ordinary(text))
        if len(_counts) >= _COUNTS_KEPT:
            _counts.clear()
        _counts[key] = n
    return n


# --- Walking request bodies --------------------------------------------------------
#
# Each endpoint's walker puts what it finds into a _Prompt: the strings to tokenise,
# token ids given directly (completions/embeddings token arrays), and fixed framing and
# media estimates. Keeping them apart lets estimate_tokens and server_charge_estimate
# share one walk.


@dataclass
class _Prompt:
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


def _positive_int(value: object) -> int | None:
    """``value`` as a positive int, or None when it is missing or not a usable number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):  # before isfinite, which overflows on huge ints
        return value if value > 0 else None
    if isinstance(value, float) and math.isfinite(value) and value > 0:
        return math.ceil(value)
    return None


def _content(value: object, prompt: _Prompt) -> None:
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


def _function_call(call: object, prompt: _Prompt) -> None:
    """{"name": ..., "arguments": ...} of a tool call or legacy function_call."""
    if isinstance(call, Mapping):
        prompt.overhead += TOKENS_PER_TOOL_CALL
        prompt.text(call.get("name"))
        prompt.text(call.get("arguments"))


def _tool_definitions(tools: object, prompt: _Prompt) -> None:
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


def _chat(body: Mapping, prompt: _Prompt) -> None:
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


def _token_input(value: object, prompt: _Prompt) -> None:
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


def _completions(body: Mapping, prompt: _Prompt) -> None:
    _token_input(body.get("prompt"), prompt)
    prompt.text(body.get("suffix"))


def _embeddings(body: Mapping, prompt: _Prompt) -> None:
    _token_input(body.get("input"), prompt)


# Identifiers and bookkeeping on responses input items, not prompt text.
_ITEM_SKIP_KEYS = frozenset({"type", "id", "status"})


def _responses(body: Mapping, prompt: _Prompt) -> None:
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
        _positive_int(body.get("max_completion_tokens"))
        or _positive_int(body.get("max_tokens"))
        or default
    )
    return per_choice * (_positive_int(body.get("n")) or 1)


def _completions_output(body: Mapping, default: int) -> int:
    # The legacy API's own default is 16 tokens; we reserve ``default`` instead, which
    # only over-counts, to keep one rule across endpoints. The server generates
    # best_of completions (it must be >= n) and returns the best n.
    per_choice = _positive_int(body.get("max_tokens")) or default
    n = _positive_int(body.get("n")) or 1
    best_of = _positive_int(body.get("best_of")) or 1
    return per_choice * max(n, best_of)


def _embeddings_output(body: Mapping, default: int) -> int:
    return 0


def _responses_output(body: Mapping, default: int) -> int:
    return _positive_int(body.get("max_output_tokens")) or default


# url -> (prompt walker, output reservation)
_ENDPOINTS = {
    "/v1/chat/completions": (_chat, _chat_output),
    "/v1/completions": (_completions, _completions_output),
    "/v1/embeddings": (_embeddings, _embeddings_output),
    "/v1/responses": (_responses, _responses_output),
}


def _walk(url: str, body: Mapping, default_max_output: int) -> tuple[_Prompt, int]:
    try:
        walk_prompt, reserve_output = _ENDPOINTS[url]
    except (KeyError, TypeError):  # TypeError: an unhashable url
        raise ValueError(
            f"cannot estimate tokens for url {url!r}: expected one of {', '.join(_ENDPOINTS)}"
        ) from None
    if not isinstance(body, Mapping):
        body = {}
    prompt = _Prompt()
    walk_prompt(body, prompt)
    return prompt, reserve_output(body, default_max_output)


def _model(body: Mapping) -> str:
    model = body.get("model") if isinstance(body, Mapping) else None
    return model if isinstance(model, str) else ""  # "" falls back to o200k_base


# --- Public estimates --------------------------------------------------------------


def estimate_tokens(
    url: str, body: Mapping, *, default_max_output: int = DEFAULT_MAX_OUTPUT_TOKENS
) -> TokenEstimate:
    """Estimate the TPM charge of one Batch-API-style request.

    ``url`` is one of /v1/chat/completions, /v1/completions, /v1/embeddings,
    /v1/responses (anything else raises ValueError); ``body`` is the request body.
    Input is prompt text counted with the model's tiktoken encoding plus framing and flat
    media estimates (see the module constants). Output is the request's
    max_completion_tokens / max_tokens / max_output_tokens, or ``default_max_output``
    when it sets none, times ``n`` (chat) or max(n, best_of) (completions); embeddings
    reserve no output. Set max_tokens on requests for accurate budgeting.
    """
    prompt, output_tokens = _walk(url, body, default_max_output)
    enc = encoding_for(_model(body))
    if enc is None:
        text_tokens = sum(_fallback_count(text) for text in prompt.texts)
    else:
        text_tokens = sum(_encoded_length(enc, text) for text in prompt.texts)
    return TokenEstimate(
        input_tokens=text_tokens + prompt.token_ids + prompt.overhead,
        output_tokens=output_tokens,
        exact=enc is not None or not prompt.texts,
    )


def server_charge_estimate(
    url: str, body: Mapping, *, default_max_output: int = DEFAULT_MAX_OUTPUT_TOKENS
) -> int:
    """What OpenAI's admission probably charges: ceil(chars of all prompt text / 4),
    plus any prompt given as token ids, plus the output reservation.

    OpenAI does not tokenise at admission; it is believed to estimate ~4 characters per
    token. Message framing and images/audio/files are left out, since how the server
    prices them there is unknown. Useful as a second opinion when calibrating
    estimate_tokens against the x-ratelimit-remaining-tokens headers.
    """
    prompt, output_tokens = _walk(url, body, default_max_output)
    chars = sum(len(text) for text in prompt.texts)
    return -(-chars // _SERVER_CHARS_PER_TOKEN) + prompt.token_ids + output_tokens
