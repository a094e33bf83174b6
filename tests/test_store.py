"""BatchStore and its Lua scripts: the per-job state machine in Redis.

Every test runs twice, on fakeredis and on the real Redis (DB 13); the concurrency test only on the real one.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

import batchrun.state.store as store_module
from batchrun.state import keys
from batchrun.state.store import RUN_SHARD, BatchStore
from tests.conftest import request_json
from tests.helpers import run_in_processes

BID = "b1"
TOKEN = "runner-a"
OWNER = f"{TOKEN}|0"


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def leases(store: BatchStore, batch_id: str = BID) -> dict[str, float]:
    return {_s(m): s for m, s in store.redis.zrange(keys.sub(batch_id, "leases"), 0, -1, withscores=True)}


def owners(store: BatchStore, batch_id: str = BID) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in store.redis.hgetall(keys.sub(batch_id, "owner")).items()}


def todo(store: BatchStore, shard: int = 0, batch_id: str = BID) -> dict[str, float]:
    return {_s(m): s for m, s in store.redis.zrange(keys.todo(batch_id, shard), 0, -1, withscores=True)}


def parked(store: BatchStore) -> dict[str, float]:
    return {_s(m): s for m, s in store.redis.zrange(keys.PARKED, 0, -1, withscores=True)}


def result_ids(store: BatchStore, batch_id: str = BID) -> list[str]:
    return [json.loads(_s(line)[1:])["custom_id"] for line in store.results(batch_id, 0, 1_000_000)]


def line(cid: str, **extra) -> str:
    return json.dumps({"custom_id": cid, **extra})


def rq_count(store: BatchStore) -> int:
    return Queue(keys.QUEUE, connection=store.redis, serializer=JSONSerializer).count


# --- add_jobs ---------------------------------------------------------------------------------


def test_add_jobs_counts_and_shards(store, make_batch):
    cids = make_batch(store, BID, 10, shard_size=4)
    meta = store.meta(BID)
    assert meta["total"] == "10" and meta["shards"] == "3" and meta["state"] == "running"
    assert [len(todo(store, s)) for s in range(3)] == [4, 4, 2]
    assert set(todo(store, 2)) == set(cids[8:])
    assert all(score == 0 for s in range(3) for score in todo(store, s).values())  # due at once
    assert store.redis.hlen(keys.sub(BID, "req")) == 10
    assert json.loads(store.redis.hget(keys.sub(BID, "req"), cids[0]))["body"]["model"] == "gpt-4o-mini"
    assert BID in store.active_batches()


def test_add_jobs_is_idempotent(store, make_batch):
    cids = make_batch(store, BID, 10, shard_size=4)
    items = [(cid, i // 4, json.dumps({"changed": True})) for i, cid in enumerate(cids)]
    assert store.add_jobs(BID, items) == (0, [])
    assert store.meta(BID)["total"] == "10"
    assert [len(todo(store, s)) for s in range(3)] == [4, 4, 2]
    # The first request stays: a resubmission does not overwrite it.
    assert "changed" not in json.loads(store.redis.hget(keys.sub(BID, "req"), cids[0]))
    # Only the new ones count, and only their shards are reported; duplicates inside one call count once.
    added, shards = store.add_jobs(BID, items + [("new-1", 5, "{}"), ("new-2", 5, "{}"), ("new-1", 5, "{}")])
    assert (added, shards) == (2, [5])
    assert store.meta(BID)["total"] == "12"


def test_add_jobs_does_not_resurrect_ended_job(store, make_batch):
    cids = make_batch(store, BID, 3)
    lease = store.lease(BID, 0, 1, 60_000, TOKEN)
    done = lease.jobs[0].custom_id
    store.complete(BID, [("R", done, line(done))])
    assert not store.redis.hexists(keys.sub(BID, "req"), done)  # ended: its request is gone
    added, shards = store.add_jobs(BID, [(cid, 0, "{}") for cid in cids])
    assert (added, shards) == (0, [])
    assert store.meta(BID)["total"] == "3"
    assert not store.redis.hexists(keys.sub(BID, "req"), done)
    assert done not in todo(store)
    handed = [j.custom_id for j in store.lease(BID, 0, 10, 60_000, TOKEN).jobs]
    assert sorted(handed) == sorted(set(cids) - {done})


# --- lease ------------------------------------------------------------------------------------


def test_lease_hands_out_at_most_n_with_leases_recorded(store, make_batch):
    cids = make_batch(store, BID, 10)
    before = store.server_time_ms()
    lease = store.lease(BID, 0, 4, 5_000, TOKEN)
    after = store.server_time_ms()
    assert lease.state == "running"
    assert before <= lease.now_ms <= after  # Redis server time
    assert len(lease.jobs) == 4
    got = [j.custom_id for j in lease.jobs]
    assert len(set(got)) == 4 and set(got) <= set(cids)
    for job in lease.jobs:
        assert job.attempts == 0
        i = int(job.custom_id.split("-")[1])
        assert job.request == {"method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "gpt-4o-mini", "max_tokens": 20,
                                        "messages": [{"role": "user", "content": f"Say the number {i}."}]}}
    assert leases(store) == {cid: lease.now_ms + 5_000 for cid in got}
    assert owners(store) == {cid: OWNER for cid in got}
    assert set(todo(store)) == set(cids) - set(got)
    assert lease.next_due_ms == 0  # the remaining jobs are due since ever


def test_second_lease_does_not_hand_out_the_same_jobs(store, make_batch):
    cids = make_batch(store, BID, 10)
    a = store.lease(BID, 0, 4, 60_000, "runner-a")
    b = store.lease(BID, 0, 4, 60_000, "runner-b")
    c = store.lease(BID, 0, 4, 60_000, "runner-c")
    ids = [j.custom_id for lease in (a, b, c) for j in lease.jobs]
    assert [len(x.jobs) for x in (a, b, c)] == [4, 4, 2]
    assert sorted(ids) == sorted(cids)  # every job once, none twice
    assert c.next_due_ms is None  # the shard's todo set is empty
    assert owners(store)[b.jobs[0].custom_id] == "runner-b|0"
    empty = store.lease(BID, 0, 4, 60_000, "runner-d")
    assert empty.jobs == [] and empty.next_due_ms is None and empty.state == "running"


def test_lease_is_per_shard(store, make_batch):
    cids = make_batch(store, BID, 6, shard_size=3)
    lease = store.lease(BID, 1, 10, 60_000, TOKEN)
    assert sorted(j.custom_id for j in lease.jobs) == cids[3:]
    assert set(owners(store).values()) == {f"{TOKEN}|1"}
    assert len(todo(store, 0)) == 3


def test_lease_hands_out_only_due_jobs(store, make_batch):
    make_batch(store, BID, 3)
    lease = store.lease(BID, 0, 3, 60_000, TOKEN)
    n, earliest = store.requeue(BID, OWNER, 0, [(j.custom_id, 60_000, False, "") for j in lease.jobs])
    assert n == 3 and earliest == pytest.approx(lease.now_ms + 60_000, abs=2_000)
    again = store.lease(BID, 0, 3, 60_000, TOKEN)
    assert again.jobs == []
    assert again.next_due_ms == earliest
    assert again.next_due_ms - again.now_ms > 55_000


@pytest.mark.parametrize("state", ["paused", "cancelled"])
def test_lease_on_stopped_batch_hands_out_nothing(store, make_batch, state):
    cids = make_batch(store, BID, 5)
    store.set_state(BID, state, "stopped by test")
    lease = store.lease(BID, 0, 5, 60_000, TOKEN)
    assert lease.state == state
    assert lease.jobs == [] and lease.next_due_ms is None
    assert lease.now_ms == pytest.approx(store.server_time_ms(), abs=2_000)
    assert set(todo(store)) == set(cids)  # nothing taken out
    assert leases(store) == {} and owners(store) == {}
    store.set_state(BID, "running")
    assert len(store.lease(BID, 0, 5, 60_000, TOKEN).jobs) == 5


def test_lease_on_missing_batch(store):
    lease = store.lease("nope", 0, 5, 60_000, TOKEN)
    assert lease.state == "missing" and lease.jobs == []


# --- complete ---------------------------------------------------------------------------------


def test_complete_first_outcome_wins(store, make_batch):
    make_batch(store, BID, 3)
    job = store.lease(BID, 0, 1, 60_000, TOKEN).jobs[0].custom_id
    assert store.complete(BID, [("R", job, line(job, n=1))]) == (1, 0, 0)
    assert store.complete(BID, [("E", job, line(job, n=2))]) == (0, 0, 1)
    assert store.complete(BID, [("R", job, line(job, n=3))]) == (0, 0, 1)
    assert store.results_length(BID) == 1
    first = _s(store.results(BID, 0, 10)[0])
    assert first[0] == "R" and json.loads(first[1:]) == {"custom_id": job, "n": 1}
    assert _s(store.redis.hget(keys.sub(BID, "status"), job)) == "R"
    meta = store.meta(BID)
    assert (meta["done"], meta["failed"]) == ("1", "0")
    assert job not in leases(store) and job not in owners(store)


def test_complete_duplicates_inside_one_call(store, make_batch):
    cids = make_batch(store, BID, 3)
    out = store.complete(BID, [("E", cids[0], line(cids[0], n=1)), ("R", cids[0], line(cids[0], n=2)),
                               ("R", cids[1], line(cids[1]))])
    assert out == (1, 1, 1)
    assert result_ids(store) == [cids[0], cids[1]]
    assert _s(store.results(BID, 0, 1)[0]).startswith("E")
    meta = store.meta(BID)
    assert (meta["done"], meta["failed"]) == ("1", "1")


def test_complete_counts_and_finishes_batch(store, make_batch):
    cids = make_batch(store, BID, 3)
    store.lease(BID, 0, 3, 60_000, TOKEN)
    assert store.complete(BID, [("R", cids[0], line(cids[0])), ("E", cids[1], line(cids[1]))]) == (1, 1, 0)
    assert store.meta(BID)["state"] == "running" and BID in store.active_batches()
    assert store.complete(BID, [("R", cids[2], line(cids[2]))]) == (1, 0, 0)
    meta = store.meta(BID)
    assert (meta["total"], meta["done"], meta["failed"]) == ("3", "2", "1")
    assert meta["state"] == "finished"
    assert abs(int(meta["finished_at"]) - store.server_time_ms() / 1000) < 5
    assert BID not in store.active_batches()
    assert leases(store) == {} and owners(store) == {}
    assert store.redis.hlen(keys.sub(BID, "req")) == 0
    assert [_s(x)[0] for x in store.results(BID, 0, 10)] == ["R", "E", "R"]
    assert result_ids(store) == cids


def test_complete_does_not_finish_cancelled_batch(store, make_batch):
    cids = make_batch(store, BID, 1)
    store.set_state(BID, "cancelled")
    store.complete(BID, [("R", cids[0], line(cids[0]))])
    assert store.meta(BID)["state"] == "cancelled"


def test_complete_without_items(store, make_batch):
    make_batch(store, BID, 1)
    assert store.complete(BID, []) == (0, 0, 0)
    assert store.meta(BID)["state"] == "running"


# --- requeue ----------------------------------------------------------------------------------


def test_requeue_only_by_owner(store, make_batch):
    make_batch(store, BID, 2)
    lease = store.lease(BID, 0, 1, 60_000, TOKEN)
    cid = lease.jobs[0].custom_id
    for stranger in ("runner-b|0", f"{TOKEN}|1", TOKEN, ""):
        assert store.requeue(BID, stranger, 0, [(cid, 0, True, '{"x": 1}')]) == (0, None)
    assert cid in leases(store) and owners(store)[cid] == OWNER
    assert cid not in todo(store)
    assert store.redis.hget(keys.sub(BID, "attempts"), cid) is None
    assert store.history(BID, cid) == []
    assert store.meta(BID)["retries"] == "0"
    n, earliest = store.requeue(BID, OWNER, 0, [(cid, 0, True, "")])
    assert n == 1 and earliest == pytest.approx(store.server_time_ms(), abs=2_000)
    assert cid not in leases(store) and cid not in owners(store)
    assert cid in todo(store)


def test_requeue_counts_attempts_and_appends_history(store, make_batch):
    make_batch(store, BID, 1)
    records = []
    for i in range(3):
        lease = store.lease(BID, 0, 1, 60_000, TOKEN)
        assert [j.attempts for j in lease.jobs] == [i]
        cid = lease.jobs[0].custom_id
        rec = {"attempt": i, "error": "server_error"}
        records.append(rec)
        assert store.requeue(BID, OWNER, 0, [(cid, 0, True, json.dumps(rec))])[0] == 1
    assert store.history(BID, cid) == records
    assert store.meta(BID)["retries"] == "3"
    # Not counted as an attempt, no record: attempts and history unchanged.
    lease = store.lease(BID, 0, 1, 60_000, TOKEN)
    assert lease.jobs[0].attempts == 3
    assert store.requeue(BID, OWNER, 0, [(cid, 0, False, "")])[0] == 1
    assert store.lease(BID, 0, 1, 60_000, TOKEN).jobs[0].attempts == 3
    assert store.history(BID, cid) == records
    assert store.meta(BID)["retries"] == "3"


def test_requeue_due_only_after_delay(store, make_batch):
    make_batch(store, BID, 2)
    lease = store.lease(BID, 0, 2, 60_000, TOKEN)
    a, b = (j.custom_id for j in lease.jobs)
    n, earliest = store.requeue(BID, OWNER, 0, [(a, 300, True, ""), (b, 5_000, True, "")])
    assert n == 2
    assert earliest == pytest.approx(lease.now_ms + 300, abs=1_000)
    assert todo(store)[a] == earliest and todo(store)[b] == pytest.approx(earliest + 4_700, abs=5)
    early = store.lease(BID, 0, 2, 60_000, TOKEN)
    assert early.jobs == [] and early.next_due_ms == earliest
    time.sleep(max(0.0, (earliest - store.server_time_ms()) / 1000) + 0.05)
    late = store.lease(BID, 0, 2, 60_000, TOKEN)
    assert late.now_ms >= earliest
    assert [(j.custom_id, j.attempts) for j in late.jobs] == [(a, 1)]
    assert late.next_due_ms == todo(store)[b]


def test_requeue_of_ended_job_is_ignored(store, make_batch):
    make_batch(store, BID, 2)
    cid = store.lease(BID, 0, 1, 60_000, TOKEN).jobs[0].custom_id
    store.complete(BID, [("R", cid, line(cid))])
    assert store.requeue(BID, OWNER, 0, [(cid, 0, True, "{}")]) == (0, None)
    assert cid not in todo(store)
    assert store.meta(BID)["retries"] == "0"


# --- renew ------------------------------------------------------------------------------------


def test_renew_extends_only_the_owners_leases(store, make_batch):
    make_batch(store, BID, 4)
    a = store.lease(BID, 0, 2, 1_000, "runner-a")
    b = store.lease(BID, 0, 2, 1_000, "runner-b")
    a_ids, b_ids = [j.custom_id for j in a.jobs], [j.custom_id for j in b.jobs]
    before = leases(store)
    now = store.server_time_ms()
    assert store.renew(BID, "runner-a|0", 60_000, a_ids + b_ids + ["unknown"]) == 2
    after = leases(store)
    for cid in a_ids:
        assert after[cid] >= now + 60_000
    for cid in b_ids:
        assert after[cid] == before[cid]
    assert store.renew(BID, "runner-a|1", 60_000, b_ids) == 0  # right token, wrong shard
    assert store.renew(BID, "runner-a|0", 60_000, []) == 0
    # A lease lost to reclaim cannot be renewed, and renew does not bring it back.
    time.sleep(1.1)
    assert store.reclaim(BID) == 2  # b's two
    assert store.renew(BID, "runner-b|0", 60_000, b_ids) == 0
    assert set(leases(store)) == set(a_ids)


def test_renew_does_not_revive_completed_job(store, make_batch):
    make_batch(store, BID, 2)
    cid = store.lease(BID, 0, 1, 60_000, TOKEN).jobs[0].custom_id
    store.complete(BID, [("R", cid, line(cid))])
    assert store.renew(BID, OWNER, 60_000, [cid]) == 0
    assert leases(store) == {}


# --- reclaim ----------------------------------------------------------------------------------


def test_reclaim_gives_expired_leases_back(store, make_batch):
    cids = make_batch(store, BID, 4, shard_size=2)
    short = store.lease(BID, 1, 1, 50, TOKEN)  # shard 1, expires in 50 ms
    long = store.lease(BID, 1, 1, 60_000, TOKEN)
    cid, kept = short.jobs[0].custom_id, long.jobs[0].custom_id
    assert cid in cids[2:]
    time.sleep(0.15)
    now = store.server_time_ms()
    assert store.reclaim(BID) == 1
    assert set(leases(store)) == {kept} and set(owners(store)) == {kept}
    assert todo(store, 1)[cid] == pytest.approx(now, abs=1_000)
    assert todo(store, 1)[cid] <= store.server_time_ms()  # due now
    assert cid not in todo(store, 0)
    member = keys.parked_member(BID, 1)
    assert parked(store) == {member: todo(store, 1)[cid]}  # the shard is parked, due now
    assert store.redis.hget(keys.sub(BID, "attempts"), cid) is None  # no attempt counted
    assert store.meta(BID)["retries"] == "0"
    assert store.reclaim(BID) == 0
    again = store.lease(BID, 1, 5, 60_000, "runner-b")
    assert [(j.custom_id, j.attempts) for j in again.jobs] == [(cid, 0)]


def test_reclaim_respects_limit(store, make_batch):
    make_batch(store, BID, 5)
    store.lease(BID, 0, 5, 10, TOKEN)
    time.sleep(0.1)
    assert store.reclaim(BID, limit=2) == 2
    assert len(leases(store)) == 3 and len(todo(store)) == 2
    assert store.reclaim(BID) == 3
    assert leases(store) == {} and len(todo(store)) == 5


def test_job_completed_after_reclaim_is_never_handed_out_again(store, make_batch):
    make_batch(store, BID, 2)
    cid = store.lease(BID, 0, 1, 10, "runner-a").jobs[0].custom_id
    time.sleep(0.1)
    assert store.reclaim(BID) == 1
    assert cid in todo(store)
    # The slow runner's answer arrives after all: its outcome is recorded (first outcome wins).
    assert store.complete(BID, [("R", cid, line(cid, by="a"))]) == (1, 0, 0)
    lease = store.lease(BID, 0, 10, 60_000, "runner-b")
    assert cid not in [j.custom_id for j in lease.jobs]
    assert len(lease.jobs) == 1
    assert cid not in todo(store) and cid not in leases(store)
    assert lease.next_due_ms is None
    assert result_ids(store) == [cid]


def test_job_completed_twice_across_a_reclaim(store, make_batch):
    make_batch(store, BID, 1)
    cid = store.lease(BID, 0, 1, 10, "runner-a").jobs[0].custom_id
    time.sleep(0.1)
    store.reclaim(BID)
    assert [j.custom_id for j in store.lease(BID, 0, 1, 60_000, "runner-b").jobs] == [cid]
    assert store.requeue(BID, "runner-a|0", 0, [(cid, 0, True, "{}")]) == (0, None)  # a lost its lease
    assert store.complete(BID, [("R", cid, line(cid, by="a"))]) == (1, 0, 0)
    assert store.complete(BID, [("R", cid, line(cid, by="b"))]) == (0, 0, 1)
    assert store.results_length(BID) == 1
    assert leases(store) == {} and owners(store) == {}
    assert store.meta(BID)["state"] == "finished"


# --- park / promote ---------------------------------------------------------------------------


def test_park_keeps_earliest_due(store):
    member = keys.parked_member(BID, 3)
    now = store.server_time_ms()
    store.park(BID, 3, now + 10_000)
    assert parked(store) == {member: now + 10_000}
    store.park(BID, 3, now + 20_000)
    assert parked(store) == {member: now + 10_000}
    store.park(BID, 3, now + 5_000)
    assert parked(store) == {member: now + 5_000}
    store.park(BID, 3, None)  # due now
    assert parked(store)[member] == pytest.approx(store.server_time_ms(), abs=1_000)
    store.park(BID, 3, now + 50_000)
    assert parked(store)[member] < now + 5_000
    store.unpark(BID, 3)
    assert parked(store) == {}


def test_promote_hands_a_due_shard_out_once(store, make_batch):
    make_batch(store, BID, 6, shard_size=2)
    now = store.server_time_ms()
    store.park(BID, 0, None)
    store.park(BID, 2, now - 1_000)
    store.park(BID, 1, now + 60_000)
    assert store.promote_parked() == 2
    assert rq_count(store) == 2
    jobs = Queue(keys.QUEUE, connection=store.redis, serializer=JSONSerializer).jobs
    assert sorted(tuple(j.args) for j in jobs) == [(BID, 0), (BID, 2)]
    assert {j.func_name for j in jobs} == {RUN_SHARD}
    assert store.promote_parked() == 0  # handed out already
    assert rq_count(store) == 2
    # Still parked (a dead promoter loses nothing), due again after the relapse time; shard 1 untouched.
    p = parked(store)
    assert set(p) == {keys.parked_member(BID, s) for s in (0, 1, 2)}
    assert p[keys.parked_member(BID, 0)] >= now + store_module.PROMOTE_RELAPSE_MS
    assert p[keys.parked_member(BID, 1)] == now + 60_000


def test_promote_respects_limit(store):
    for shard in range(5):
        store.park(BID, shard, None)
    assert store.promote_parked(limit=3) == 3
    assert rq_count(store) == 3
    assert store.promote_parked(limit=3) == 2
    assert rq_count(store) == 5


def test_promoted_shard_due_again_after_relapse_unless_unparked(store, monkeypatch):
    monkeypatch.setattr(store_module, "PROMOTE_RELAPSE_MS", 200)
    store.park(BID, 0, None)
    store.park(BID, 1, None)
    assert store.promote_parked() == 2
    assert store.promote_parked() == 0
    store.unpark(BID, 1)  # shard 1's runner started
    time.sleep(0.3)
    assert store.promote_parked() == 1  # shard 0's runner never started: it is handed out again
    assert rq_count(store) == 3
    jobs = Queue(keys.QUEUE, connection=store.redis, serializer=JSONSerializer).jobs
    assert sorted(tuple(j.args) for j in jobs) == [(BID, 0), (BID, 0), (BID, 1)]


def test_wake_all_shards_parks_shards_with_jobs(store, make_batch):
    make_batch(store, BID, 6, shard_size=2)
    store.lease(BID, 1, 2, 60_000, TOKEN)  # shard 1's todo is empty now
    assert store.wake_all_shards(BID) == 2
    assert set(parked(store)) == {keys.parked_member(BID, 0), keys.parked_member(BID, 2)}


def test_resume_reclaims_and_queues_shards_with_work(store, make_batch):
    make_batch(store, BID, 4, shard_size=2)
    store.lease(BID, 0, 2, 10, TOKEN)  # shard 0: both leased, then its runner dies
    store.set_state(BID, "paused", "401")
    time.sleep(0.05)
    assert store.resume(BID) == 2
    assert store.meta(BID)["state"] == "running" and BID in store.active_batches()
    assert leases(store) == {} and len(todo(store, 0)) == 2
    assert rq_count(store) == 2


# --- changes that used to be a check in Python and a write after it ---------------------------


def test_the_shard_count_only_grows_whatever_order_jobs_arrive_in(store, make_batch):
    make_batch(store, BID, 0)
    store.add_jobs(BID, [("late", 4, request_json(1))])  # a submit that got further first
    store.add_jobs(BID, [("early", 2, request_json(2))])
    assert store.meta(BID)["shards"] == "5"


def test_set_state_only_from_does_not_touch_a_batch_in_another_state(store, make_batch):
    cids = make_batch(store, BID, 1)
    store.complete(BID, [("R", cids[0], line(cids[0]))])
    assert not store.set_state(BID, "paused", "invalid API key", only_from=("running",))
    assert store.meta(BID)["state"] == "finished"
    assert store.set_state(BID, "cancelled", "by the user")
    assert store.meta(BID)["state"] == "cancelled"


# --- counts -----------------------------------------------------------------------------------


def test_counts(store, make_batch):
    cids = make_batch(store, BID, 6, shard_size=3)
    assert store.counts(BID) == {"total": 6, "done": 0, "failed": 0, "retries": 0,
                                 "in_flight": 0, "queued": 6, "waiting_retry": 0}
    lease = store.lease(BID, 0, 3, 60_000, TOKEN)
    assert store.counts(BID)["in_flight"] == 3 and store.counts(BID)["queued"] == 3
    a, b, c = (j.custom_id for j in lease.jobs)
    store.requeue(BID, OWNER, 0, [(a, 60_000, True, "")])
    store.complete(BID, [("R", b, line(b)), ("E", c, line(c))])
    assert store.counts(BID) == {"total": 6, "done": 1, "failed": 1, "retries": 1,
                                 "in_flight": 0, "queued": 3, "waiting_retry": 1}
    d = store.lease(BID, 1, 1, 60_000, TOKEN).jobs[0].custom_id
    assert d in cids[3:]
    counts = store.counts(BID)
    assert (counts["in_flight"], counts["queued"], counts["waiting_retry"]) == (1, 2, 1)


# --- concurrency (real Redis, several processes) ---------------------------------------------

N_JOBS = 600
N_SHARDS = 3
N_PROCS = 4


def _hammer_body(url: str, batch_id: str, cids: list[str], seed: int, barrier, out) -> None:
    """Lease and end jobs as fast as possible; also end random other jobs, and some twice, on purpose."""
    client = redis.Redis.from_url(url)
    store = BatchStore(client)
    rng = random.Random(seed)
    token = f"proc-{seed}"
    stats = Counter()
    hot = cids[::7]  # jobs everybody ends at random, leased by somebody or not
    barrier.wait(timeout=30)
    deadline = time.monotonic() + 60  # far more than it needs (~2 s), for a loaded CI machine
    while time.monotonic() < deadline:
        left = False
        for shard in rng.sample(range(N_SHARDS), N_SHARDS):
            lease = store.lease(batch_id, shard, rng.randint(1, 8), 30_000, token)
            stats["leased"] += len(lease.jobs)
            left = left or bool(lease.jobs) or lease.next_due_ms is not None
            items, back = [], []
            for job in lease.jobs:
                if rng.random() < 0.1:
                    back.append((job.custom_id, rng.randint(0, 5), True, ""))
                else:
                    items.append(("R", job.custom_id, json.dumps({"custom_id": job.custom_id, "by": token})))
            if rng.random() < 0.5:
                other = rng.choice(hot)
                items.append(("R", other, json.dumps({"custom_id": other, "by": token})))
            if items and rng.random() < 0.3:
                items.append(items[0])
            rng.shuffle(items)
            if back:
                stats["requeued"] += store.requeue(batch_id, f"{token}|{shard}", shard, back)[0]
                left = True
            if items:
                nr, ne, dup = store.complete(batch_id, items)
                stats["sent"] += len(items)
                stats["recorded"] += nr + ne
                stats["dup"] += dup
        if not left:
            break
    else:
        stats["timeout"] += 1
    client.close()
    out.put(dict(stats))


@pytest.mark.redis
def test_concurrent_runners_end_each_job_exactly_once(real_redis_url, make_batch):
    client = redis.Redis.from_url(real_redis_url)
    store = BatchStore(client)
    cids = make_batch(store, BID, N_JOBS, shard_size=N_JOBS // N_SHARDS)
    stats = run_in_processes(_hammer_body, [(real_redis_url, BID, cids, seed) for seed in range(N_PROCS)], timeout=90)
    total = Counter()
    for s in stats:
        total.update(s)
    assert total["timeout"] == 0
    assert total["recorded"] == N_JOBS, (stats, store.meta(BID))
    assert total["dup"] > 0 and total["sent"] == total["recorded"] + total["dup"]
    assert total["requeued"] > 0
    assert sum(1 for s in stats if s.get("recorded")) >= 2  # they really raced

    ids = result_ids(store)
    assert len(ids) == N_JOBS
    assert sorted(ids) == sorted(cids)  # every custom_id exactly once
    meta = store.meta(BID)
    assert int(meta["done"]) == int(meta["total"]) == N_JOBS and meta["failed"] == "0"
    assert meta["state"] == "finished" and BID not in store.active_batches()
    assert client.hlen(keys.sub(BID, "status")) == N_JOBS
    assert client.hlen(keys.sub(BID, "req")) == 0
    assert leases(store) == {} and owners(store) == {}
    assert all(client.zcard(keys.todo(BID, s)) == 0 for s in range(N_SHARDS))
    client.close()


def test_park_if_waiting_parks_a_running_shard_with_jobs_left_only(store, make_batch):
    make_batch(store, BID, 3, shard_size=2)  # shard 0: 2 jobs, shard 1: 1 job
    store.lease(BID, 1, 10, 30_000, "r1")
    assert store.park_if_waiting(BID, 0)
    assert not store.park_if_waiting(BID, 1)  # its only job is leased
    assert store.redis.zscore(keys.PARKED, keys.parked_member(BID, 0)) is not None
    store.set_state(BID, "paused", "quota")
    store.unpark(BID, 0)
    assert not store.park_if_waiting(BID, 0)  # a paused batch waits for resume


def test_a_runner_that_dies_before_leasing_anything_still_gets_its_shard_run(store, make_batch):
    make_batch(store, BID, 2, shard_size=2)
    store.hold_shard(BID, 0, 300)  # a runner started: its hold on the shard lasts 300 ms unless renewed
    assert store.promote_parked() == 0  # alive (its hold is not due)
    time.sleep(0.35)  # ...and then killed, before it leased its jobs: nothing to reclaim
    assert store.promote_parked() == 1  # its hold came due: the shard gets a new runner
    assert rq_count(store) == 1


# -- spending cap, purge and expiry (issue 6) ------------------------------------------------


def _lease_all(store, batch_id, shard=0, n=100):
    return [j.custom_id for j in store.lease(batch_id, shard, n, 30_000, "tok").jobs]


def test_cost_reservations_never_let_spent_plus_set_aside_pass_the_cap(store, make_batch):
    make_batch(store, "b", 10, max_cost=1.0)
    cids = _lease_all(store, "b")
    reason, ok = store.reserve_cost("b", "tok|0", [(cid, 0.3) for cid in cids[:5]])
    # 0.3 + 0.3 + 0.3 = 0.9 fits; a fourth would make 1.2 > 1.0: it and those after it are refused.
    assert ok == [True, True, True, False, False]
    assert "past its --max-cost of $1.00" in reason and "batchrun resume b --max-cost" in reason
    meta = store.meta("b")
    assert meta["state"] == "paused" and meta["reason"] == reason
    assert float(meta["cost_reserved"]) == pytest.approx(0.9)
    # A paused batch reserves nothing more.
    assert store.reserve_cost("b", "tok|0", [(cids[5], 0.01)]) == ("", [False])


def test_an_answer_releases_its_worst_case_and_adds_its_real_cost(store, make_batch):
    make_batch(store, "b", 4, max_cost=1.0)
    cids = _lease_all(store, "b")
    store.reserve_cost("b", "tok|0", [(cid, 0.25) for cid in cids])
    line = json.dumps({"custom_id": cids[0]})
    store.complete("b", [("R", cids[0], line, 0.01), ("R", cids[0], line, 0.01)])  # one answer, told twice
    meta = store.meta("b")
    assert float(meta["cost"]) == pytest.approx(0.01)
    assert float(meta["cost_reserved"]) == pytest.approx(0.75)
    # A requeued (refused or failed) request costs nothing and gives its reservation back.
    store.requeue("b", "tok|0", 0, [(cids[1], 0, True, "")])
    assert float(store.meta("b")["cost_reserved"]) == pytest.approx(0.5)
    # Room again: 0.02 spent + 0.5 set aside + 0.45 = 0.97 <= 1.0 (once the job is leased again).
    assert store.reserve_cost("b", "tok|0", [(cids[1], 0.45)])[1] == [False]  # not leased: nothing set aside
    assert _lease_all(store, "b") == [cids[1]]
    assert store.reserve_cost("b", "tok|0", [(cids[1], 0.45)]) == ("", [True])
    # A request that may have been processed before it broke counts at its worst case.
    store.requeue("b", "tok|0", 0, [(cids[2], 0, True, "", True)])
    meta = store.meta("b")
    assert float(meta["cost_unknown"]) == pytest.approx(0.25)
    assert float(meta["cost_reserved"]) == pytest.approx(0.7)


def test_a_dead_workers_reservation_counts_as_spent(store, make_batch):
    make_batch(store, "b", 2, max_cost=1.0)
    cids = [j.custom_id for j in store.lease("b", 0, 10, 1, "tok").jobs]  # 1 ms lease: lapses at once
    store.reserve_cost("b", "tok|0", [(cids[0], 0.4)])
    time.sleep(0.01)
    assert store.reclaim("b") == 2
    meta = store.meta("b")
    assert float(meta["cost_reserved"]) == pytest.approx(0.0)
    assert float(meta["cost_unknown"]) == pytest.approx(0.4)
    # Its request may have been paid for: the cap still counts it.
    assert sorted(_lease_all(store, "b")) == sorted(cids)
    reason, ok = store.reserve_cost("b", "tok|0", [(cids[0], 0.7)])
    assert ok == [False] and "$0.4000 counted for requests whose worker died" in reason


def _lapse(store, batch_id: str, token: str, worst: float) -> list[str]:
    """Lease every job of shard 0 to ``token`` (1 ms), set ``worst`` aside for each, let the leases lapse
    and reclaim them (the runner was cut off from Redis for longer than its lease)."""
    cids = [j.custom_id for j in store.lease(batch_id, 0, 100, 1, token).jobs]
    store.reserve_cost(batch_id, f"{token}|0", [(cid, worst) for cid in cids])
    time.sleep(0.01)
    assert store.reclaim(batch_id) == len(cids)
    return cids


def test_a_retried_complete_call_adds_its_cost_once(store, make_batch):
    make_batch(store, "b", 2, max_cost=1.0)
    cids = _lease_all(store, "b")
    store.reserve_cost("b", "tok|0", [(cid, 0.25) for cid in cids])
    items = [("R", cid, line(cid), 0.01) for cid in cids]
    assert store.complete("b", items, "tok|0") == (2, 0, 0)
    assert store.complete("b", items, "tok|0") == (0, 0, 2)  # its reply was lost: the runner calls again
    meta = store.meta("b")
    assert float(meta["cost"]) == pytest.approx(0.02) and abs(float(meta["cost_reserved"])) < 1e-12
    assert int(meta["done"]) == 2 and len(result_ids(store, "b")) == 2


@pytest.mark.parametrize("first", ["the new lease holder", "the lapsed runner"])
def test_each_attempt_of_a_job_sent_twice_counts_once_at_its_real_cost(store, make_batch, first):
    make_batch(store, "b", 1, max_cost=1.0)
    [cid] = _lapse(store, "b", "a", 0.25)
    assert float(store.meta("b")["cost_unknown"]) == pytest.approx(0.25)  # "a" may have been paid for
    assert _lease_all(store, "b") == [cid]  # runner "tok" sends it again
    store.reserve_cost("b", "tok|0", [(cid, 0.25)])
    reports = [("tok|0", 0.02), ("a|0", 0.01)]  # each runner's answer, at its real cost
    if first == "the lapsed runner":
        reports.reverse()
    assert store.complete("b", [("R", cid, line(cid, by=reports[0][0]), reports[0][1])], reports[0][0]) == (1, 0, 0)
    if first == "the lapsed runner":  # the live attempt keeps what was set aside for it, and its lease
        assert float(store.meta("b")["cost_reserved"]) == pytest.approx(0.25) and cid in leases(store, "b")
    assert store.complete("b", [("R", cid, line(cid, by=reports[1][0]), reports[1][1])], reports[1][0]) == (0, 0, 1)
    meta = store.meta("b")
    assert float(meta["cost"]) == pytest.approx(0.03)  # both were paid, each once
    assert abs(float(meta["cost_unknown"])) < 1e-12 and abs(float(meta["cost_reserved"])) < 1e-12
    assert not leases(store, "b") and not owners(store, "b") and len(result_ids(store, "b")) == 1


def test_a_job_leased_back_by_the_runner_whose_lease_lapsed_counts_once(store, make_batch):
    make_batch(store, "b", 2, max_cost=1.0)
    cids = _lapse(store, "b", "tok", 0.25)
    assert sorted(_lease_all(store, "b")) == sorted(cids)  # the same runner, once Redis is back
    store.complete("b", [("R", cids[0], line(cids[0]), 0.01)], "tok|0")
    store.requeue("b", "tok|0", 0, [(cids[1], 0, True, "", False)])  # a 5xx: not paid
    meta = store.meta("b")
    assert float(meta["cost"]) == pytest.approx(0.01)
    assert abs(float(meta["cost_unknown"])) < 1e-12 and abs(float(meta["cost_reserved"])) < 1e-12
    assert not store.redis.hlen(keys.sub("b", "lapsed"))


def test_a_lapsed_attempt_that_broke_stays_counted_at_its_worst_case(store, make_batch):
    make_batch(store, "b", 1, max_cost=1.0)
    [cid] = _lapse(store, "b", "a", 0.25)
    store.requeue("b", "a|0", 0, [(cid, 0, True, "", True)])  # it timed out: it may have been paid
    assert float(store.meta("b")["cost_unknown"]) == pytest.approx(0.25)
    assert todo(store, 0, "b") and not store.redis.hlen(keys.sub("b", "lapsed"))


def test_an_error_that_may_have_been_paid_counts_its_worst_case_as_unknown(store, make_batch):
    make_batch(store, "b", 2, max_cost=1.0)
    cids = _lease_all(store, "b")
    store.reserve_cost("b", "tok|0", [(cid, 0.25) for cid in cids])
    store.complete("b", [("E", cids[0], line(cids[0]), 0, True), ("E", cids[1], line(cids[1]), 0, False)], "tok|0")
    meta = store.meta("b")
    assert float(meta["cost_unknown"]) == pytest.approx(0.25) and abs(float(meta["cost_reserved"])) < 1e-12
    assert float(meta.get("cost") or 0) == 0 and int(meta["failed"]) == 2


def test_an_outcome_removes_its_job_from_the_todo_set_a_reclaim_put_it_in(store, make_batch):
    cids = make_batch(store, "b", 3)
    _lapse(store, "b", "a", 0.0)
    assert store.counts("b")["queued"] == 3
    store.complete("b", [("R", cid, line(cid), 0) for cid in cids[:2]], "a|0")  # the cut-off runner reports
    assert list(todo(store, 0, "b")) == [cids[2]]
    counts = store.counts("b")
    assert counts["queued"] == 1 and counts["done"] == 2


def test_a_cancelled_batch_takes_nothing_back(store, make_batch):
    make_batch(store, "b", 3)
    cids = _lease_all(store, "b")
    store.set_state("b", "cancelled", "by the user")
    assert store.requeue("b", "tok|0", 0, [(cids[0], 0, True, "")]) == (0, None)
    assert store.redis.zcard(keys.todo("b", 0)) == 0 and store.counts("b")["in_flight"] == 2


def test_metrics_land_in_totals_and_in_the_recent_window(store, make_batch):
    make_batch(store, "b", 1)
    store.add_metrics("b", {"requests": 3, "rate_limited": 1, "requests:gpt-4o-mini": 3, "ended": 0})
    store.add_metrics("b", {"requests": 2, "tokens": 40})
    recent, span = store.recent_metrics("b", 60)
    assert recent["requests"] == 5 and recent["rate_limited"] == 1 and recent["tokens"] == 40
    assert recent["requests:gpt-4o-mini"] == 3 and "ended" not in recent
    assert 0 <= span <= 60
    meta = store.meta("b")
    assert (meta["n_requests"], meta["n_tokens"], meta["n_rate_limited"]) == ("5", "40", "1")
    assert "n_requests:gpt-4o-mini" not in meta  # per-model counts are kept for the window only


def test_purge_removes_every_key_of_the_batch_and_nothing_else(store, make_batch):
    make_batch(store, "gone", 30, shard_size=10)
    make_batch(store, "kept", 5)
    store.lease("gone", 1, 3, 30_000, "tok")
    store.add_metrics("gone", {"requests": 1})
    store.hold_shard("gone", 2)
    assert store.purge("gone") > 0
    left = [k.decode() for k in store.redis.keys("*") if b"gone" in k]
    assert left == []
    assert store.redis.zscore(keys.PARKED, "gone:2") is None
    assert store.recent_batches() == ["kept"] and store.exists("kept")
    # A runner reporting for the purged batch does not bring it back.
    store.add_metrics("gone", {"requests": 1})
    store.complete("gone", [("R", "job-00001", "{}")])
    assert not store.exists("gone")


def test_ended_batches_keys_expire_after_keep_days_and_reopening_keeps_them(store, make_batch):
    make_batch(store, "b", 3, shard_size=2, keep_days=2)
    cids = _lease_all(store, "b") + _lease_all(store, "b", shard=1)
    store.complete("b", [("R", cid, json.dumps({"custom_id": cid})) for cid in cids])
    assert store.meta("b")["state"] == "finished"
    assert store.expire_ended() == 1
    for key in store.batch_keys("b"):
        if store.redis.exists(key):
            assert 2 * 86400 - 10 < store.redis.ttl(key) <= 2 * 86400, key
    # New jobs in the finished batch: it runs again and its keys stay.
    store.add_jobs("b", [("new", 0, json.dumps({"url": "/v1/chat/completions", "body": {"model": "m"}}))])
    store.reopen("b")
    assert store.redis.ttl(keys.batch("b")) == -1
    # A cancelled batch gets its expiry too.
    make_batch(store, "c", 1, keep_days=1)
    store.set_state("c", "cancelled", "by the user")
    assert store.expire_ended() == 1 and store.redis.ttl(keys.batch("c")) > 0


def test_a_lease_carries_the_batchs_cap_so_a_new_one_applies_at_once(store, make_batch):
    make_batch(store, "b", 4)
    assert store.lease("b", 0, 1, 30_000, "tok").max_cost == 0.0
    store.set_max_cost("b", 2.5)
    assert store.lease("b", 0, 1, 30_000, "tok").max_cost == 2.5


def test_expiry_waits_for_requests_in_flight_but_not_for_lapsed_leases(store, make_batch):
    make_batch(store, "b", 3, keep_days=1)
    cids = _lease_all(store, "b")
    store.set_state("b", "cancelled", "by the user")
    assert store.expire_ended() == 0  # three requests still out
    assert store.redis.ttl(keys.batch("b")) == -1
    store.complete("b", [("R", cids[0], json.dumps({"custom_id": cids[0]}))])  # they land
    store.requeue("b", "tok|0", 0, [(cids[1], 0, True, ""), (cids[2], 0, True, "")])
    assert store.expire_ended() == 1
    for key in (keys.batch("b"), keys.sub("b", "results"), keys.sub("b", "status")):
        assert 0 < store.redis.ttl(key) <= 86400, key
    assert not store.redis.sismember(keys.ENDED, "b")
    # A dead worker's leases (lapsed; nobody reclaims an ended batch) do not hold it back.
    make_batch(store, "c", 2)
    store.lease("c", 0, 2, 1, "tok")
    store.set_state("c", "cancelled", "by the user")
    time.sleep(0.01)
    assert store.expire_ended() == 1 and store.redis.ttl(keys.batch("c")) > 0


def test_a_runner_of_a_purged_batch_lets_go_of_its_shard(store, make_batch):
    import asyncio

    from batchrun.settings import WorkerSettings
    from batchrun.runner.shard import ShardRunner

    make_batch(store, "b", 5)
    store.purge("b")
    store.hold_shard("b", 0)  # a runner's renewal that came after the purge
    runner = ShardRunner(store, "b", 0, WorkerSettings(base_url="http://127.0.0.1:9/v1", api_key="sk-x"))
    assert asyncio.run(runner.run()) == {}
    assert store.redis.zscore(keys.PARKED, "b:0") is None
    assert not store.exists("b")


# --- shard jobs queued by the version before the layout (b0fdd1d) -----------------------------------

LEGACY_RUN_SHARD = "batchrun.shard.run_shard"  # RUN_SHARD before 7a37836 moved shard.py to runner/


def test_a_shard_job_queued_by_the_version_before_the_layout_is_still_run():
    import fakeredis
    from rq.job import Job

    from batchrun.runner.worker import BatchJob, refusal

    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    # What b0fdd1d's enqueue_shards put on the queue (Queue.prepare_data with its RUN_SHARD).
    data = Queue.prepare_data(LEGACY_RUN_SHARD, args=("b-1", 0), timeout=store_module.SHARD_JOB_TIMEOUT,
                              result_ttl=0, failure_ttl=86400, description="batchrun shard b-1:0")
    job = Queue(keys.QUEUE, connection=conn, serializer=JSONSerializer).enqueue_many([data])[0]
    job = BatchJob.fetch(job.id, connection=conn, serializer=JSONSerializer)
    assert isinstance(job, Job)
    assert refusal(job) is None
    assert job.func.__name__ == "run_shard"
