"""The mock's answers: deterministic texts and vectors, in OpenAI's response bodies."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
import time
from typing import Any

import tiktoken

from batchrun.mock.config import SYSTEM_FINGERPRINT
from batchrun.mock.counting import encoding, output_cap

# Each is exactly one token (with its leading space) in o200k, cl100k and p50k, so the length of
# an answer in tokens is known without encoding it.
FILLER = tuple(
    " " + w
    for w in (
        "the of and to in is it that for on with as was at by be this from or an are not but all "
        "can more one new time will about has so out up what which when your some would there we "
        "they my he she you had if been were first like over also just than then only into other"
    ).split()
)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def reply_pieces(endpoint: str, body: dict, default_max_tokens: int) -> list[str]:
    """The answer as a list of tokens (as text): "mock:<hash12>" then filler words.

    Its length is a deterministic function of the request between half the cap and the cap.
    """
    subject = body["messages"] if endpoint == "chat/completions" else \
        body["input"] if endpoint == "responses" else body["prompt"]
    digest = hashlib.sha256(_canonical(subject)).hexdigest()
    cap = output_cap(body, default_max_tokens)
    low = (cap + 1) // 2
    length = low + int(digest[12:20], 16) % (cap - low + 1)
    enc = encoding(body["model"])
    tokens = enc.encode_ordinary("mock:" + digest[:12])
    if isinstance(enc, tiktoken.Encoding):  # one call for all the tokens (ASCII: each decodes alone)
        head = [b.decode() for b in enc.decode_tokens_bytes(tokens)]
    else:
        head = [enc.decode([t]) for t in tokens]
    if length <= len(head):
        return head[:length]
    start = int(digest[20:28], 16)
    return head + [FILLER[(start + i) % len(FILLER)] for i in range(length - len(head))]


def request_digest(body: dict) -> str:
    """Identifies a request body in the request log (same body, same digest)."""
    return hashlib.sha256(_canonical(body)).hexdigest()[:16]


def reply_text(endpoint: str, body: dict, *, default_max_tokens: int = 64) -> str:
    """The text the mock answers to ``body`` on ``endpoint`` ("chat/completions", "completions" or
    "responses", whose answer is keyed on ``input``).

    ``"mock:" + sha256(canonical JSON of messages or prompt)[:12]`` followed by filler words,
    between half of and the full output cap in tokens (cut inside the prefix for tiny caps).
    Every one of the n choices carries this text. For a list of prompts, the choices of prompt
    i answer ``reply_text(endpoint, {**body, "prompt": prompts[i]})``.
    """
    endpoint = endpoint.strip("/").removeprefix("v1/")
    return "".join(reply_pieces(endpoint, body, default_max_tokens))


def _embedding(item: Any, dims: int) -> list[float]:
    """A deterministic unit vector for one input."""
    raw = hashlib.shake_256(_canonical(item)).digest(2 * dims)
    vector = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{dims}H", raw)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": 1686935002, "owned_by": "openai"}


def new_id(prefix: str) -> str:
    return prefix + os.urandom(15).hex()


def usage_body(endpoint: str, prompt_tokens: int, completion_tokens: int) -> dict:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if endpoint == "chat/completions":
        usage["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": 0}
        usage["completion_tokens_details"] = {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return usage


def completion_body(
    endpoint: str, body: dict, answers: list[list[str]], n: int, cap: int, usage: dict
) -> dict:
    if endpoint == "chat/completions":
        text = "".join(answers[0])
        finish = "length" if len(answers[0]) == cap else "stop"
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
        return {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {"index": i, "message": dict(message), "logprobs": None, "finish_reason": finish}
                for i in range(n)
            ],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
    choices = []
    for pieces in answers:  # prompt i owns choices i*n .. i*n+n-1, as OpenAI orders them
        finish = "length" if len(pieces) == cap else "stop"
        text = "".join(pieces)
        for _ in range(n):
            choices.append(
                {"text": text, "index": len(choices), "logprobs": None, "finish_reason": finish}
            )
    return {
        "id": new_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": body["model"],
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": usage,
    }


def embeddings_body(body: dict, prompts: list, prompt_tokens: int) -> dict:
    dims = body.get("dimensions") or 8
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(prompts):
        vector: Any = _embedding(item, dims)
        if as_base64:  # little-endian float32, as the client decodes it
            vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
