"""The fair share in Redis: reserve.lua's share of a budget per batch (_fairshare.lua), priorities,
the runners alive, the queue's fair order (state/fairshare.py, runner/fairturn.py); on fakeredis
and on the real Redis."""

from __future__ import annotations

import math
import time

from batchrun.runner.fairturn import choose_next_shard
from batchrun.state import keys
from batchrun.state.fairshare import FairShare

BUDGET = keys.budget("fair:key:gpt-4o-mini")
CHARGE = 40  # tokens per request (30 input + 10 output)
TPM = 60_000  # 1,000 tokens a second: the horizon (2 s) is 2,000 tokens, 50 requests


def reserve(store, batch: str | None, weight: float, n: int) -> list[int]:
    """The verdicts of n requests of CHARGE tokens reserved by ``batch`` (None: no fair share)."""
    fair = [] if batch is None else list(keys.fair_share(BUDGET))
    extra = [] if batch is None else [batch, weight]
    out = store.scripts.reserve(keys=[BUDGET, keys.circuit("fair"), keys.BUDGETS, *fair],
                                args=[0, TPM, 0, 0, *extra, *([30, 10, 30] * n)])
    return [int(x) for x in out[1::5]]


def came_due(since: float) -> int:
    """Requests of CHARGE tokens the budget refilled since ``since`` (time.monotonic()), rounded up:
    what a loaded machine's slow calls let through beside the share (25 a second)."""
    return math.ceil((time.monotonic() - since) * TPM / 60 / CHARGE)


def test_a_batch_alone_may_queue_the_whole_horizon(store):
    verdicts = reserve(store, "a", 1.0, 80)
    assert verdicts.count(0) == 50 and verdicts[50:] == [3] * 30  # in order: the first 50 go


def test_a_second_batch_gets_its_share_at_once_and_the_first_waits(store):
    started = time.monotonic()
    assert reserve(store, "a", 1.0, 50).count(0) == 50
    assert reserve(store, "b", 1.0, 20) == [0] * 20  # half the horizon is its own, although a holds it all
    # a is over its half until its queue drains (a request or two comes due as the calls go: 1 token a ms)
    assert reserve(store, "a", 1.0, 10).count(0) <= 2 + came_due(started)
    shares = {b: FairShare(store).budget_shares(b)[0].share for b in "ab"}
    assert shares == {"a": 0.5, "b": 0.5}


def test_weights_split_the_horizon(store):
    started = time.monotonic()
    assert reserve(store, "b", 1.0, 1) == [0]
    # 2/3 of 50 requests, 1/3 (with the one it holds); what came due between the calls aside
    assert 34 <= reserve(store, "a", 2.0, 60).count(0) <= 35 + came_due(started)
    assert 16 <= reserve(store, "b", 1.0, 60).count(0) <= 17 + came_due(started)


def test_a_low_batch_takes_only_what_the_others_leave(store):
    assert reserve(store, "low", 0.0, 10) == [0] * 10  # alone: as much as it wants
    # The normal one may queue the whole horizon (2 s of debt: the 1 s bucket and 2 s more)
    assert reserve(store, "n", 1.0, 50) == [0] * 50
    started = time.monotonic()
    assert reserve(store, "n", 1.0, 50).count(0) >= 10
    assert reserve(store, "low", 0.0, 10).count(0) <= 2 + came_due(started)  # 50 requests queued: nothing left (but what came due)
    assert FairShare(store).budget_shares("low")[0].share == 0


def test_a_request_bigger_than_the_share_still_goes_when_its_batch_has_nothing_queued(store):
    reserve(store, "a", 1.0, 50)
    fair = list(keys.fair_share(BUDGET))
    out = store.scripts.reserve(keys=[BUDGET, keys.circuit("fair"), keys.BUDGETS, *fair],
                                args=[0, TPM, 0, 0, "b", 1.0, 1500, 500, 1500])
    assert int(out[1]) == 0  # 2,000 tokens, more than b's half: it is not starved


def test_without_the_fair_keys_reserve_is_as_before(store):
    assert reserve(store, None, 0, 80) == [0] * 80


def test_priorities_are_stored_and_changed(store, make_batch):
    make_batch(store, "b1", 3)
    fair = FairShare(store)
    assert fair.priority("b1").text == "normal"
    assert fair.set_priority("b1", "high").text == "normal"
    assert fair.priority("b1").weight == 4.0
    assert fair.set_priority("nope", "low") is None
    assert not store.redis.exists(keys.batch("nope"))


def test_runners_are_counted_until_they_go(store):
    fair = FairShare(store)
    fair.runner_alive("a", "t1")
    fair.runner_alive("a", "t2")
    fair.runner_alive("b", "t3")
    assert fair.running() == {"a": 2, "b": 1}
    fair.runner_gone("a", "t1")
    assert fair.running() == {"a": 1, "b": 1}


def test_a_free_worker_takes_the_least_served_batch_first(store, make_batch):
    make_batch(store, "big", 40, shard_size=10)
    make_batch(store, "small", 5, shard_size=10)
    store.enqueue_shards("big", [0, 1, 2, 3])
    store.enqueue_shards("small", [0])
    fair = FairShare(store)
    fair.runner_alive("big", "r1")  # big already has a worker; small none
    assert set(fair.waiting()) == {"big", "small"}
    assert choose_next_shard(store) == "small"
    first = store.queue.get_job_ids()[0]
    assert store.queue.fetch_job(first).args == ["small", 0]
    assert len(store.queue.get_job_ids()) == 5  # moved, not copied


def test_one_batch_alone_keeps_rqs_order(store, make_batch):
    make_batch(store, "big", 40, shard_size=10)
    store.enqueue_shards("big", [0, 1])
    before = store.queue.get_job_ids()
    assert choose_next_shard(store) is None
    assert store.queue.get_job_ids() == before


def test_a_broken_fair_key_leaves_rqs_order_and_the_worker_alive(store, make_batch):
    make_batch(store, "big", 40, shard_size=10)
    make_batch(store, "small", 5, shard_size=10)
    store.enqueue_shards("big", [0, 1])
    store.enqueue_shards("small", [0])
    store.redis.set(keys.RUNNERS, "not a sorted set")  # written by hand
    before = store.queue.get_job_ids()
    assert choose_next_shard(store) is None
    assert store.queue.get_job_ids() == before
