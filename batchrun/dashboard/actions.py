"""The dashboard's actions on a batch (only with `dashboard --allow-actions`): pause, resume and
cancel, each the same state change as the commands make, refused with a sentence when it cannot
apply (a batch already ended, a batch paused at its spending cap)."""

from __future__ import annotations

from batchrun.enums import StoredText
from batchrun.state.states import BatchState, PauseKind
from batchrun.state.store import BatchStore


class Action(StoredText):
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"


class ActionRefused(ValueError):
    """The action does not apply to the batch as it is: the message says why."""


def act(store: BatchStore, batch_id: str, action: Action) -> str:
    """Carry out ``action`` on the batch; returns what happened, in a sentence. Raises LookupError
    for a batch this Redis does not hold, ActionRefused when the action does not apply."""
    meta = store.batch_meta(batch_id)
    if meta is None:
        raise LookupError(f"no batch {batch_id!r} in this Redis")
    state = meta.state
    if action is Action.PAUSE:
        if not store.set_state(batch_id, BatchState.PAUSED, "paused from the dashboard", only_from=(BatchState.RUNNING,)):
            raise ActionRefused(f"batch {batch_id} is {meta.state_text}, not running: there is nothing to pause")
        return f"batch {batch_id} paused; requests in flight finish, nothing new is sent until it is resumed"
    if action is Action.RESUME:
        if state is not BatchState.PAUSED:
            raise ActionRefused(f"batch {batch_id} is {meta.state_text}, not paused: there is nothing to resume")
        if meta.pause_kind is PauseKind.COST_CAP:
            raise ActionRefused(f"batch {batch_id} is paused at its spending cap; give it a higher one with "
                                f"`batchrun resume {batch_id} --max-cost USD`")
        shards = store.resume(batch_id)
        return f"batch {batch_id} resumed ({shards} shards queued for the workers)"
    if not store.set_state(batch_id, BatchState.CANCELLED, "cancelled from the dashboard",
                           only_from=(BatchState.RUNNING, BatchState.PAUSED)):
        raise ActionRefused(f"batch {batch_id} is {meta.state_text}: it has ended already")
    return f"batch {batch_id} cancelled; requests in flight finish, nothing new is sent"
