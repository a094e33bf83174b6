"""How long to wait before sending a request again.

Pure functions: the current time and the random source are passed in, so every result is
reproducible in tests.

Two sources of wait times:

* the server's own hint (``retry-after-ms``, ``retry-after``, "Please try again in 84ms" in the
  error message, ``x-ratelimit-reset-*``), parsed by :func:`wait_hint`;
* exponential backoff with jitter (:func:`backoff_delay`), which never waits less than the hint,
  and never more than the policy's cap: a hint is honoured up to the cap, no further (the openai
  SDK ignores hints over 120 s). What to do about a longer hint is the caller's choice
  (:func:`hint_exceeds_cap`); what to do about a server that never answers, too
  (:func:`gave_up`).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Mapping

__all__ = [
    "BackoffPolicy",
    "HINT_CEILING",
    "JITTER_FLOOR",
    "backoff_delay",
    "gave_up",
    "hint_exceeds_cap",
    "parse_duration",
    "parse_retry_after",
    "wait_hint",
]

# A server's wait longer than this (ten years), or too long for a float, is taken as this: longer
# than any --backoff-cap (a day at most), so it pauses a batch rather than reading as no hint.
HINT_CEILING = 10 * 365 * 86400.0


def _bounded(seconds: float) -> float:
    """``seconds`` within [-HINT_CEILING, HINT_CEILING]; an overflow (inf) is the ceiling."""
    return max(-HINT_CEILING, min(seconds, HINT_CEILING))


# --- Go-style durations ("20ms", "1.146s", "6m0s", "1h2m3s") --------------------------------

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 MICRO SIGN, what Go prints
    "μs": 1e-6,  # U+03BC GREEK SMALL LETTER MU, what people type
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# "ms" must be tried before "m", or "5ms" would read as 5 minutes followed by garbage.
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|h|m|s)")
# The same grammar, unanchored, for finding a duration inside a sentence.
_GO_DURATION = r"(?:(?:\d+(?:\.\d+)?|\.\d+)(?:ns|us|µs|μs|ms|h|m|s))+"


def parse_duration(text: str) -> float | None:
    """Parse a Go-style duration into seconds, or None when it is not one.

    Accepts what OpenAI sends in ``x-ratelimit-reset-*`` headers and in error messages:
    ``"20ms"``, ``"1s"``, ``"1.146s"``, ``"6m0s"``, ``"1m2.5s"``, ``"1h2m3s"``, ``"250us"``.
    ``"0s"`` is a real duration (0.0). A bare number, including Azure's placeholders ``"0"``
    and ``"-1"``, a negative duration and anything else give None: they carry no usable wait.
    """
    if not isinstance(text, str):
        return None
    s = text.strip()
    if not s:
        return None
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _GO_PART.match(s, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return _bounded(total)  # "9…9s", too long for a float: longer than any cap


# --- retry-after ------------------------------------------------------------------------------

# Digits only: float() would also accept "inf", "nan" and "1e309", none of which is a wait.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def _parse_number(text: str) -> float | None:
    s = text.strip()
    if not _NUMBER.fullmatch(s):
        return None
    return float(s)  # 400 digits overflow to inf: its callers take that as longer than any cap


_WEEKDAY = re.compile(r"(?i)mon|tue|wed|thu|fri|sat|sun|monday|tuesday|wednesday|thursday|friday|saturday|sunday")


def _joined_values(text: str) -> list[str]:
    """The values of a header sent more than once, which HTTP clients join with ", " ("120, 120");
    an HTTP date's own comma ("Wed, 21 Oct 2015 07:28:00 GMT") stays inside its value."""
    parts = [p.strip() for p in text.split(",")]
    values: list[str] = []
    i = 0
    while i < len(parts):
        if _WEEKDAY.fullmatch(parts[i]) and i + 1 < len(parts):
            values.append(f"{parts[i]}, {parts[i + 1]}")
            i += 2
        else:
            values.append(parts[i])
            i += 1
    return values


