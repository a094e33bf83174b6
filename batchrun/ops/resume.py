"""A batch's spending cap and price table changed after it was submitted (`resume ID
--max-cost/--prices`, `run --batch-id ID --max-cost`, jobs added to a batch): the rules each
of them follows."""

from __future__ import annotations

from collections.abc import Mapping

from batchrun.policy.pricing import PriceTable
from batchrun.state.meta import pause_kind_of
from batchrun.state.states import PauseKind
from batchrun.state.store import BatchStore
from batchrun.text import format_usd



class CapTooLow(ValueError):
    """A new cap at or below what the batch has spent or set aside: it would pause again at once."""

    def __init__(self, batch_id: str, committed: float, cap: float):
        self.batch_id, self.committed, self.cap = batch_id, committed, cap
        super().__init__(f"batch {batch_id} has already spent or set aside {format_usd(committed)}; a cap of "
                         f"{format_usd(cap)} would pause it again at once")


def paused_at_cap(meta: Mapping[str, str]) -> bool:
    """Whether the batch (its meta hash) is paused because its spending cap was reached."""
    return pause_kind_of(meta) is PauseKind.COST_CAP


def set_cap(store: BatchStore, batch_id: str, max_cost: float) -> None:
    """Give the batch the spending cap ``max_cost`` (0: none). Raises CapTooLow, changing
    nothing, when the batch has spent or set aside that much already."""
    if max_cost:
        committed = store.committed_cost(batch_id)
        if max_cost <= committed:
            raise CapTooLow(batch_id, committed, max_cost)
    store.set_max_cost(batch_id, max_cost)


def merged_prices(stored: str | None, path: str | None) -> PriceTable:
    """The price table a batch keeps: its stored one (``stored``, as ``PriceTable.to_json``
    wrote it) with the price file ``path`` over it, model by model; a batch without one takes
    the shipped table with the file over it (``PriceTable.load``). Raises ValueError naming the
    file and the reason when it cannot be read."""
    if not stored:
        return PriceTable.load(path)
    table = PriceTable.from_json(stored)
    return table.with_file(path) if path else table
