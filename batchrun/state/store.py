"""A batch's state in Redis, through thin wrappers over the Lua scripts.

Every change several workers can race on is one script call; everything here
is synchronous (redis-py), and the asyncio shard runner calls it from a thread.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rq import Queue
from rq.serializers import JSONSerializer

from batchrun.state import keys
from batchrun.state.meta import BatchMeta, decode_hash
from batchrun.state.items import CompleteItem, Completed, OutcomeKind, RequeueItem, Requeued
from batchrun.state.scripts import Scripts
from batchrun.state.states import BatchState, PauseKind
from batchrun.settings import BatchOptions
from batchrun.text import decoded as _s
from batchrun.urls import mask_url

RUN_SHARD = "batchrun.runner.shard.run_shard"
SHARD_JOB_TIMEOUT = 4 * 3600  # runners yield long before this (WorkerSettings.max_shard_seconds)
PROMOTE_RELAPSE_MS = 30_000  # a promoted shard whose runner never starts is due again after this
_RECLAIM_SUBKEYS = ("leases", "owner", "costres", "lapsed", "status")  # reclaim.lua's KEYS[3..7]
_LEASE_SUBKEYS = ("status", "leases", "owner", "req", "attempts")  # lease.lua's KEYS[3..7]
_REQUEUE_SUBKEYS = ("lapsed", "owner", "status", "leases", "costres", "attempts", "history")  # requeue.lua's KEYS[3..9]
_COMPLETE_SUBKEYS = ("status", "owner", "lapsed", "costres", "leases", "results", "req")  # complete.lua's KEYS[4..10]


@dataclass(frozen=True, slots=True)
class LeasedJob:
    custom_id: str
    attempts: int  # failed attempts so far
    request: dict  # {"method", "url", "body"}


@dataclass(frozen=True, slots=True)
class Lease:
    state: str  # the batch's state: only 'running' hands out jobs
    next_due_ms: int | None  # earliest due time left in the shard's todo set
    now_ms: int  # Redis server time when the lease was taken
    jobs: list[LeasedJob]
    max_cost: float = 0.0  # the batch's spending cap now (0: none)


class BatchStore:
    def __init__(self, redis):
        self.redis = redis
        self.scripts = Scripts(redis)
        self.queue = Queue(keys.QUEUE, connection=redis, serializer=JSONSerializer)

    # -- batches ---------------------------------------------------------

    def create_batch(self, batch_id: str, options: BatchOptions, source: str = "", prices: str = "",
                     requests_digest: str = "") -> bool:
        """Create the batch if it is new; returns False if it existed (its options stay).
        ``prices`` is the price table (JSON) its workers use, so every machine counts alike;
        ``requests_digest`` names the requests given from Python, so a later call can tell its own."""
        key = keys.batch(batch_id)
        fields = {"state": BatchState.RUNNING, "total": 0, "done": 0, "failed": 0, "retries": 0,
                  "shards": 0, "created": self.server_time_ms() // 1000, "source": source, **options.to_fields()}
        if prices:
            fields["prices"] = prices
        if requests_digest:
            fields["requests_digest"] = requests_digest
        created = self.redis.hsetnx(key, "created", fields["created"])
        if created:
            pipe = self.redis.pipeline()
            pipe.hset(key, mapping=fields)
            pipe.zadd(keys.BATCHES, {batch_id: fields["created"]})
            pipe.sadd(keys.ACTIVE, batch_id)
            pipe.execute()
        return bool(created)

    def set_max_cost(self, batch_id: str, usd: float) -> None:
        self.redis.hset(keys.batch(batch_id), "max_cost", repr(float(usd)))

    def set_prices(self, batch_id: str, table_json: str) -> None:
        self.redis.hset(keys.batch(batch_id), "prices", table_json)

    def committed_cost(self, batch_id: str) -> float:
        """Spent, set aside for requests in flight, and counted for requests whose worker died."""
        values = self.redis.hmget(keys.batch(batch_id), "cost", "cost_reserved", "cost_unknown")
        return sum(float(v or 0) for v in values)

    def exists(self, batch_id: str) -> bool:
        return bool(self.redis.exists(keys.batch(batch_id)))

    def meta(self, batch_id: str) -> dict[str, str]:
        """The batch's hash as text ({} if there is none); ``batch_meta`` reads it typed."""
        return decode_hash(self.redis.hgetall(keys.batch(batch_id)))

    def batch_meta(self, batch_id: str) -> BatchMeta | None:
        """The batch's hash, typed; None if there is no such batch."""
        raw = self.redis.hgetall(keys.batch(batch_id))
        return BatchMeta.from_hash(raw) if raw else None

    def options(self, batch_id: str) -> BatchOptions:
        return BatchOptions.from_fields(self.meta(batch_id))

    def active_batches(self) -> list[str]:
        return sorted(_s(b) for b in self.redis.smembers(keys.ACTIVE))

    def recent_batches(self, n: int = 20) -> list[str]:
        """The newest batches first; those whose keys have expired are dropped from the index."""
        ids = [_s(b) for b in self.redis.zrevrange(keys.BATCHES, 0, n - 1)]
        pipe = self.redis.pipeline()
        for bid in ids:
            pipe.exists(keys.batch(bid))
        gone = [bid for bid, alive in zip(ids, pipe.execute()) if not alive]
        if gone:
            self.redis.zrem(keys.BATCHES, *gone)
        return [bid for bid in ids if bid not in gone]

    def set_state(self, batch_id: str, state: BatchState, reason: str = "", *,
                  only_from: tuple[BatchState, ...] = (), pause_kind: PauseKind | None = None) -> bool:
        """Move the batch to ``state`` (only from one of ``only_from``, when given), atomically.
        The pause kind (why it paused, for the code that acts on it) is cleared unless given."""
        return bool(self.scripts.set_state(keys=[keys.batch(batch_id), keys.ACTIVE, keys.ENDED],
                                           args=[batch_id, BatchState(state), reason, pause_kind or "",
                                                 *(BatchState(s) for s in only_from)]))

    # -- jobs ------------------------------------------------------------

    def add_jobs(self, batch_id: str, items: list[tuple[str, int, str]]) -> tuple[int, list[int]]:
        """Add (custom_id, shard, request JSON) items; returns (added, shards that got jobs)."""
        args: list = []
        for cid, shard, req in items:
            args += (cid, shard, req)
        out = self.scripts.add_jobs(
            keys=[keys.batch(batch_id), keys.sub(batch_id, "status"), keys.sub(batch_id, "req")],
            args=[keys.todo_prefix(batch_id), *args])
        return int(out[0]), [int(s) for s in out[1:]]

    def serve_cached(self, batch_id: str, items: list[tuple[str, str, float]]) -> tuple[int, float]:
        """End (custom_id, result line JSON, USD saved) jobs with answers from the response cache as
        they are submitted (serve_cached.lua); those the batch knows already are left as they are.
        Returns (jobs served, USD saved)."""
        args: list = []
        for cid, line, saved in items:
            args += (cid, line, repr(float(saved)) if saved else "0")
        out = self.scripts.serve_cached(keys=[keys.batch(batch_id), keys.sub(batch_id, "status"),
                                              keys.sub(batch_id, "req"), keys.sub(batch_id, "results")], args=args)
        return int(out[0]), float(_s(out[1]))

    def finish_ended(self, batch_id: str) -> bool:
        """Finish the batch if it is running and every job has ended, judged atomically on the counts
        as they are now (finish_ended.lua); True if it finished now."""
        return bool(self.scripts.finish_ended(keys=[keys.batch(batch_id), keys.ACTIVE, keys.ENDED], args=[batch_id]))

    def reopen(self, batch_id: str) -> None:
        """New jobs in a finished batch: it runs again, and its keys no longer expire."""
        if self.set_state(batch_id, BatchState.RUNNING, only_from=(BatchState.FINISHED,)):
            pipe = self.redis.pipeline()
            for key in self.batch_keys(batch_id):
                pipe.persist(key)
            pipe.srem(keys.ENDED, batch_id)
            pipe.execute()

    def lease(self, batch_id: str, shard: int, n: int, lease_ms: int, token: str) -> Lease:
        out = self.scripts.lease(keys=[keys.batch(batch_id), keys.todo(batch_id, shard),
                                       *(keys.sub(batch_id, name) for name in _LEASE_SUBKEYS)],
                                 args=[shard, n, lease_ms, token])
        state, next_due, now, max_cost = _s(out[0]), _s(out[1]), int(_s(out[2])), float(_s(out[3]))
        jobs = []
        for i in range(4, len(out), 3):
            raw = out[i + 2]
            if not raw:
                continue
            jobs.append(LeasedJob(_s(out[i]), int(out[i + 1]), json.loads(raw)))
        return Lease(state, int(float(next_due)) if next_due else None, now, jobs, max_cost)

    def complete(self, batch_id: str, items: list[CompleteItem], owner: str = "") -> Completed:
        """Record final outcomes, reported by the runner ``owner`` (its cost counts only for attempts
        it answers for; see complete.lua). Plain tuples in CompleteItem's order are read too."""
        args: list = [batch_id, owner]
        for item in items:
            kind, cid, line, cost, paid, cached = CompleteItem(*item)
            args += (OutcomeKind(kind).value, cid, line, repr(cost) if cost else "0",
                     "C" if cached else "1" if paid else "0")
        shard = keys.owner_shard(owner)
        out = self.scripts.complete(keys=[keys.batch(batch_id), keys.ACTIVE, keys.ENDED,
                                          *(keys.sub(batch_id, name) for name in _COMPLETE_SUBKEYS),
                                          *([keys.todo(batch_id, shard)] if shard is not None else [])],
                                    args=args)
        return Completed(int(out[0]), int(out[1]), int(out[2]))

    def reserve_cost(self, batch_id: str, owner: str, items: list[tuple[str, float]]) -> tuple[str, list[bool]]:
        """Set aside each (custom_id, worst-case USD) of jobs ``owner`` leased, under the batch's
        --max-cost. Returns the reason the batch was paused ('' if it was not) and, per item,
        whether it may be sent."""
        args: list = [batch_id, owner]
        for cid, worst in items:
            args += (cid, repr(float(worst)))
        out = self.scripts.reserve_cost(keys=[keys.batch(batch_id), keys.sub(batch_id, "owner"),
                                              keys.sub(batch_id, "costres")], args=args)
        return _s(out[0]), [bool(int(x)) for x in out[1:]]

    def add_metrics(self, batch_id: str, counts: dict[str, int]) -> None:
        """Add a runner's counts (requests, tokens, rate_limited, ...) to the batch's totals and
        to the current 5-second bucket."""
        args: list = []
        for name, n in counts.items():
            if n:
                args += (name, int(n))
        if args:
            self.scripts.metrics(keys=[keys.batch(batch_id), keys.sub(batch_id, "counts")],
                                 args=[keys.metrics_prefix(batch_id), *args])

    def recent_metrics(self, batch_id: str, seconds: int = 60) -> tuple[dict[str, int], float]:
        """Counts summed over the last ``seconds`` (whole 5-second buckets), and the span in
        seconds they cover (the current bucket counts for the part of it that has passed)."""
        now_ms = self.server_time_ms()
        current = now_ms // 5000
        n = max(1, seconds // 5)
        pipe = self.redis.pipeline()
        for bucket in range(current - n + 1, current + 1):
            pipe.hgetall(keys.metrics_bucket(batch_id, bucket))
        totals: dict[str, int] = {}
        for h in pipe.execute():
            for k, v in h.items():
                totals[_s(k)] = totals.get(_s(k), 0) + int(v)
        span = (n - 1) * 5 + (now_ms % 5000) / 1000
        return totals, span

    def requeue(self, batch_id: str, owner: str, shard: int, items: list[RequeueItem]) -> Requeued:
        """Give leased jobs back with a delay (plain tuples in RequeueItem's order are read too)."""
        args: list = [owner, shard]
        for item in items:
            cid, delay_ms, counts, record, paid = RequeueItem(*item)
            args += (cid, max(0, int(delay_ms)), "1" if counts else "0", record, "1" if paid else "0")
        out = self.scripts.requeue(keys=[keys.batch(batch_id), keys.todo(batch_id, shard),
                                         *(keys.sub(batch_id, name) for name in _REQUEUE_SUBKEYS)], args=args)
        return Requeued(int(out[0]), int(float(_s(out[1]))) if _s(out[1]) else None)

    def renew(self, batch_id: str, owner: str, lease_ms: int, custom_ids: list[str]) -> int:
        if not custom_ids:
            return 0
        return int(self.scripts.renew(keys=[keys.sub(batch_id, "owner"), keys.sub(batch_id, "leases")],
                                      args=[owner, lease_ms, *custom_ids]))

    def batch_keys(self, batch_id: str) -> list[str]:
        """Every key of a batch but its 5-second metric buckets (which expire by themselves)."""
        n = int(self.redis.hget(keys.batch(batch_id), "shards") or 0)
        return [keys.batch(batch_id), *(keys.sub(batch_id, name) for name in keys.SUBKEYS),
                *(keys.todo(batch_id, shard) for shard in range(n))]

    def expire_ended(self, limit: int = 100) -> int:
        """Give the keys of batches that finished or were cancelled their expiry (``keep_days``),
        once their last requests in flight have landed. Returns how many batches got it."""
        done = 0
        for raw in self.redis.srandmember(keys.ENDED, limit) or ():
            batch_id = _s(raw)
            out = self.scripts.expire_batch(
                keys=[keys.batch(batch_id), keys.ENDED, keys.PARKED, keys.sub(batch_id, "leases"),
                      *(keys.sub(batch_id, n) for n in keys.SUBKEYS if n != "leases")],
                args=[batch_id, keys.todo_prefix(batch_id), keys.parked_prefix(batch_id)])
            done += int(out) == 1
        return done

    def purge(self, batch_id: str) -> int:
        """Remove every key of a batch (cancelling it first, so runners stop). Returns keys deleted."""
        self.set_state(batch_id, BatchState.CANCELLED, "purged")
        n_shards = int(self.redis.hget(keys.batch(batch_id), "shards") or 0)
        # Sub-keys are found by name too, so that keys left without their hash go as well.
        doomed = set(self.batch_keys(batch_id))
        doomed |= {_s(k) for k in self.redis.scan_iter(match=keys.batch_pattern(batch_id), count=1000)}
        doomed = sorted(doomed)
        pipe = self.redis.pipeline()
        chunks = range(0, len(doomed), 1000)
        for i in chunks:
            pipe.delete(*doomed[i:i + 1000])
        pipe.zrem(keys.BATCHES, batch_id)
        pipe.srem(keys.ACTIVE, batch_id)
        pipe.srem(keys.ENDED, batch_id)
        if n_shards:
            pipe.zrem(keys.PARKED, *(keys.parked_member(batch_id, s) for s in range(n_shards)))
        return sum(int(x) for x in pipe.execute()[:len(chunks)])

    def reclaim(self, batch_id: str, limit: int = 1000) -> int:
        return int(self.scripts.reclaim(
            keys=[keys.batch(batch_id), keys.PARKED, *(keys.sub(batch_id, n) for n in _RECLAIM_SUBKEYS)],
            args=[batch_id, limit, keys.todo_prefix(batch_id), keys.parked_prefix(batch_id)]))

    def history(self, batch_id: str, custom_id: str) -> list[dict]:
        raw = self.redis.hget(keys.sub(batch_id, "history"), custom_id)
        return [json.loads(line) for line in _s(raw).splitlines()] if raw else []

    # -- shards and the RQ queue --------------------------------------------

    def enqueue_shards(self, batch_id: str, shards: list[int]) -> None:
        """Put RQ jobs on the queue that run these shards. Running a shard twice is
        harmless (jobs are leased one by one), so this may be called liberally."""
        if not shards:
            return
        datas = [
            Queue.prepare_data(RUN_SHARD, args=(batch_id, shard), timeout=SHARD_JOB_TIMEOUT,
                               result_ttl=0, failure_ttl=86400, description=f"batchrun shard {batch_id}:{shard}")
            for shard in shards
        ]
        for i in range(0, len(datas), 1000):
            self.queue.enqueue_many(datas[i:i + 1000])

    def park(self, batch_id: str, shard: int, due_ms: int | None) -> None:
        self.scripts.park(keys=[keys.PARKED], args=[keys.parked_member(batch_id, shard), "" if due_ms is None else due_ms])

    def park_if_waiting(self, batch_id: str, shard: int) -> bool:
        """A runner leaving its shard: if jobs are left and the batch runs, the shard's entry becomes
        the earliest due time among them (replacing the runner's hold); returns whether it did."""
        first = self.redis.zrange(keys.todo(batch_id, shard), 0, 0, withscores=True)
        if not first or _s(self.redis.hget(keys.batch(batch_id), "state") or b"") != BatchState.RUNNING:
            return False
        self.redis.zadd(keys.PARKED, {keys.parked_member(batch_id, shard): int(first[0][1])})
        return True

    def hold_shard(self, batch_id: str, shard: int, ms: int = PROMOTE_RELAPSE_MS) -> None:
        """A live runner's lease on its shard: the parked entry comes due only if it stops renewing."""
        self.scripts.park(keys=[keys.PARKED], args=[keys.parked_member(batch_id, shard), ms, "hold"])

    def unpark(self, batch_id: str, shard: int) -> None:
        self.redis.zrem(keys.PARKED, keys.parked_member(batch_id, shard))

    def promote_parked(self, limit: int = 100) -> int:
        """Enqueue runners for parked shards whose time has come."""
        members = self.scripts.promote(keys=[keys.PARKED], args=[limit, PROMOTE_RELAPSE_MS])
        by_batch: dict[str, list[int]] = {}
        for m in members:
            batch_id, shard = keys.split_parked_member(_s(m))
            by_batch.setdefault(batch_id, []).append(shard)
        for batch_id, shards in by_batch.items():
            self.enqueue_shards(batch_id, shards)
        return len(members)

    def wake_all_shards(self, batch_id: str) -> int:
        """Park every shard that still has jobs, due now (used by resume)."""
        meta = self.batch_meta(batch_id)
        n = meta.shards if meta else 0
        pipe = self.redis.pipeline()
        for shard in range(n):
            pipe.zcard(keys.todo(batch_id, shard))
        waiting = [shard for shard, count in enumerate(pipe.execute()) if count]
        for shard in waiting:
            self.park(batch_id, shard, None)
        return len(waiting)

    def resume(self, batch_id: str) -> int:
        """Run a paused or interrupted batch again: expired leases come back, and every shard
        with work left gets a runner (queued work is not duplicated: shards are idempotent).
        Returns the number of shards queued."""
        self.set_state(batch_id, BatchState.RUNNING, only_from=(BatchState.PAUSED, BatchState.RUNNING))
        self.reclaim(batch_id)
        n = self.wake_all_shards(batch_id)
        self.promote_parked()
        return n

    # -- progress ------------------------------------------------------------

    def counts(self, batch_id: str) -> dict[str, int]:
        """Jobs by where they are: total, done, failed, in_flight, queued, waiting_retry, retries."""
        meta = self.batch_meta(batch_id) or BatchMeta.from_hash({})
        n_shards = meta.shards
        now_ms = self.server_time_ms()
        pipe = self.redis.pipeline()
        pipe.zcard(keys.sub(batch_id, "leases"))
        for shard in range(n_shards):
            pipe.zcount(keys.todo(batch_id, shard), "-inf", now_ms)
            pipe.zcount(keys.todo(batch_id, shard), f"({now_ms}", "+inf")
        res = pipe.execute()
        return {
            "total": meta.total,
            "done": meta.done,
            "failed": meta.failed,
            "retries": meta.retries,
            "in_flight": int(res[0]),
            "queued": sum(res[1::2]),
            "waiting_retry": sum(res[2::2]),
        }

    def fleet_conditions(self) -> dict[str, list[dict]]:
        """What holds the whole fleet back now: open circuits and budget cooldowns."""
        now_ms = self.server_time_ms()
        circuits, cooldowns = [], []
        for key in self.redis.scan_iter(match=keys.CIRCUIT_PATTERN, count=100):
            c = {_s(k): _s(v) for k, v in self.redis.hgetall(key).items()}
            if c.get("state") == "open":
                circuits.append({"endpoint": mask_url(c.get("url", "?")),  # as stored by older workers too
                                 "seconds_left": max(0.0, (float(c.get("open_until", 0)) - now_ms) / 1000)})
        for key in self.redis.scan_iter(match=keys.BUDGET_PATTERN, count=100):
            until = self.redis.hget(key, "cool_until")
            if until and float(until) > now_ms:
                model = keys.split_budget(_s(key)).model
                cooldowns.append({"model": model, "seconds_left": (float(until) - now_ms) / 1000})
        return {"circuits": circuits, "cooldowns": cooldowns}

    def server_time_ms(self) -> int:
        sec, usec = self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000

    def results(self, batch_id: str, start: int, count: int) -> list[bytes]:
        return self.redis.lrange(keys.sub(batch_id, "results"), start, start + count - 1)

    def results_length(self, batch_id: str) -> int:
        return int(self.redis.llen(keys.sub(batch_id, "results")))
