"""OpenAI's rate limits: RPM and TPM token buckets per (API key, model), and their 429 bodies."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

from batchrun.mock.config import ORGANIZATION, MockConfig
from batchrun.mock.errors import error_body

RATE_LIMIT_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."


def ceil_ms(seconds: float) -> int:
    # round() first: 0.084 s is 84.00000000000001 ms in floats, which must not become 85
    return math.ceil(round(max(seconds, 0.0) * 1000, 6))


def go_duration(seconds: float) -> str:
    """Format a duration the way Go (and so OpenAI) does: 84ms, 1.146s, 6m0s, 1m2.5s, 1h2m3s.

    Rounded up to the millisecond, so waiting that long is always enough.
    """
    ms = ceil_ms(seconds)
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


@dataclass
class Refusal:
    """Why a request was refused; its ``body`` is OpenAI's 429."""

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
        return error_body(message, self.kind, None, "rate_limit_exceeded")


class BucketShape(NamedTuple):
    limit: int  # per minute
    capacity: float
    rate: float  # refill per second


class RateLimiter:
    """RPM and TPM token buckets per (API key, model), continuously refilled.

    Reads limits from the live config on every call, so set_config takes effect at once; a
    bucket keeps its level across changes (clamped to the new capacity).
    """

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.buckets: dict[tuple[str, str, str], list[float]] = {}  # -> [level, monotonic stamp]

    def _shape(self, kind: str) -> BucketShape | None:
        """The shape of a bucket kind, None when unlimited."""
        limit = self.config.rpm if kind == "requests" else self.config.tpm
        if limit is None:
            return None
        capacity = limit * self.config.burst_seconds / 60
        if kind == "requests":
            capacity = max(capacity, 1.0)  # a bucket that cannot hold one request would never admit
        return BucketShape(limit, capacity, limit / 60)

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

    def admit(self, key: str, model: str, tokens: int) -> Refusal | None:
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
                return Refusal(kind, limit, 0, amount, 0.0, too_large=True)
            if bucket[0] < amount:
                wait = (amount - bucket[0]) / rate
                if refusal is None or wait > refusal.wait:  # report the bucket that binds longest
                    refusal = Refusal(kind, limit, limit - math.floor(bucket[0]), amount, wait)
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
