"""A batch's hash (``keys.batch``), read once into typed fields.

The hash is written by store.py and the Lua scripts; its counters only grow by HINCRBY and
its costs by HINCRBYFLOAT. A field that is missing, or not a finite number (written by hand,
or by an older version), reads as 0 rather than raising: `status` must show any batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from batchrun.state.budget_headers import stored_number
from batchrun.state.states import BatchState, PauseKind
from batchrun.text import decoded as _s

# The words reserve_cost.lua put in the reason before it wrote a pause_kind: batches paused
# by an older version still read as paused at their cap.
_LEGACY_COST_CAP_TEXT = "past its --max-cost"


def decode_hash(raw: Mapping) -> dict[str, str]:
    """HGETALL's answer (bytes or str) as text."""
    return {_s(k): _s(v) for k, v in raw.items()}


def pause_kind_of(fields: Mapping[str, str]) -> PauseKind | None:
    """Why a batch paused, from its hash as text (None: not paused, or for another reason)."""
    if BatchState.parse(fields.get("state")) is not BatchState.PAUSED:
        return None
    kind = PauseKind.parse(fields.get("pause_kind") or "")
    if kind is None and _LEGACY_COST_CAP_TEXT in (fields.get("reason") or ""):
        return PauseKind.COST_CAP
    return kind


@dataclass(frozen=True, slots=True)
class BatchMeta:
    state: BatchState | None  # None: no state field, or one this version does not know
    reason: str
    pause_kind: PauseKind | None
    total: int
    done: int  # jobs that ended with a result
    failed: int  # jobs that ended with an error
    retries: int
    shards: int
    created: int  # unix seconds
    finished_at: int  # unix seconds (0: not finished)
    running_since_ms: float  # set when the batch (re)starts running
    source: str
    prices: str  # the price table (JSON) its workers use; '' for the installed one
    max_cost: float  # 0: no cap
    cost: float  # spent
    cost_reserved: float  # set aside for requests in flight
    cost_unknown: float  # counted at worst case for requests whose worker died
    n_requests: int
    n_tokens: int
    n_rate_limited: int
    fields: dict[str, str] = field(repr=False)  # the whole hash, as text (for BatchOptions.from_fields)

    @classmethod
    def from_hash(cls, raw: Mapping) -> BatchMeta:
        f = decode_hash(raw)

        def count(name: str) -> int:
            return int(stored_number(f.get(name)))

        def amount(name: str) -> float:
            return stored_number(f.get(name))

        return cls(
            state=BatchState.parse(f.get("state")), reason=f.get("reason", ""), pause_kind=pause_kind_of(f),
            total=count("total"), done=count("done"), failed=count("failed"), retries=count("retries"),
            shards=count("shards"), created=count("created"), finished_at=count("finished_at"),
            running_since_ms=amount("running_since"), source=f.get("source", ""), prices=f.get("prices", ""),
            max_cost=amount("max_cost"), cost=amount("cost"), cost_reserved=amount("cost_reserved"),
            cost_unknown=amount("cost_unknown"), n_requests=count("n_requests"), n_tokens=count("n_tokens"),
            n_rate_limited=count("n_rate_limited"), fields=f)

    @property
    def state_text(self) -> str:
        """The state as stored (an unknown one too), for showing."""
        return self.fields.get("state", "")

    @property
    def ended_jobs(self) -> int:
        return self.done + self.failed

    @property
    def committed_cost(self) -> float:
        """Spent, set aside for requests in flight, and counted for requests whose worker died."""
        return self.cost + self.cost_reserved + self.cost_unknown
