"""Fault injection: which fault (if any) an admitted request gets, and the HTTP ones' answers.

Faults are drawn with the server's seeded RNG once per admitted request, so they come after the
charge. The stream faults (STREAM_FAULTS) apply to ``stream: true`` only; streaming.py cuts the
stream for them.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from batchrun.mock.config import FAULT_KINDS, STREAM_FAULTS, MockConfig
from batchrun.mock.errors import INSUFFICIENT_QUOTA, OVERLOADED, SERVER_ERROR
from batchrun.mock.limits import Refusal


class FaultReply(NamedTuple):
    """The answer to a request that an HTTP fault fails."""

    status: int
    payload: dict
    wait: float | None  # a rate-limit 429's wait hint (retry-after headers, request log), else None


def draw_fault(rng: random.Random, rates: dict[str, float], stream: bool) -> str | None:
    """One draw: the first kind whose cumulative rate covers it, or None."""
    if not rates:
        return None
    draw = rng.random()
    cumulative = 0.0
    for kind in FAULT_KINDS:
        if kind in STREAM_FAULTS and not stream:
            continue
        cumulative += rates.get(kind, 0.0)
        if draw < cumulative:
            return kind
    return None


def http_fault_reply(fault: str, model: str, config: MockConfig, rng: random.Random) -> FaultReply:
    """The answer of an HTTP_FAULTS kind."""
    if fault == "500":
        return FaultReply(500, SERVER_ERROR, None)
    if fault == "503":
        return FaultReply(503, OVERLOADED, None)
    if fault == "insufficient_quota":
        return FaultReply(429, INSUFFICIENT_QUOTA, None)
    # A rate-limit 429 the buckets did not predict, as when other clients share the key.
    limit = config.rpm or 10_000
    wait = rng.randint(20, 500) / 1000
    refusal = Refusal("requests", limit, limit, 1, wait)
    return FaultReply(429, refusal.body(model), wait)
