"""Fair turns on the fleet's workers: when a runner gives its worker back, and which shard a free
worker runs next (the rules: policy/fairshare.py; the Redis side: state/fairshare.py).

A runner that has had its worker for its turn (SLICE_SECONDS, times its weight above 1) looks,
every CHECK_SECONDS, at the batches with shards waiting in the RQ queue; if the free worker's fair
choice would be one of them rather than its own batch, it yields: it leaves its loop as at
``max_shard_seconds``, so the exactly-once path is the one of every stop (requests in flight, and
those whose budget is taken, finish; the shard is parked and queued again).
A free worker, before it takes a job, moves the first queued shard of the batch that
``next_batch`` chooses to the front of the queue: RQ's FIFO order becomes round robin between
batches, weighted by priority.

The same check renews the runner's entry among the runners alive and reads its batch's priority,
so a priority changed on a running batch reaches its budget reservations within CHECK_SECONDS.
"""

from __future__ import annotations

import logging
import time

import redis

from batchrun.policy.fairshare import next_batch, should_yield, turn_seconds
from batchrun.state.fairshare import FairShare
from batchrun.state.limiter import SharedLimiter
from batchrun.state.store import BatchStore

log = logging.getLogger("batchrun.worker")

SLICE_SECONDS = 3.0  # a normal runner keeps its worker at least this long before it yields (turn_seconds)
CHECK_SECONDS = 1.0  # how often a runner renews its entry, reads its priority, and looks at the queue


class FairTurn:
    """One shard runner's side: its entry among the runners alive, its priority, its turn."""

    def __init__(self, store: BatchStore, batch_id: str, shard: int, token: str,
                 limiters: list[SharedLimiter]):
        self.fair = FairShare(store)
        self.batch_id, self.shard, self.token = batch_id, shard, token
        self.limiters = limiters  # one per endpoint the runner may send to: each draws as this batch
        self.started = time.monotonic()
        self.checked = 0.0
        self.weight = 1.0

    def start(self) -> None:
        self.fair.served(self.batch_id)
        self._renew()

    def stop(self) -> None:
        self.fair.runner_gone(self.batch_id, self.token)

    def _renew(self) -> None:
        self.fair.runner_alive(self.batch_id, self.token)
        self.weight = self.fair.priority(self.batch_id).weight
        for limiter in self.limiters:
            limiter.share_as(self.batch_id, self.weight)

    def due(self) -> bool:
        """Whether a check is due (cheap: no Redis)."""
        return time.monotonic() - self.checked >= CHECK_SECONDS

    def should_yield(self) -> bool:
        """Renew, and tell whether this runner should give its worker to another batch now."""
        self.checked = time.monotonic()
        self._renew()
        if time.monotonic() - self.started < turn_seconds(self.weight, SLICE_SECONDS):
            return False
        fleet = self.fair.fleet()
        waiting = set(fleet.waiting) - {self.batch_id}
        if not waiting:
            return False
        weights = {**fleet.weights, self.batch_id: self.weight}
        running = {**fleet.running, self.batch_id: max(1, fleet.running.get(self.batch_id, 0))}
        if not should_yield(self.batch_id, weights, running, waiting):
            return False
        log.info("batch %s shard %d: gives its worker to %s (fair share); the shard continues later",
                 self.batch_id, self.shard, "another batch" if len(waiting) > 1 else f"batch {next(iter(waiting))}")
        return True


def choose_next_shard(store: BatchStore) -> str | None:
    """Before a free worker takes a job: put the fair choice's shard job at the front of the queue.
    Returns the batch chosen (None: the queue holds one batch's shards at most, RQ's order stands).
    Anything odd met on the way (a key of the wrong type, written by hand) leaves RQ's order as it
    is: the fair order is a preference, never a reason for a worker to stop."""
    try:
        return _choose_next_shard(store)
    except (redis.ResponseError, ValueError, TypeError) as exc:
        log.warning("the fair choice of the next shard failed (%s); the worker takes RQ's next job", exc)
        return None


def _choose_next_shard(store: BatchStore) -> str | None:
    fair = FairShare(store)
    waiting = fair.waiting()
    if len(waiting) < 2:
        return None
    fleet = fair.fleet(waiting)
    choice = next_batch(set(fleet.waiting), fleet.weights, fleet.running, fleet.last_served)
    if choice is not None:
        fair.to_front(fleet.waiting[choice])
    return choice
