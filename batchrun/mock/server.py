"""An OpenAI-compatible mock server for tests and benchmarks.

It speaks OpenAI's wire formats (bodies, SSE chunks, errors, headers), so the real ``openai``
client, or any other, can be pointed at it::

    with MockServerThread(MockConfig(rpm=60, tpm=10_000)) as srv:
        client = AsyncOpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)

Endpoints: ``POST /v1/chat/completions`` (JSON or ``stream: true`` SSE), ``POST /v1/completions``,
``POST /v1/embeddings``, ``GET /v1/models``; plus ``GET /_mock/stats``, ``POST /_mock/reset`` and
``POST /_mock/config`` (JSON of MockConfig fields to change) for tests and benchmarks.

Rate limits, as OpenAI applies them, per (API key, model):

* Two token buckets, requests (RPM) and tokens (TPM). A bucket holds ``limit * burst_seconds / 60``
  (at least one request), starts full and refills continuously at ``limit / 60`` per second.
* Admission charges 1 request and ``prompt estimate + output cap * n`` tokens, where the prompt
  estimate is ceil(prompt characters / 4) (``count="chars"``, OpenAI's documented estimate; for chat
  the characters of every message value except ``role``) or the exact tiktoken count
  (``count="tiktoken"``); token-id inputs count as their length. The output cap is ``max_tokens``,
  else ``max_completion_tokens``, else ``default_max_tokens``. Embeddings charge the prompt only.
* The charge is NOT refunded when the answer is shorter than the cap, nor when an injected fault
  fails the request after admission: that is how OpenAI's TPM limits behave.
* A request that does not fit is refused with OpenAI's 429 body and charges nothing. When both
  buckets are short, the one with the longer wait is reported, so "Please try again in X" is
  the exact time until the request fits both. A request charging more tokens than the bucket holds
  gets "Request too large", which no wait can fix.
* Every response carries ``x-ratelimit-*`` headers for the configured limits (reset = time until
  the bucket is full again) and ``x-request-id``.

Faults (``error_rates``) are drawn with the seeded RNG once per admitted request, so they come
after the charge: HTTP 500/503/429/insufficient_quota, and for ``stream: true`` only, a stream that
breaks halfway (disconnect, truncate without a finish_reason, or an SSE error event).

Answers are deterministic: see ``reply_text``. ``usage`` is counted with tiktoken, independently
of batchrun's own estimator.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import math
import os
import random
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import click
import tiktoken
from aiohttp import web

__all__ = [
    "FAULT_KINDS",
    "MockConfig",
    "MockServerThread",
    "create_app",
    "go_duration",
    "mock_server_command",
    "reply_text",
    "serve",
]

ORGANIZATION = "org-mock"
SYSTEM_FINGERPRINT = "fp_6d6f636b00"
RATE_LIMIT_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."
# Order matters: one random draw per request picks the first kind whose cumulative rate covers it.
HTTP_FAULTS = ("500", "503", "429", "insufficient_quota")
STREAM_FAULTS = ("stream_disconnect", "stream_truncate", "stream_error")
FAULT_KINDS = HTTP_FAULTS + STREAM_FAULTS
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-3.5-turbo-instruct", "text-embedding-3-small")
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
PER_SECOND_KEPT = 3600  # an hour of per-second stats buckets: bounded memory for long benchmarks


@dataclass
class MockConfig:
    """How the mock behaves; change it at run time with MockServerThread.set_config."""

    rpm: int | None = None  # requests per minute, None = unlimited
    tpm: int | None = None  # tokens per minute, None = unlimited
    burst_seconds: float = 60.0  # bucket capacity = limit * burst_seconds / 60
    latency_ms: float = 0
    latency_per_token_ms: float = 0  # per output token
    error_rates: dict[str, float] = field(default_factory=dict)  # FAULT_KINDS -> probability
    count: str = "chars"  # admission prompt estimate: "chars" (chars/4) or "tiktoken"
    seed: int | None = None
    retry_after_header: bool = False  # 429s also carry retry-after-ms / retry-after
    default_max_tokens: int = 64  # output cap when the request sets none
    log_requests: bool = False  # keep (time, request digest, status, wait hint) per request, for tests

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.burst_seconds <= 0:
            raise ValueError(f"burst_seconds must be > 0, got {self.burst_seconds!r}")
        if self.count not in ("chars", "tiktoken"):
            raise ValueError(f"count must be 'chars' or 'tiktoken', got {self.count!r}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens!r}")
        for kind, rate in self.error_rates.items():
            if kind not in FAULT_KINDS:
                raise ValueError(
                    f"unknown error kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}"
                )
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"error rate for {kind} must be within [0, 1], got {rate!r}")


# --- small helpers -------------------------------------------------------------------------------


def _ceil_ms(seconds: float) -> int:
    # round() first: 0.084 s is 84.00000000000001 ms in floats, which must not become 85
    return math.ceil(round(max(seconds, 0.0) * 1000, 6))


def go_duration(seconds: float) -> str:
    """Format a duration the way Go (and so OpenAI) does: 84ms, 1.146s, 6m0s, 1m2.5s, 1h2m3s.

    Rounded up to the millisecond, so waiting that long is always enough.
    """
    ms = _ceil_ms(seconds)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms // 1000}.{ms % 1000:03d}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


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
def _encoding(model: str) -> tiktoken.Encoding:
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
    import logging

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


def _output_cap(body: dict, default_max_tokens: int) -> int:
    return body.get("max_tokens") or body.get("max_completion_tokens") or default_max_tokens


def _reply_pieces(endpoint: str, body: dict, default_max_tokens: int) -> list[str]:
    """The answer as a list of tokens (as text): "mock:<hash12>" then filler words.

    Its length is a deterministic function of the request between half the cap and the cap.
    """
    subject = body["messages"] if endpoint == "chat/completions" else body["prompt"]
    digest = hashlib.sha256(_canonical(subject)).hexdigest()
    cap = _output_cap(body, default_max_tokens)
    low = (cap + 1) // 2
    length = low + int(digest[12:20], 16) % (cap - low + 1)
    enc = _encoding(body["model"])
    tokens = enc.encode_ordinary("mock:" + digest[:12])
    if isinstance(enc, tiktoken.Encoding):  # one call for all the tokens (ASCII: each decodes alone)
        head = [b.decode() for b in enc.decode_tokens_bytes(tokens)]
    else:
        head = [enc.decode([t]) for t in tokens]
    if length <= len(head):
        return head[:length]
    start = int(digest[20:28], 16)
    return head + [FILLER[(start + i) % len(FILLER)] for i in range(length - len(head))]


MOCK_DIGEST = web.RequestKey("mock_digest", str)  # for the request log
MOCK_WAIT = web.ResponseKey("mock_wait", float)


def request_digest(body: dict) -> str:
    """Identifies a request body in the request log (same body, same digest)."""
    return hashlib.sha256(_canonical(body)).hexdigest()[:16]


def reply_text(endpoint: str, body: dict, *, default_max_tokens: int = 64) -> str:
    """The text the mock answers to ``body`` on ``endpoint`` ("chat/completions" or "completions").

    ``"mock:" + sha256(canonical JSON of messages or prompt)[:12]`` followed by filler words,
    between half of and the full output cap in tokens (cut inside the prefix for tiny caps).
    Every one of the n choices carries this text. For a list of prompts, the choices of prompt
    i answer ``reply_text(endpoint, {**body, "prompt": prompts[i]})``.
    """
    endpoint = endpoint.strip("/").removeprefix("v1/")
    return "".join(_reply_pieces(endpoint, body, default_max_tokens))


def _error(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _invalid(message: str, param: str | None = None, code: str | None = None) -> dict:
    return _error(message, "invalid_request_error", param, code)


SERVER_ERROR = _error(
    "The server had an error while processing your request. Sorry about that!", "server_error"
)
OVERLOADED = _error("The engine is currently overloaded, please try again later.", "server_error")
INSUFFICIENT_QUOTA = _error(
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors.",
    "insufficient_quota",
    None,
    "insufficient_quota",
)
MISSING_KEY = _invalid(
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (i.e. "
    "Authorization: YOUR_KEY) when using HTTP Basic auth. You can obtain an API key from "
    "https://platform.openai.com/account/api-keys.",
    code="invalid_api_key",
)
BAD_JSON = _invalid(
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
    "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
    "not valid JSON. If you have trouble figuring out how to fix this, please contact us through "
    "our help center at help.openai.com.)"
)
JSON_TYPES = {
    str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"
}


def _json_type(value: Any) -> str:
    return "null" if value is None else JSON_TYPES.get(type(value), "object")


def _check_int(body: dict, name: str, minimum: int, maximum: int | None = None) -> dict | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        return _invalid(
            f"Invalid type for '{name}': expected an integer, but got {_json_type(value)} instead.",
            name,
            "invalid_type",
        )
    if value < minimum:
        return _invalid(
            f"Invalid '{name}': integer below minimum value. Expected a value >= {minimum}, "
            f"but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    if maximum is not None and value > maximum:
        return _invalid(
            f"Invalid '{name}': integer above maximum value. Expected a value <= {maximum}, "
            f"but got {value} instead.",
            name,
            "integer_above_max_value",
        )
    return None


def _check_input(body: dict, name: str) -> dict | None:
    """A prompt/input: a string, a list of strings, a list of token ids or a list of such lists."""
    if name not in body:
        return _invalid(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")
    value = body[name]
    if isinstance(value, str):
        return None
    if isinstance(value, list):
        if not value:
            return _invalid(f"[] is too short - '{name}'")
        if all(isinstance(v, str) for v in value) or all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return None
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return None
    return _invalid(
        f"Invalid type for '{name}': expected a string or an array of strings or tokens, "
        f"but got {_json_type(value)} instead.",
        name,
        "invalid_type",
    )


def _validate(endpoint: str, body: dict) -> dict | None:
    """OpenAI's 400 body for the first problem of the request, or None."""
    if not body.get("model") or not isinstance(body["model"], str):
        return _invalid("you must provide a model parameter")
    if endpoint == "embeddings":
        if body.get("encoding_format", "float") not in ("float", "base64"):
            return _invalid(
                f"Invalid value for 'encoding_format': must be 'float' or 'base64', got "
                f"{body['encoding_format']!r}.",
                "encoding_format",
                "invalid_value",
            )
        return _check_input(body, "input") or _check_int(body, "dimensions", 1, 3072)
    if endpoint == "chat/completions":
        if "messages" not in body:
            return _invalid(
                "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
            )
        messages = body["messages"]
        if not isinstance(messages, list):
            return _invalid(
                f"Invalid type for 'messages': expected an array of objects, but got "
                f"{_json_type(messages)} instead.",
                "messages",
                "invalid_type",
            )
        if not messages:
            return _invalid("[] is too short - 'messages'")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                return _invalid(
                    f"Invalid type for 'messages[{i}]': expected an object, but got "
                    f"{_json_type(message)} instead.",
                    f"messages[{i}]",
                    "invalid_type",
                )
            if "role" not in message:
                return _invalid(
                    f"Missing required parameter: 'messages[{i}].role'.",
                    f"messages[{i}].role",
                    "missing_required_parameter",
                )
    else:
        problem = _check_input(body, "prompt")
        if problem:
            return problem
    if body.get("stream_options") is not None and not body.get("stream"):
        return _invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
            "invalid_value",
        )
    return (
        _check_int(body, "max_tokens", 1)
        or _check_int(body, "max_completion_tokens", 1)
        or _check_int(body, "n", 1, 128)
    )