def parse_retry_after(value: str, now: float) -> float | None:
    """Parse a ``retry-after`` header into seconds from ``now`` (unix seconds).

    The value is either a number of seconds (``"7"``, ``"0.5"``) or an HTTP date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``). A wait in the past or a negative number gives 0.0;
    something unparseable gives None.
    """
    if not isinstance(value, str):
        return None
    values = _joined_values(value)
    if len(values) > 1:  # the header came more than once: the longest wait
        waits = [w for w in (parse_retry_after(v, now) for v in values) if w is not None]
        return max(waits) if waits else None
    seconds = _parse_number(value)
    if seconds is not None:
        return max(0.0, _bounded(seconds))
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # Python < 3.10 returned None instead of raising
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; "-0000" parses as naive.
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, _bounded(when.timestamp() - now))


# --- the server's wait hint -----------------------------------------------------------------

# OpenAI: "Please try again in 84ms." / "in 6.379s." / "in 1m2.5s."
_TRY_AGAIN_GO = re.compile(r"(?i:try again in)\s+(" + _GO_DURATION + r")")
# Azure and older OpenAI: "Please retry after 7 seconds.", "Try again in 1 second."
_WAIT_IN_WORDS = re.compile(
    r"(?i:(?:try again|retry) (?:in|after))\s+(\d+(?:\.\d+)?|\.\d+)\s*"
    r"(?i:(milliseconds?|seconds?|secs?|minutes?|mins?))\b"
)
_WORD_SECONDS = {"milli": 1e-3, "sec": 1.0, "min": 60.0}

_LIMIT_KINDS = ("tokens", "requests")


def _waits_in_message(message: str) -> list[float]:
    waits: list[float] = []
    for m in _TRY_AGAIN_GO.finditer(message):
        seconds = parse_duration(m.group(1))
        if seconds is not None:
            waits.append(seconds)
    for m in _WAIT_IN_WORDS.finditer(message):
        unit = m.group(2).lower()
        scale = next(v for k, v in _WORD_SECONDS.items() if unit.startswith(k))
        waits.append(_bounded(float(m.group(1)) * scale))  # 400 digits: longer than any cap
    return waits


def wait_hint(
    headers: Mapping[str, str] | None,
    message: str | None,
    *,
    now: float,
    limit_kind: str | None = None,
) -> float | None:
    """The server's own idea of how long to wait, in seconds, or None if it gave none.

    Explicit hints, of which the largest wins:

    * ``retry-after-ms`` (milliseconds), ``retry-after`` (seconds or HTTP date, relative to
      ``now``);
    * a wait in the error message: "Please try again in 84ms" (Go duration), or Azure's
      "Please retry after 7 seconds".

    Only when there is no explicit hint, and ``limit_kind`` says which limit was hit
    (``"tokens"`` or ``"requests"``), the matching ``x-ratelimit-reset-<kind>`` header is used.
    Reset headers come on every response and give the time until the bucket is *full* again,
    so they are a fallback, and without knowing which bucket is empty they mean nothing.

    Zero and negative values are dropped (as the openai SDK does): "wait 0 s" tells us nothing
    that backoff does not already do better. Header names are matched case-insensitively.
    The hint is not capped here (a caller needs to know that the server asked for a day);
    :func:`backoff_delay` caps the wait.
    """
    if limit_kind is not None and limit_kind not in _LIMIT_KINDS:
        raise ValueError(f"limit_kind must be one of {_LIMIT_KINDS} or None, not {limit_kind!r}")
    lower: dict[str, str] = {}
    for k, v in (headers or {}).items():  # a header sent twice: both values, as httpx joins them
        k = str(k).lower()
        lower[k] = f"{lower[k]}, {v}" if k in lower else str(v)

    explicit: list[float | None] = []
    if "retry-after-ms" in lower:
        for value in lower["retry-after-ms"].split(","):
            ms = _parse_number(value)
            explicit.append(None if ms is None else _bounded(ms / 1000.0))
    if "retry-after" in lower:
        explicit.append(parse_retry_after(lower["retry-after"], now))
    if message:
        explicit.extend(_waits_in_message(message))
    positive = [w for w in explicit if w is not None and w > 0]
    if positive:
        return max(positive)

    if limit_kind is not None:
        reset = parse_duration(lower.get(f"x-ratelimit-reset-{limit_kind}", ""))
        if reset is not None and reset > 0:
            return reset
    return None


