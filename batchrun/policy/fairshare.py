"""Fair share between batches: priorities, and the pure rules that split workers and a budget.

A batch's priority is ``high``, ``normal`` (the default), ``low`` or a weight (a number > 0).
``high`` is weight 4 and ``normal`` weight 1: batches competing for workers or for one budget get
them in proportion to their weights. ``low`` is weight 0: it takes only what the others leave
(alone, or with only other ``low`` batches, it takes everything, like weight 1).

The rules here have no Redis and no clock: ``state/lua/reserve.lua`` applies the same budget
rule atomically (``budget_shares`` is its Python twin, for ``status`` and the tests), and the
runners and workers call ``should_yield`` and ``next_batch`` with what Redis told them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

NAMED_WEIGHTS = {"high": 4.0, "normal": 1.0, "low": 0.0}
DEFAULT_PRIORITY = "normal"
MAX_WEIGHT = 1000.0  # a bigger weight means nothing more (and a typo like 1e9 is refused)


@dataclass(frozen=True, slots=True)
class Priority:
    text: str  # as stored and shown: "high", "normal", "low", or the weight ("2.5")
    weight: float  # 0: low (only what the others leave)

    @property
    def is_low(self) -> bool:
        return self.weight == 0

    def describe(self) -> str:
        if self.text in NAMED_WEIGHTS and not self.is_low:
            return f"{self.text} (weight {self.weight:g})"
        return self.text if self.is_low else f"weight {self.weight:g}"


def parse_priority(text: str | float | None) -> Priority:
    """``high``, ``normal``, ``low`` or a weight; ValueError with a sentence that names the value."""
    if text is None or text == "":
        return Priority(DEFAULT_PRIORITY, NAMED_WEIGHTS[DEFAULT_PRIORITY])
    word = str(text).strip().lower()
    if word in NAMED_WEIGHTS:
        return Priority(word, NAMED_WEIGHTS[word])
    try:
        weight = float(word)
    except ValueError:
        raise ValueError(f"priority {text!r} is not high, normal, low or a weight (a number above 0, "
                         f"such as 2 for twice a normal batch's share)") from None
    if not math.isfinite(weight) or weight <= 0 or weight > MAX_WEIGHT:
        raise ValueError(f"priority weight {text!r} must be above 0 and at most {MAX_WEIGHT:g} "
                         f"(use low for a batch that only takes what the others leave)")
    return Priority(f"{weight:g}", weight)


def stored_priority(text: str | bytes | None) -> Priority:
    """A priority read back from Redis: one that does not parse (written by hand) counts as normal."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    try:
        return parse_priority(text)
    except ValueError:
        return parse_priority(None)


def budget_shares(weights: Mapping[str, float]) -> dict[str, float]:
    """Each active batch's share (0..1) of a budget they all draw from, by weight. ``low``
    batches (weight 0) share only when no other batch is active (then equally); otherwise their
    share is what the others leave, which this counts as 0."""
    if not weights:
        return {}
    total = sum(w for w in weights.values() if w > 0)
    if total > 0:
        return {b: (w / total if w > 0 else 0.0) for b, w in weights.items()}
    return {b: 1 / len(weights) for b in weights}


def _load(running: int, weight: float) -> float:
    """How served a batch is: its runners per unit of weight (a low batch counts as weight 1 among lows)."""
    return running / (weight if weight > 0 else 1.0)


def should_yield(own: str, weights: Mapping[str, float], running: Mapping[str, int], waiting: set[str]) -> bool:
    """Should a runner of batch ``own`` give its worker back, now that it has had it for its turn?
    Exactly when the free worker's fair choice (``next_batch``) would then be another batch: one
    waiting that would be no more served for its weight than ``own`` once it has let go (on a
    tie the other one, since ``own`` was served last). With fewer workers than batches they take
    turns, a weighted batch included (its turns are longer: ``turn_seconds``); a batch never yields
    a worker that would come straight back to it. A ``low`` batch yields to any waiting batch that
    is not low; nobody yields to a ``low`` one that is not alone in being low. ``running`` counts
    this runner too."""
    own_w = weights.get(own, 1.0)
    own_key = (own_w == 0, _load(max(running.get(own, 0), 1) - 1, own_w))
    for other in waiting:
        if other == own:
            continue
        other_w = weights.get(other, 1.0)
        if (other_w == 0, _load(running.get(other, 0), other_w)) <= own_key:
            return True
    return False


def turn_seconds(weight: float, base: float) -> float:
    """How long a runner keeps its worker before it may yield: ``base`` for a normal or low batch, in
    proportion to the weight above that, so that batches taking turns on one worker get it for
    times in proportion to their weights (high: 4 turns' worth of a normal batch's)."""
    return base * max(1.0, weight)


def next_batch(waiting: set[str], weights: Mapping[str, float], running: Mapping[str, int],
               last_served: Mapping[str, float]) -> str | None:
    """Which batch's shard a free worker should run next: among the batches waiting, not low before
    low, the least served for its weight, then the one served longest ago (round robin)."""
    if not waiting:
        return None

    def key(batch: str) -> tuple:
        w = weights.get(batch, 1.0)
        return (w == 0, _load(running.get(batch, 0), w), last_served.get(batch, 0.0), batch)

    return min(waiting, key=key)
