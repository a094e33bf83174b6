"""Token counting for usage and the admission charge, with tiktoken, independently of batchrun's
own estimator."""

from __future__ import annotations

import json
import logging
import math
from functools import lru_cache
from typing import Any, NamedTuple

import tiktoken

from batchrun.mock.config import MockConfig


class _CharEncoding:
    """Stands in for tiktoken when its files cannot be loaded (no internet, no TIKTOKEN_CACHE_DIR):
    the mock then counts ~4 characters a token, so the demo still runs."""

    @staticmethod
    def encode_ordinary(text: str) -> list[str]:
        return [text[i:i + 4] for i in range(0, len(text), 4)]

    @staticmethod
    def decode(tokens: list[str]) -> str:
        return "".join(tokens)


@lru_cache(maxsize=256)
def encoding(model: str) -> tiktoken.Encoding:
    try:
        try:
            return tiktoken.encoding_for_model(model)
        except KeyError:  # model names newer than the installed tiktoken
            return tiktoken.get_encoding("o200k_base")
    except Exception as exc:  # the encoding file could not be downloaded or read
        _warn_no_tiktoken(exc)
        return _CharEncoding()


@lru_cache(maxsize=1)
def _warn_no_tiktoken(exc: Exception) -> None:
    logging.getLogger("batchrun.mock").warning(
        "mock server: tiktoken could not load its encoding (%s); usage is counted as characters / 4",
        type(exc).__name__)


_token_counts: dict[tuple[str, str], int] = {}  # recurring texts (roles, system prompts): bounded


def _tokens(enc: tiktoken.Encoding, text: str) -> int:
    # encode_ordinary: a prompt containing "<|endoftext|>" is text, not an error
    if len(text) > 4096:
        return len(enc.encode_ordinary(text))
    key = (getattr(enc, "name", "chars"), text)
    n = _token_counts.get(key)
    if n is None:
        n = len(enc.encode_ordinary(text))
        if len(_token_counts) >= 4096:
            _token_counts.clear()
        _token_counts[key] = n
    return n


def _message_values(messages: list) -> list[tuple[str, str]]:
    """(key, text) for every countable value of every message; tool calls count as their JSON."""
    values = []
    for message in messages:
        for key, value in message.items():
            if isinstance(value, str):
                values.append((key, value))
            elif key == "content" and isinstance(value, list):
                values.extend(
                    ("content", part.get("text", ""))
                    for part in value
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                )
            elif value is not None:
                values.append((key, json.dumps(value)))
    return values


def _chat_prompt_tokens(enc: tiktoken.Encoding, body: dict) -> int:
    # OpenAI's cookbook formula for current models: 3 per message, 1 more per name, 3 to prime
    # the reply.
    total = 3 + 3 * len(body["messages"])
    for key, text in _message_values(body["messages"]):
        total += _tokens(enc, text) + (key == "name")
    if body.get("tools"):
        total += _tokens(enc, json.dumps(body["tools"]))
    return total


def _prompts(value: Any) -> list:
    """The separate prompts of a completions/embeddings input: strings or lists of token ids."""
    if isinstance(value, str) or (value and all(isinstance(t, int) for t in value)):
        return [value]
    return list(value)


def _prompt_tokens(enc: tiktoken.Encoding, prompts: list) -> int:
    return sum(len(p) if isinstance(p, list) else _tokens(enc, p) for p in prompts)


def _prompt_chars_estimate(prompts: list) -> int:
    return sum(len(p) if isinstance(p, list) else math.ceil(len(p) / 4) for p in prompts)


def output_cap(body: dict, default_max_tokens: int) -> int:
    return (body.get("max_tokens") or body.get("max_completion_tokens") or body.get("max_output_tokens")
            or default_max_tokens)


class Measure(NamedTuple):
    """What a valid request weighs."""

    prompts: list  # chat: [messages]; completions and embeddings: one entry per prompt
    prompt_tokens: int  # exact (tiktoken), for usage
    charge: int  # tokens the admission takes from the TPM bucket


def measure(endpoint: str, body: dict, n: int, config: MockConfig) -> Measure:
    """The prompts, usage prompt tokens and admission charge of a valid request."""
    enc = encoding(body["model"])
    if endpoint == "chat/completions":
        prompts = [body["messages"]]
        prompt_tokens = _chat_prompt_tokens(enc, body)
        if config.count == "tiktoken":
            estimate = prompt_tokens
        else:
            values = _message_values(body["messages"])
            estimate = math.ceil(sum(len(text) for key, text in values if key != "role") / 4)
    elif endpoint == "responses":
        from batchrun.mock.responses_api import input_texts

        texts = input_texts(body)
        prompts = [body["input"]]
        items = len(body["input"]) if isinstance(body["input"], list) else 1
        prompt_tokens = sum(_tokens(enc, t) for t in texts) + 3 * items  # as chat's 3 a message
        estimate = prompt_tokens if config.count == "tiktoken" else math.ceil(sum(len(t) for t in texts) / 4)
    else:
        prompts = _prompts(body["input" if endpoint == "embeddings" else "prompt"])
        prompt_tokens = _prompt_tokens(enc, prompts)
        estimate = prompt_tokens if config.count == "tiktoken" else _prompt_chars_estimate(prompts)
    charge = estimate
    if endpoint != "embeddings":
        charge += output_cap(body, config.default_max_tokens) * n * len(prompts)
    return Measure(prompts, prompt_tokens, charge)