# --- exponential backoff with jitter --------------------------------------------------------

JITTER_FLOOR = 0.05
"""Smallest jitter width in seconds on top of a hint, so even a 0-width formula spreads."""

_HINT_JITTER_FRACTION = 0.1
_CEILING_JITTER_FRACTION = 0.25


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential backoff settings. ``max_attempts`` is for the caller to enforce."""

    base: float = 1.0
    factor: float = 2.0
    cap: float = 60.0
    max_attempts: int = 10

    def __post_init__(self) -> None:
        # A cap is a ceiling on every wait: it must be a finite number.
        if not (self.base >= 0 and self.factor >= 1 and 0 < self.cap < math.inf and self.max_attempts >= 1):
            raise ValueError(f"invalid backoff policy: {self!r}")

    def ceiling(self, attempt: int) -> float:
        """``min(cap, base * factor ** (attempt - 1))``, without overflowing for huge attempts."""
        try:
            return min(self.cap, self.base * self.factor ** (attempt - 1))
        except OverflowError:
            return self.cap


def backoff_delay(
    attempt: int,
    policy: BackoffPolicy,
    hint: float | None,
    rng: random.Random,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry).

    Let ``ceiling = min(cap, base * factor ** (attempt - 1))``.

    Without a hint (None, zero, negative or not finite) — full jitter, which spreads
    contending clients best (AWS Architecture Blog, "Exponential Backoff And Jitter": plain
    exponential backoff does the most work and takes longest under contention)::

        delay = uniform(0, ceiling)

    With a hint ``h`` — never less than the server asked, with jitter on top so that workers
    released together do not return together::

        delay = h + uniform(0, spread)
        spread = max(JITTER_FLOOR, 0.1 * h, ceiling / 4)

    Why these terms:

    * ``ceiling / 4`` grows with the attempt number: a request refused again and again despite
      honouring the hint is in a crowd, and the crowd needs spreading out. A quarter of the
      full-jitter width, because the hint already did the waiting; at most ``cap / 4``.
    * ``0.1 * h``: long hints (a "6m0s" reset) are coarse, and a fleet released at once should
      come back over a tenth of the wait, not within the same second.
    * ``JITTER_FLOOR`` (50 ms) keeps the width positive even for tiny hints and ``base = 0``.

    The wait never exceeds ``cap``: the hint is taken as ``h = min(hint, cap)`` and the spread is
    cut to ``cap - h``, so a hint of the cap or more waits exactly ``cap``.

    So an 84 ms hint becomes 84–334 ms on the first retry, and at most 84 ms + cap/4 after many
    failures; every delay is in ``[0, cap]``, and at least ``min(hint, cap)``.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    ceiling = policy.ceiling(attempt)
    if hint is None or not math.isfinite(hint) or hint <= 0:
        return rng.uniform(0.0, ceiling)
    hint = min(hint, policy.cap)
    spread = max(JITTER_FLOOR, _HINT_JITTER_FRACTION * hint, _CEILING_JITTER_FRACTION * ceiling)
    return min(policy.cap, hint + rng.uniform(0.0, min(spread, policy.cap - hint)))


def hint_exceeds_cap(hint: float | None, policy: BackoffPolicy) -> bool:
    """Did the server ask for a longer wait than the policy allows? (NaN and None: no.)"""
    return hint is not None and hint > policy.cap


def gave_up(now_ms: float, down_since_ms: float, running_since_ms: float, give_up_seconds: float) -> bool:
    """Has the server not answered for ``give_up_seconds``, counted from when it went down
    (``down_since_ms``, 0: it is up) or from when the batch last started running, whichever is
    later? (A resumed batch gets a full period again.)"""
    if not down_since_ms or not give_up_seconds > 0:
        return False
    return now_ms - max(down_since_ms, running_since_ms or 0) >= give_up_seconds * 1000