def _embedding(item: Any, dims: int) -> list[float]:
    """A deterministic unit vector for one input."""
    raw = hashlib.shake_256(_canonical(item)).digest(2 * dims)
    vector = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{dims}H", raw)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


# --- rate limits ---------------------------------------------------------------------------------


@dataclass
class _Refusal:
    kind: str  # "requests" or "tokens"
    limit: int
    used: int
    requested: int
    wait: float  # seconds until the request fits; 0 when it never will (too large)
    too_large: bool = False

    def body(self, model: str) -> dict:
        unit = "requests per min (RPM)" if self.kind == "requests" else "tokens per min (TPM)"
        where = f"for {model} in organization {ORGANIZATION} on {unit}"
        if self.too_large:
            message = (
                f"Request too large {where}: Limit {self.limit}, Requested {self.requested}. "
                f"The input or output tokens must be reduced in order to run successfully. "
                f"{RATE_LIMIT_DOCS}"
            )
        else:
            message = (
                f"Rate limit reached {where}: Limit {self.limit}, Used {self.used}, "
                f"Requested {self.requested}. Please try again in {go_duration(self.wait)}. "
                f"{RATE_LIMIT_DOCS}"
            )
        return _error(message, self.kind, None, "rate_limit_exceeded")


class RateLimiter:
    """RPM and TPM token buckets per (API key, model), continuously refilled.

    Reads limits from the live config on every call, so set_config takes effect at once; a
    bucket keeps its level across changes (clamped to the new capacity).
    """

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.buckets: dict[tuple[str, str, str], list[float]] = {}  # -> [level, monotonic stamp]

    def _shape(self, kind: str) -> tuple[int, float, float] | None:
        """(limit, capacity, refill per second) of a bucket kind, None when unlimited."""
        limit = self.config.rpm if kind == "requests" else self.config.tpm
        if limit is None:
            return None
        capacity = limit * self.config.burst_seconds / 60
        if kind == "requests":
            capacity = max(capacity, 1.0)  # a bucket that cannot hold one request would never admit
        return limit, capacity, limit / 60

    def _level(
        self, key: str, model: str, kind: str, capacity: float, rate: float, now: float
    ) -> list[float]:
        """The bucket, refilled up to now."""
        bucket = self.buckets.get((key, model, kind))
        if bucket is None:
            bucket = self.buckets[(key, model, kind)] = [capacity, now]
        else:
            bucket[0] = min(capacity, bucket[0] + (now - bucket[1]) * rate)
            bucket[1] = now
        return bucket

    def admit(self, key: str, model: str, tokens: int) -> _Refusal | None:
        """Take 1 request and ``tokens`` tokens, or refuse (charging nothing)."""
        now = time.monotonic()
        taken = []
        refusal = None
        for kind, amount in (("requests", 1), ("tokens", tokens)):
            shape = self._shape(kind)
            if shape is None:
                continue
            limit, capacity, rate = shape
            bucket = self._level(key, model, kind, capacity, rate, now)
            if amount > capacity:
                return _Refusal(kind, limit, 0, amount, 0.0, too_large=True)
            if bucket[0] < amount:
                wait = (amount - bucket[0]) / rate
                if refusal is None or wait > refusal.wait:  # report the bucket that binds longest
                    refusal = _Refusal(kind, limit, limit - math.floor(bucket[0]), amount, wait)
            taken.append((bucket, amount))
        if refusal is not None:
            return refusal
        for bucket, amount in taken:
            bucket[0] -= amount
        return None

    def headers(self, key: str | None, model: str | None) -> dict[str, str]:
        headers = {}
        now = time.monotonic()
        for kind in ("requests", "tokens"):
            shape = self._shape(kind)
            if shape is None:
                continue
            limit, capacity, rate = shape
            if key is None or model is None:  # no bucket applies (401, /v1/models): a full one
                level = capacity
            else:
                level = self._level(key, model, kind, capacity, rate, now)[0]
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(math.floor(level))
            headers[f"x-ratelimit-reset-{kind}"] = go_duration((capacity - level) / rate)
        return headers


