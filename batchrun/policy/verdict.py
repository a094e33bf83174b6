"""A verdict on a failed request: what to do with the job (and the batch), and why."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Action", "BATCH_ID_PLACEHOLDER", "KINDS", "Verdict"]


class Action(str, Enum):
    RETRY = "retry"  # requeue the job with backoff
    FAIL = "fail"  # fail this job, do not retry it
    PAUSE = "pause"  # no job can succeed: pause the batch, never mark the job failed


KINDS = frozenset(
    {
        "rate_limit_tokens",
        "rate_limit_requests",
        "rate_limit",
        "request_too_large",
        "quota",
        "auth",
        "permission",
        "bad_request",
        "not_found",
        "unprocessable",
        "timeout",
        "conflict",
        "server_error",
        "connection",
        "stream_broken",
        "stream_truncated",
        "unknown",
    }
)

BATCH_ID_PLACEHOLDER = "BATCH_ID"
"""Appears in PAUSE messages ("run `batchrun resume BATCH_ID`"); the caller knows the real id."""


@dataclass(frozen=True)
class Verdict:
    action: Action
    kind: str
    message: str
    hint: float | None = None  # seconds the server asked us to wait
    budget_exhausted: bool = False  # rate budget empty for everyone sharing it: fleet cooldown
    circuit: bool = False  # upstream unhealthy: counts toward the circuit breaker

    def __post_init__(self) -> None:
        if self.kind not in KINDS:  # catch typos here rather than in dashboards
            raise ValueError(f"unknown verdict kind {self.kind!r}")
