"""Fleet housekeeping that any worker may do: give back expired leases, wake parked shards.

It runs in idle workers between polls of the RQ queue, and in busy shard
runners every few seconds, so a fleet whose workers are all busy still
recovers a dead worker's jobs. A short lock in Redis keeps it to about once
per interval across the fleet.
"""

from __future__ import annotations

import logging

from batchrun.remote import start as remote
from batchrun.state import keys
from batchrun.state.jobcounts import jobs_left
from batchrun.state.limiter import release_held
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore

log = logging.getLogger("batchrun.worker")

INTERVAL = 2.0  # seconds
LOCK = f"{keys.PREFIX}:maintenance-lock"


def run_once(store: BatchStore, *, force: bool = False) -> None:
    if not force and not store.redis.set(LOCK, "1", nx=True, px=int(INTERVAL * 1000)):
        return
    for batch_id in store.active_batches():
        n = store.reclaim(batch_id)
        if n:
            log.warning("batch %s: %d job(s) whose worker stopped answering go back to the queue", batch_id, n)
    store.promote_parked()
    remote.revive(store)  # --via batch-api batches whose remote-batch runner died get a new one
    store.expire_ended()
    if release_held(store):
        log.warning("reservations held by a worker that stopped answering went back to the budget")


def work_left(store: BatchStore) -> bool:
    """Is any running batch unfinished? (what `worker --burst` waits for)."""
    for batch_id in store.active_batches():
        meta = store.meta(batch_id)
        if meta.get("state") == BatchState.RUNNING and jobs_left(meta):
            return True
    return False