# --- statistics ----------------------------------------------------------------------------------


class Stats:
    """Counters for tests and benchmarks, bounded in memory (per-second buckets, not a log)."""

    def __init__(self) -> None:
        self.requests = 0
        self.requests_admitted = 0
        self.by_status: dict[int, int] = {}
        self.tokens_charged = 0
        self.completion_tokens = 0
        self.rate_limited = {"requests": 0, "tokens": 0, "too_large": 0}
        self.faults = dict.fromkeys(FAULT_KINDS, 0)
        self.per_second: deque[list[int]] = deque(maxlen=PER_SECOND_KEPT)
        self.log: list[list] = []  # with MockConfig.log_requests: [unix time, request digest, status, wait]

    def admitted(self, tokens: int) -> None:
        self.requests_admitted += 1
        self.tokens_charged += tokens
        bucket = self._this_second()
        bucket[1] += 1
        bucket[2] += tokens

    def refused(self) -> None:
        self._this_second()[3] += 1

    def _this_second(self) -> list[int]:
        """[unix second, requests admitted, tokens charged, requests refused by the rate limits]"""
        second = int(time.time())
        if not self.per_second or self.per_second[-1][0] != second:
            self.per_second.append([second, 0, 0, 0])
        return self.per_second[-1]

    def snapshot(self) -> dict:
        return {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "requests_admitted": self.requests_admitted,
            "tokens_charged": self.tokens_charged,
            "completion_tokens": self.completion_tokens,
            "rate_limited": dict(self.rate_limited),
            "faults": dict(self.faults),
            "per_second": [list(s) for s in self.per_second],
            "log": [list(entry) for entry in self.log],
        }


