"""A per-day limit spent: what the record beside a day's counts says, and how it is said.

Pure (no Redis): day_take.lua (an endpoint's own rpd/tpd, counted) and day_spent.lua (the
server's per-day 429) write the record in the hash of the day's counts (``keys.day_counts``):
``spent_until`` (Redis server ms when the endpoint takes the model again), ``spent_limit``
(``rpd`` or ``tpd``), ``spent_of`` (the limit, 0 when the server did not say), ``spent_by``
(``count`` or ``server``) and ``endpoint`` (its name). ``day_spent`` reads that hash into a
``DaySpent``; the sentences below are what `status`, the progress line, `batchrun endpoints`
and the runner's pause say of it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from batchrun.policy.classify import BATCH_ID_PLACEHOLDER

DAY_MS = 86_400_000
LIMIT_NAMES = {"rpd": "requests-per-day", "tpd": "tokens-per-day"}
_LIMIT_IN_MESSAGE = re.compile(r"\b(?:Limit|limit of)\s+([\d,]+)")


@dataclass(frozen=True, slots=True)
class DaySpent:
    """One endpoint's day spent for one model."""

    endpoint: str
    model: str
    limit: str  # 'rpd', 'tpd', or '' (a per-day 429 that did not say which)
    limit_value: int  # 0: not known
    by: str  # 'count' (its rpd/tpd, counted by batchrun) or 'server' (the server's per-day 429)
    resumes_ms: float  # Redis server time (ms) when it takes the model again
    now_ms: float

    @property
    def seconds_left(self) -> float:
        return max(0.0, (self.resumes_ms - self.now_ms) / 1000)

    @classmethod
    def from_json(cls, endpoint: str, d: Mapping) -> DaySpent:
        """``as_json`` read back (as `status --json` and `endpoints --json` give it)."""
        resumes_ms = d["resumes_at"] * 1000
        return cls(endpoint, d["model"], d["limit"] or "", d["limit_value"] or 0, d["by"], resumes_ms,
                   resumes_ms - d["resumes_in_seconds"] * 1000)

    def as_json(self) -> dict:
        return {"model": self.model, "limit": self.limit or None, "limit_value": self.limit_value or None,
                "by": self.by, "resumes_at": round(self.resumes_ms / 1000, 3),
                "resumes_in_seconds": round(self.seconds_left, 1)}


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def day_spent(fields: Mapping[str, str], *, endpoint: str, model: str, now_ms: float, rpd: int = 0,
              tpd: int = 0) -> DaySpent | None:
    """The day-counts hash (as text) read as a spent day, or None while the endpoint takes the
    model. The record says so until its ``spent_until``; with the endpoint's own ``rpd``/``tpd``
    known, counts that reached them say so too (today's, until the next midnight UTC), before any
    request was refused."""
    until = _number(fields.get("spent_until"))
    if until > now_ms:
        return DaySpent(fields.get("endpoint") or endpoint, model, fields.get("spent_limit") or "",
                        int(_number(fields.get("spent_of"))), fields.get("spent_by") or "count", until, now_ms)
    today = int(now_ms // DAY_MS)
    if fields.get("day") is None or int(_number(fields.get("day"))) != today:
        return None
    req, tok = _number(fields.get("req")), _number(fields.get("tok"))
    which = "rpd" if rpd and req >= rpd else "tpd" if tpd and tok >= tpd * 0.999 else ""
    if not which:
        return None
    return DaySpent(endpoint, model, which, rpd if which == "rpd" else tpd, "count", (today + 1) * DAY_MS, now_ms)


def per_day_limit(kind: str, message: str) -> tuple[str, int]:
    """A per-day 429's limit: ('rpd' or 'tpd', its number or 0) from the classifier's kind
    (rate_limit_requests / rate_limit_tokens) and the server's message ("... (RPD): Limit 10000")."""
    limit = "rpd" if kind.endswith("requests") else "tpd" if kind.endswith("tokens") else ""
    m = _LIMIT_IN_MESSAGE.search(message)
    value = int(m.group(1).replace(",", "")) if m and m.group(1).replace(",", "") else 0
    return limit, value


def clock(resumes_ms: float) -> str:
    """'00:00 UTC' (the time of day, UTC, the day resumes)."""
    return time.strftime("%H:%M UTC", time.gmtime(resumes_ms / 1000))


def wait_words(seconds: float) -> str:
    """'3 h 12 min', '7 min', '42 s'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def limit_name(d: DaySpent) -> str:
    """"requests-per-day limit (10,000)"; the server's: "... limit (10,000) at the server"."""
    value = f" ({d.limit_value:,})" if d.limit_value else ""
    return f"{LIMIT_NAMES.get(d.limit, 'per-day')} limit{value}" + (" at the server" if d.by == "server" else "")


def limit_words(d: DaySpent) -> str:
    """"gpt-4o-mini's requests-per-day limit (10,000)"."""
    return f"{d.model}'s {limit_name(d)}"


def resume_words(d: DaySpent) -> str:
    """'00:00 UTC (in 3 h 12 min)'."""
    return f"{clock(d.resumes_ms)} (in {wait_words(d.seconds_left)})"


def resume_words_at(seconds: float, now_ms: float | None = None) -> str:
    """'00:00 UTC (in 3 h 12 min)', ``seconds`` from now."""
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    return f"{clock(now_ms + seconds * 1000)} (in {wait_words(seconds)})"


def spent_sentence(d: DaySpent, *, others_carry_on: bool, of: str = "this batch") -> str:
    """"endpoint openai-a: gpt-4o-mini's requests-per-day limit (10,000) is spent; it resumes at
    00:00 UTC (in 3 h 12 min); other endpoints carry on"."""
    head = f"endpoint {d.endpoint}: {limit_words(d)} is spent; it resumes at {resume_words(d)}"
    if others_carry_on:
        return head + "; other endpoints carry on"
    return head + f"; no other endpoint of {of} takes {d.model} now, so its jobs wait until then"


def spent_short(d: DaySpent) -> str:
    """The progress line's: 'openai-a gpt-4o-mini rpd spent, resumes 00:00 UTC (in 3 h 12 min)'."""
    return f"{d.endpoint} {d.model} {d.limit or 'day'} spent, resumes {resume_words(d)}"


def all_spent_sentence(model: str, spent: list[DaySpent], cap: float) -> str:
    """Why a batch paused: every endpoint serving ``model`` has spent its day, and the first to
    resume does so later than the --backoff-cap."""
    if not spent:
        return (f"every endpoint serving {model} has spent its per-day limit, longer than the --backoff-cap of "
                f"{cap:g} s, so the batch is paused; no job failed. Run `batchrun resume {BATCH_ID_PLACEHOLDER}` "
                f"after midnight UTC")
    first = min(spent, key=lambda d: d.resumes_ms)
    whose = ", ".join(f"{d.endpoint}'s {limit_name(d)}" for d in sorted(spent, key=lambda d: d.endpoint))
    when = time.strftime("%H:%M UTC (%Y-%m-%d)", time.gmtime(first.resumes_ms / 1000))
    which = f"the first, {first.endpoint}," if len(spent) > 1 else "it"
    return (f"every endpoint serving {model} has spent its per-day limit: {whose}; {which} "
            f"resumes at {resume_words(first)}, longer than the --backoff-cap of {cap:g} s, so the batch is "
            f"paused rather than waiting; no job failed. Run `batchrun resume {BATCH_ID_PLACEHOLDER}` after "
            f"{when}")
