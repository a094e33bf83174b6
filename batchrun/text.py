"""How batchrun writes numbers for people: money, durations, plurals, Redis replies as text.

One owner for each, so that `status`, `run`'s progress, `estimate` and the messages of
`resume` and `list` print the same amount the same way.
"""

from __future__ import annotations

import math


def plural(n: int) -> str:
    """The "s" of "job{plural(n)}": none for exactly one."""
    return "" if n == 1 else "s"


def format_usd(value: float) -> str:
    """Dollars with enough digits that a tiny non-zero sum does not read as $0.0000."""
    if 0 < value < 0.0001:
        return f"${value:.{1 - math.floor(math.log10(value))}f}"
    return f"${value:.4f}" if value < 10 else f"${value:,.2f}"


def format_duration(seconds: float | None) -> str:
    """"42 s", "2 min 05 s", "3 h 07 min"; None (not known) is "unknown"."""
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def decoded(value: bytes | str | object) -> str:
    """A Redis reply as text (a client without decode_responses returns bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