# --- the server ----------------------------------------------------------------------------------


class MockOpenAI:
    """State and request handlers of one mock server; lives in the event loop's thread."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.limiter = RateLimiter(config)
        self.stats = Stats()
        self.rng = random.Random(config.seed)

    def configure(self, config: MockConfig) -> None:
        if config.seed != self.config.seed:
            self.rng = random.Random(config.seed)
        self.config = self.limiter.config = config

    def reset(self) -> None:
        self.stats = Stats()
        self.limiter.buckets.clear()
        self.rng = random.Random(self.config.seed)

    # responses

    def _headers(self, key: str | None, model: str | None) -> dict[str, str]:
        headers = self.limiter.headers(key, model)
        headers["x-request-id"] = "req_" + os.urandom(16).hex()
        return headers

    def _json(self, status: int, payload: dict, headers: dict[str, str]) -> web.Response:
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
        return web.Response(
            body=json.dumps(payload).encode(),
            status=status,
            headers=headers,
            content_type="application/json",
        )

    def _rate_limited(self, payload: dict, headers: dict[str, str], wait: float | None) -> web.Response:
        if wait is not None and self.config.retry_after_header:
            headers["retry-after-ms"] = str(_ceil_ms(wait))
            headers["retry-after"] = str(math.ceil(_ceil_ms(wait) / 1000))  # whole seconds
        response = self._json(429, payload, headers)
        response[MOCK_WAIT] = wait  # for the request log
        return response

    # request handling

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every POST /v1/{chat/completions,completions,embeddings} comes through here."""
        if not self.config.log_requests:
            return await self._handle(request)
        arrived = time.time()
        response = await self._handle(request)
        digest = request.get(MOCK_DIGEST)
        self.stats.log.append([arrived, digest, response.status, response.get(MOCK_WAIT)])
        return response

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        endpoint = request.match_info["endpoint"]
        key = _bearer_key(request)
        if key is None:
            return self._json(401, MISSING_KEY, self._headers(None, None))
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self._json(400, BAD_JSON, self._headers(None, None))
        if self.config.log_requests:
            request[MOCK_DIGEST] = request_digest(body)
        problem = _validate(endpoint, body)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        if problem:
            return self._json(400, problem, self._headers(key, model))

        n = body.get("n") or 1
        prompts, prompt_tokens, charge = self._measure(endpoint, body, n)
        refusal = self.limiter.admit(key, model, charge)
        if refusal is not None:
            self.stats.rate_limited["too_large" if refusal.too_large else refusal.kind] += 1
            self.stats.refused()
            wait = None if refusal.too_large else refusal.wait
            return self._rate_limited(refusal.body(model), self._headers(key, model), wait)
        self.stats.admitted(charge)

        stream = bool(body.get("stream")) and endpoint != "embeddings"
        fault = self._draw_fault(stream)
        if fault:
            self.stats.faults[fault] += 1
        if fault in HTTP_FAULTS:
            return self._http_fault(fault, key, model)
        if endpoint == "embeddings":
            payload = _embeddings_body(body, prompts, prompt_tokens)
            return self._json(200, payload, self._headers(key, model))

        cap = _output_cap(body, self.config.default_max_tokens)
        if endpoint == "chat/completions":
            answers = [_reply_pieces(endpoint, body, self.config.default_max_tokens)]
        else:  # one answer per prompt
            default = self.config.default_max_tokens
            answers = [_reply_pieces(endpoint, {**body, "prompt": p}, default) for p in prompts]
        usage = _usage(endpoint, prompt_tokens, sum(len(a) for a in answers) * n)
        self.stats.completion_tokens += usage["completion_tokens"]
        if stream:
            return await self._stream(request, endpoint, body, answers, n, cap, usage, fault, key)
        delay = self.config.latency_ms + self.config.latency_per_token_ms * usage["completion_tokens"]
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        payload = _completion_body(endpoint, body, answers, n, cap, usage)
        return self._json(200, payload, self._headers(key, model))

    def _measure(self, endpoint: str, body: dict, n: int) -> tuple[list, int, int]:
        """(prompts, prompt tokens for usage, admission charge) of a valid request."""
        config = self.config
        enc = _encoding(body["model"])
        if endpoint == "chat/completions":
            prompts = [body["messages"]]
            prompt_tokens = _chat_prompt_tokens(enc, body)
            if config.count == "tiktoken":
                estimate = prompt_tokens
            else:
                values = _message_values(body["messages"])
                estimate = math.ceil(sum(len(text) for key, text in values if key != "role") / 4)
        else:
            prompts = _prompts(body["input" if endpoint == "embeddings" else "prompt"])
            prompt_tokens = _prompt_tokens(enc, prompts)
            estimate = prompt_tokens if config.count == "tiktoken" else _prompt_chars_estimate(prompts)
        charge = estimate
        if endpoint != "embeddings":
            charge += _output_cap(body, config.default_max_tokens) * n * len(prompts)
        return prompts, prompt_tokens, charge

    def _draw_fault(self, stream: bool) -> str | None:
        rates = self.config.error_rates
        if not rates:
            return None
        draw = self.rng.random()
        cumulative = 0.0
        for kind in FAULT_KINDS:
            if kind in STREAM_FAULTS and not stream:
                continue
            cumulative += rates.get(kind, 0.0)
            if draw < cumulative:
                return kind
        return None

    def _http_fault(self, fault: str, key: str, model: str) -> web.Response:
        headers = self._headers(key, model)
        if fault == "500":
            return self._json(500, SERVER_ERROR, headers)
        if fault == "503":
            return self._json(503, OVERLOADED, headers)
        if fault == "insufficient_quota":
            return self._json(429, INSUFFICIENT_QUOTA, headers)
        # A rate-limit 429 the buckets did not predict, as when other clients share the key.
        limit = self.config.rpm or 10_000
        wait = self.rng.randint(20, 500) / 1000
        refusal = _Refusal("requests", limit, limit, 1, wait)
        return self._rate_limited(refusal.body(model), headers, wait)

    async def _stream(
        self,
        request: web.Request,
        endpoint: str,
        body: dict,
        answers: list[list[str]],
        n: int,
        cap: int,
        usage: dict,
        fault: str | None,
        key: str,
    ) -> web.StreamResponse:
        config = self.config
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        head, content, tail = _stream_events(endpoint, body, answers, n, cap, usage, include_usage)
        events = head + content
        if fault:  # cut the stream halfway through the content
            events = head + content[: len(content) // 2]
        elif tail:
            events = events + tail
        if fault != "stream_disconnect" and fault != "stream_error":
            events.append(b"data: [DONE]\n\n")
        if fault == "stream_error":
            events.append(b"data: " + json.dumps(SERVER_ERROR).encode() + b"\n\n")

        # Headers go out with the first token, as OpenAI's do: after the time to first token.
        if config.latency_ms > 0:
            await asyncio.sleep(config.latency_ms / 1000)
        response = web.StreamResponse(status=200, headers=self._headers(key, body["model"]))
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        self.stats.by_status[200] = self.stats.by_status.get(200, 0) + 1
        try:
            await response.prepare(request)
            spread = config.latency_per_token_ms * usage["completion_tokens"] / 1000
            per_event = spread / max(len(content), 1)
            await _send_paced(response, events, per_event)
            if fault == "stream_disconnect":
                # Close without the chunked-encoding terminator: the client sees a broken body.
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
        except ConnectionError:  # the client went away; nothing left to tell it
            pass
        return response

    # the other endpoints

    async def models(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        if _bearer_key(request) is None:
            return self._json(401, MISSING_KEY, self._headers(None, None))
        name = request.match_info.get("model")
        if name is not None:
            return self._json(200, _model_object(name), self._headers(None, None))
        payload = {"object": "list", "data": [_model_object(m) for m in MODELS]}
        return self._json(200, payload, self._headers(None, None))

    async def not_found(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        payload = _invalid(f"Invalid URL ({request.method} {request.path})")
        return self._json(404, payload, self._headers(None, None))

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.snapshot())

    async def post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def post_config(self, request: web.Request) -> web.Response:
        try:
            self.configure(dataclasses.replace(self.config, **await request.json()))
        except (TypeError, ValueError) as exc:
            return web.json_response(_invalid(str(exc)), status=400)
        return web.json_response(dataclasses.asdict(self.config))


def _bearer_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, key = auth.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def _model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": 1686935002, "owned_by": "openai"}


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(15).hex()


def _usage(endpoint: str, prompt_tokens: int, completion_tokens: int) -> dict:
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


def _completion_body(
    endpoint: str, body: dict, answers: list[list[str]], n: int, cap: int, usage: dict
) -> dict:
    if endpoint == "chat/completions":
        text = "".join(answers[0])
        finish = "length" if len(answers[0]) == cap else "stop"
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
        return {
            "id": _new_id("chatcmpl-"),
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
        "id": _new_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": body["model"],
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": usage,
    }


def _embeddings_body(body: dict, prompts: list, prompt_tokens: int) -> dict:
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


def _stream_events(
    endpoint: str,
    body: dict,
    answers: list[list[str]],
    n: int,
    cap: int,
    usage: dict,
    include_usage: bool,
) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """SSE events of a stream: (opening, one per token and choice, finish + usage)."""
    chat = endpoint == "chat/completions"
    base: dict[str, Any] = {
        "id": _new_id("chatcmpl-" if chat else "cmpl-"),
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
    return head, content, tail


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


MOCK_KEY = web.AppKey("mock", MockOpenAI)


def create_app(config: MockConfig) -> web.Application:
    """The aiohttp application of a mock server with ``config``."""
    mock = MockOpenAI(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)  # bulk embedding inputs are large
    app[MOCK_KEY] = mock
    app.router.add_post("/v1/{endpoint:chat/completions|completions|embeddings}", mock.handle)
    app.router.add_get("/v1/models", mock.models)
    app.router.add_get("/v1/models/{model}", mock.models)
    app.router.add_get("/_mock/stats", mock.get_stats)
    app.router.add_post("/_mock/reset", mock.post_reset)
    app.router.add_post("/_mock/config", mock.post_config)
    app.router.add_route("*", "/{tail:.*}", mock.not_found)

    async def warm_up(app: web.Application) -> None:
        _encoding("gpt-4o-mini")  # load o200k now, not during the first timed request

    app.on_startup.append(warm_up)
    return app


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    # No access log: per-request logging would cost more than the request itself.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]


class MockServerThread:
    """Runs a mock server in a background thread on 127.0.0.1 and a free port.

    ::

        with MockServerThread(rpm=60) as srv:
            OpenAI(base_url=srv.base_url, api_key="sk-test")
    """

    def __init__(
        self, config: MockConfig | None = None, *, host: str = "127.0.0.1", port: int = 0, **changes: Any
    ) -> None:
        self.config = dataclasses.replace(config or MockConfig(), **changes)
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._mock: MockOpenAI | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> MockServerThread:
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, failure), name="mock-openai", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        app = create_app(self.config)
        self._mock = app[MOCK_KEY]
        try:
            runner, self.port = loop.run_until_complete(_start(app, self.host, self.port))
        except BaseException as exc:  # e.g. port in use: re-raised in start()
            failure.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            # Requests still being answered (a slow latency) end with the server, quietly.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    def _call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` in the server's loop, where all its state lives, and return the result."""

        async def call() -> Any:
            return fn(*args)

        assert self._loop is not None, "server not started"
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=10)

    def stats(self) -> dict:
        return self._call(lambda: self._mock.stats.snapshot())

    def reset(self) -> None:
        self._call(lambda: self._mock.reset())

    def set_config(self, **changes: Any) -> None:
        """Change config fields while the server runs, e.g. ``set_config(error_rates={"500": 1.0})``."""
        self.config = dataclasses.replace(self.config, **changes)  # validates before touching the server
        if self._loop is not None:
            self._call(self._mock.configure, self.config)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop = self._thread = None

    def __enter__(self) -> MockServerThread:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def serve(host: str, port: int, config: MockConfig) -> None:
    """Serve until Ctrl-C (blocking)."""

    async def main() -> None:
        runner, bound = await _start(create_app(config), host, port)
        rpm = config.rpm or "unlimited"
        tpm = config.tpm or "unlimited"
        print(f"mock OpenAI server on http://{host}:{bound}/v1 (rpm={rpm}, tpm={tpm})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


def _parse_error_rates(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    rates = {}
    for value in values:
        kind, sep, rate = value.partition("=")
        try:
            if not sep or kind not in FAULT_KINDS:
                raise ValueError
            rates[kind] = float(rate)
            if not 0.0 <= rates[kind] <= 1.0:
                raise ValueError
        except ValueError:
            raise click.BadParameter(
                f"{value!r}: expected KIND=P with KIND one of {', '.join(FAULT_KINDS)} and P in [0, 1]",
                ctx=ctx,
                param=param,
            ) from None
    return rates


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value):  # NaN and the infinities pass FloatRange's checks
        raise click.BadParameter(f"{value!r} is not a finite number", ctx=ctx, param=param)
    return value


@click.command("mock-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
    help="Port to listen on (0 picks a free one)."
)
@click.option(
    "--rpm",
    type=click.IntRange(min=1),
    help="Requests per minute, per API key and model, as OpenAI counts them [default: unlimited].",
)
@click.option(
    "--tpm",
    type=click.IntRange(min=1),
    help="Tokens per minute, per API key and model; a request is charged its prompt estimate plus "
    "max_tokens x n at admission [default: unlimited].",
)
@click.option(
    "--burst-seconds",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    callback=_finite,
    help="Bucket capacity in seconds of refill: limit * BURST / 60 can be spent at once.",
)
@click.option("--latency-ms", default=0.0, show_default=True, type=click.FloatRange(0), callback=_finite,
              help="Time to first token.")
@click.option(
    "--latency-per-token-ms",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    callback=_finite,
    help="Extra time per output token (streams spread it over their chunks).",
)
@click.option(
    "--error-rate",
    "error_rate",
    multiple=True,
    callback=_parse_error_rates,
    metavar="KIND=P",
    help=f"Inject a fault with probability P; repeatable. KIND: {', '.join(FAULT_KINDS)}. "
    "Example: --error-rate 500=0.05 --error-rate stream_disconnect=0.02",
)
@click.option(
    "--count",
    type=click.Choice(["chars", "tiktoken"]),
    default="chars",
    show_default=True,
    help="How admission estimates prompt tokens: chars/4 (as OpenAI does) or exact tiktoken.",
)
@click.option(
    "--default-max-tokens",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Output cap of requests that set no max_tokens.",
)
@click.option("--seed", type=int, help="Seed for fault injection, for reproducible runs.")
@click.option(
    "--retry-after-header",
    is_flag=True,
    help="Add retry-after-ms and retry-after headers to rate-limit 429s (OpenAI sends them only sometimes).",
)
def mock_server_command(
    host: str,
    port: int,
    rpm: int | None,
    tpm: int | None,
    burst_seconds: float,
    latency_ms: float,
    latency_per_token_ms: float,
    error_rate: dict[str, float],
    count: str,
    default_max_tokens: int,
    seed: int | None,
    retry_after_header: bool,
) -> None:
    """Run an OpenAI-compatible mock server with OpenAI's rate limits and injectable faults."""
    config = MockConfig(
        rpm=rpm,
        tpm=tpm,
        burst_seconds=burst_seconds,
        latency_ms=latency_ms,
        latency_per_token_ms=latency_per_token_ms,
        error_rates=error_rate,
        count=count,
        seed=seed,
        retry_after_header=retry_after_header,
        default_max_tokens=default_max_tokens,
    )
    try:
        serve(host, port, config)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        import errno

        raise click.BadParameter(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port (0: any free one)"
            + (" or --host" if exc.errno != errno.EADDRINUSE else ""),
            param_hint="--port",
        ) from None
