"""runner.maintenance: a dead worker's jobs come back, parked shards wake, about once per interval."""

from __future__ import annotations

import time

from batchrun.runner import maintenance
from batchrun.state import keys
from batchrun.state.store import RUN_SHARD


def queued_shards(store) -> list[tuple[str, int]]:
    return sorted(tuple(job.args) for job in store.queue.get_jobs() if job.func_name == RUN_SHARD)


def test_expired_leases_go_back_to_the_queue(store, make_batch):
    make_batch(store, "b", 3)
    store.lease("b", 0, 2, 10, "dead-runner")  # a worker that died: its leases lapse in 10 ms
    time.sleep(0.05)
    maintenance.run_once(store)
    assert store.redis.zcard(keys.sub("b", "leases")) == 0
    assert store.redis.zcard(keys.todo("b", 0)) == 3


def test_a_parked_shard_whose_time_has_come_gets_a_runner(store, make_batch):
    make_batch(store, "b", 3, shard_size=1)
    store.park("b", 1, store.server_time_ms() - 1)  # due
    store.park("b", 2, store.server_time_ms() + 60_000)  # not yet
    maintenance.run_once(store)
    assert queued_shards(store) == [("b", 1)]


def test_it_runs_about_once_per_interval_across_the_fleet(store, make_batch):
    make_batch(store, "b", 2)
    maintenance.run_once(store)  # takes the fleet's lock for INTERVAL
    store.lease("b", 0, 2, 10, "dead-runner")
    time.sleep(0.05)
    maintenance.run_once(store)  # another worker, within the interval: does nothing
    assert store.redis.zcard(keys.sub("b", "leases")) == 2
    maintenance.run_once(store, force=True)
    assert store.redis.zcard(keys.sub("b", "leases")) == 0


def test_work_left_is_an_unfinished_running_batch(store, make_batch):
    assert not maintenance.work_left(store)
    cids = make_batch(store, "b", 2)
    assert maintenance.work_left(store)
    store.set_state("b", "paused", "by a test")
    assert not maintenance.work_left(store)  # paused: `worker --burst` does not wait for it
    store.set_state("b", "running")
    store.lease("b", 0, 2, 60_000, "runner")
    store.complete("b", [("R", cid, "{}") for cid in cids])
    assert not maintenance.work_left(store)
    store.redis.hset(keys.batch("b"), "state", "running")
    store.redis.sadd(keys.ACTIVE, "b")
    assert not maintenance.work_left(store)  # every job ended: nothing left, whatever its state says
