"""--via auto: how many of a batch's jobs live sending can carry before its deadline (the rest go
through the Batch API at half price). Pure.

Live sending is bounded by the batch's own limits (--rpm, --tpm): in ``seconds`` it can send at
most rpm × seconds / 60 requests and tpm × seconds / 60 tokens. The live share is the smaller of
the two, in jobs of the batch's average charge, times a headroom (0.6) for retries, the budget's ramp-up and
the limits' burst; without a limit the live budget is not known to end, and every job goes live.
"""

from __future__ import annotations

import math

HEADROOM = 0.6


def live_share(jobs: int, avg_tokens: float, rpm: int, tpm: int, seconds: float,
               headroom: float = HEADROOM) -> int:
    """Jobs (0..jobs) to send live so that they end by the deadline ``seconds`` from now."""
    if jobs <= 0:
        return 0
    if seconds <= 0:
        return 0
    caps = []
    if rpm > 0:
        caps.append(rpm * seconds / 60)
    if tpm > 0:
        caps.append(tpm * seconds / 60 / max(avg_tokens, 1.0))
    if not caps:
        return jobs
    return max(0, min(jobs, math.floor(min(caps) * headroom)))


def request_tokens(raw_request_len: int, max_tokens: int) -> float:
    """A job's charge against TPM, roughly: its JSON's characters / 4 plus the output it reserves
    (what the live budget charges before the answer, without counting with tiktoken)."""
    return raw_request_len / 4 + max(0, max_tokens)
