"""What a server's x-ratelimit-* headers may tell the shared budget, and numbers read back from it.

The rules here are the Python half of those in observe.lua (which keeps the same bounds):
a header value is used only if it is a finite number in range, and a stored value that is
not a finite number reads as 0.
"""

from __future__ import annotations

import math
import re

from batchrun.policy.backoff import parse_duration
from batchrun.text import decoded as _s

_HEADER_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")  # digits: float() would take "nan" and "inf"


# Larger than any real rate limit (OpenAI's largest are around 1e10 tokens per minute); a header
# above it is a broken or hostile server, not a limit. observe.lua keeps the same bound.
MAX_HEADER_NUMBER = 1e13


def usable_header_number(value: object, *, remaining: bool = False) -> str:
    """An x-ratelimit-limit-*/remaining-* header's value as the budget may use it: a finite number
    in [0, MAX_HEADER_NUMBER], as the text it came as; '' for anything else ("nan", "inf", "1e999",
    "12 tokens", a list, a negative limit), which then counts as absent. A negative *remaining*
    reads as "0" (nothing left: observe.lua then keeps one second's worth of debt at most, not
    days of it). The one judge of such values."""
    if not isinstance(value, str) or not _HEADER_NUMBER.fullmatch(value.strip()):
        return ""
    number = float(value)
    if number < 0:
        return "0" if remaining and number > -MAX_HEADER_NUMBER else ""
    return value.strip() if number <= MAX_HEADER_NUMBER else ""


def told_bucket(headers, charge: int) -> str:
    """The server's token bucket size as its headers tell it: x-ratelimit-remaining-tokens plus
    what refills in x-ratelimit-reset-tokens ("the time until the bucket is full") at
    x-ratelimit-limit-tokens per minute, and never below remaining + ``charge`` (the request these
    headers answer was just admitted). '' when one of the three is missing or unusable (Azure's
    "-1" reset, a bare number): observe.lua then keeps its full headroom.

    This is what tells a bucket of one second's worth (a limit enforced per second) from a
    minute's: observe.lua keeps a fraction of a small bucket as headroom, not all of it."""
    limit = usable_header_number(headers.get("x-ratelimit-limit-tokens", ""))
    remaining = usable_header_number(headers.get("x-ratelimit-remaining-tokens", ""), remaining=True)
    reset = parse_duration(headers.get("x-ratelimit-reset-tokens", ""))
    if not limit or not remaining or reset is None:
        return ""
    size = float(remaining) + min(reset, 86400.0) * float(limit) / 60
    return f"{min(MAX_HEADER_NUMBER, max(size, float(remaining) + max(charge, 0))):.0f}"


def stored_number(value: object) -> float:
    """A number read back from a budget hash: a value that is not a finite number (a hash written
    by an older version from a hostile header) reads as 0."""
    try:
        number = float(_s(value)) if value is not None else 0.0
    except ValueError:
        return 0.0
    return number if math.isfinite(number) else 0.0


def admitted_ratio(items) -> str:
    """The server's input charge over our input estimate, from answers admitted into a full bucket
    (observe.lua's ARGV[13]); '' if none tells.

    Such an answer's ``limit - remaining`` is what its own admission took, plus whatever else the
    server had not refilled yet: an upper bound on its charge, so the ratio errs on the safe side.
    Of the answers that came together, those whose deficit is well above the cleanest one's (per
    token we charged) also paid for others (a burst of ours, other clients on the key) and are left
    out: they would inflate k, slowing the fleet.
    """
    seen_ok = []
    for input_tokens, output_tokens, seen, *_ in items:
        if seen is None or input_tokens <= 0 or seen[5] != "1" or seen[4] <= 0:
            continue
        try:
            limit, remaining = float(seen[1]), float(seen[3])
        except ValueError:
            continue
        # A deficit not above the answer's own output reservation says nothing of its charge (headers
        # that do not move, a bucket refilled meanwhile): it would teach k < 1.
        if limit > 0 and output_tokens < limit - remaining:
            seen_ok.append(((limit - remaining) / seen[4], limit - remaining - output_tokens, input_tokens))
    if not seen_ok:
        return ""
    cleanest = min(ratio for ratio, _, _ in seen_ok)
    took_in = sum(took for ratio, took, _ in seen_ok if ratio <= 1.5 * cleanest)
    our_in = sum(n for ratio, _, n in seen_ok if ratio <= 1.5 * cleanest)
    return f"{took_in / our_in:.4f}"
