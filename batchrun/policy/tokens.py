"""Estimate what a request costs against the account's tokens-per-minute (TPM) limit.

OpenAI admits a request by charging its estimated prompt tokens plus its output
reservation (``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``, times
``n``) against the TPM budget. batchrun must reserve the same amount *before* sending,
so every estimate here leans conservative: counting a little too much costs a little
throughput, counting too little earns 429s for the whole fleet.

Prompt text is counted with tiktoken. When tiktoken cannot load its encoding (no cache
and no internet, as behind a firewall) we fall back to ``ceil(chars / 3)``, which
over-counts English (OpenAI's rule of thumb is ~4 chars per token), and say so once in
the log. What of a body is prompt (texts, token ids, framing and media figures) is found by
prompts.py; this module counts it.

Everything is pure: no Redis, no HTTP.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import tiktoken
from tiktoken.model import encoding_name_for_model

# The framing and media figures are re-exported: callers read them with the estimates.
from batchrun.policy.prompts import (
    AUDIO_TOKENS,
    FILE_TOKENS,
    IMAGE_TOKENS,
    IMAGE_TOKENS_LOW_DETAIL,
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_ITEM,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    TOKENS_PER_TOOL,
    TOKENS_PER_TOOL_CALL,
    TOOLS_BLOCK_TOKENS,
    walk_request,
)

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
    """ceil(len / 3): over-counts English prose, though dense code and non-Latin scripts can still
    exceed it (Russian runs ~1 token per 2 chars in cl100k_base)."""
    return -(-len(text) // _FALLBACK_CHARS_PER_TOKEN)  # ceil without floats


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
    media estimates (see the constants of policy/prompts.py). Output is the request's
    max_completion_tokens / max_tokens / max_output_tokens, or ``default_max_output``
    when it sets none, times ``n`` (chat) or max(n, best_of) (completions); embeddings
    reserve no output. Set max_tokens on requests for accurate budgeting.
    """
    prompt, output_tokens = walk_request(url, body, default_max_output)
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
    prices them there is unknown. The budget counts a request's input as the larger of
    this and estimate_tokens' input.
    """
    prompt, output_tokens = walk_request(url, body, default_max_output)
    chars = sum(len(text) for text in prompt.texts)
    return -(-chars // _SERVER_CHARS_PER_TOKEN) + prompt.token_ids + output_tokens
