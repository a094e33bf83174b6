"""A mock server's counters, for tests and benchmarks."""

from __future__ import annotations

import time
from collections import deque

from batchrun.mock.config import FAULT_KINDS

PER_SECOND_KEPT = 3600  # an hour of per-second stats buckets: bounded memory for long benchmarks


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
