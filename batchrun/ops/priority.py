"""A batch's priority and its current share of the fleet and of its budgets (`priority`, `status`, `list`)."""

from __future__ import annotations

from dataclasses import dataclass

from batchrun.policy.fairshare import Priority, parse_priority
from batchrun.state.fairshare import BudgetShare, FairShare
from batchrun.state.keys import split_budget
from batchrun.state.store import BatchStore


@dataclass(frozen=True, slots=True)
class ShareView:
    """What `status` and `list` show of a batch's share now."""

    priority: Priority
    runners: int  # its shard runners holding a worker now
    all_runners: int  # every batch's
    budgets: list[BudgetShare]

    def line(self) -> str:
        """One sentence: ``priority normal (weight 1); 1 of 2 workers; 50 % of gpt-4o-mini's budget (2 batches)``."""
        parts = [f"priority {self.priority.describe()}"]
        if self.all_runners:
            parts.append(f"{self.runners} of {self.all_runners} worker{'s' if self.all_runners != 1 else ''}")
        for b in self.budgets:
            model = split_budget(b.budget_key).model
            if self.priority.is_low and b.batches > 1 and b.share == 0:
                parts.append(f"what the others leave of {model}'s budget ({b.batches} batches)")
            else:
                parts.append(f"{b.share:.0%} of {model}'s budget"
                             + (f" ({b.batches} batches)" if b.batches > 1 else " (alone on it)"))
        return "; ".join(parts)

    def short(self) -> str:
        """For `list`'s column: ``normal 1/2w 50%``."""
        text = self.priority.text
        if self.all_runners:
            text += f" {self.runners}/{self.all_runners}w"
        if self.budgets:
            text += f" {min(b.share for b in self.budgets):.0%}"
        return text


def share_view(store: BatchStore, batch_id: str, running: dict[str, int] | None = None) -> ShareView:
    fair = FairShare(store)
    running = fair.running() if running is None else running
    return ShareView(fair.priority(batch_id), running.get(batch_id, 0), sum(running.values()),
                     fair.budget_shares(batch_id))


class NoSuchBatch(LookupError):
    pass


def set_priority(store: BatchStore, batch_id: str, text: str) -> tuple[Priority, Priority]:
    """Give ``batch_id`` a new priority (ValueError for one that does not parse, NoSuchBatch);
    returns (old, new). Its runners apply it within a second or two."""
    new = parse_priority(text)
    old = FairShare(store).set_priority(batch_id, new)
    if old is None:
        raise NoSuchBatch(f"no batch {batch_id!r} in this Redis")
    return old, new


def when_it_applies(store: BatchStore, batch_id: str) -> str:
    """When a priority just set takes effect, by the batch's state: a cancelled batch never runs again."""
    from batchrun.state.states import BatchState

    state = (store.meta(batch_id) or {}).get("state")
    if state == BatchState.CANCELLED.value:
        return "the batch is cancelled, so nothing of it runs any more"
    if state == BatchState.PAUSED.value:
        return f"it applies when the batch is resumed (batchrun resume {batch_id})"
    if state == BatchState.FINISHED.value:
        return "the batch is finished: it applies if new jobs make it run again"
    return "its runners apply it within seconds"
