"""What the fair share between batches reads and writes in Redis (the rules: policy/fairshare.py).

- a batch's priority: the ``priority`` field of its hash (``set_priority.lua``);
- the shard runners alive: ``keys.RUNNERS``, each entry renewed by its runner and gone with it
  (or expired, if its process died), so each batch's runners can be counted;
- when each batch last got a worker (``keys.SERVED``), for round robin;
- which batches have shard jobs waiting in the RQ queue (read from the first jobs' descriptions),
  and moving the fair choice to the front of the queue (``to_front.lua``);
- each budget's fair-share hash (``state/lua/_fairshare.lua``, kept by reserve.lua), read back
  for ``status``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rq.job import Job

from batchrun.policy.fairshare import Priority, budget_shares, parse_priority, stored_priority
from batchrun.state import keys
from batchrun.state.store import BatchStore
from batchrun.text import decoded as _s

SERVED_KEEP_MS = 86_400_000  # a day
RUNNER_TTL_MS = 10_000  # a runner's entry lapses this long after its last renewal (a killed process)
QUEUE_LOOK = 200  # queued RQ jobs looked at to see which batches wait for a worker
ACTIVE_MS = 3000  # as in _fairshare.lua: a batch that reserved this recently is active on the budget
SHARD_DESCRIPTION = "batchrun shard "  # store.enqueue_shards: "batchrun shard BATCH_ID:SHARD"


@dataclass(frozen=True, slots=True)
class FleetShare:
    """How the fleet is shared now: runners per batch, batches waiting for a worker (with the job
    id of the first shard of each), each batch's weight, when each was last served."""

    running: dict[str, int]
    waiting: dict[str, str]  # batch id -> its first queued job id
    weights: dict[str, float]
    last_served: dict[str, float]


@dataclass(frozen=True, slots=True)
class BudgetShare:
    """A batch's share of one budget now: by weight among the batches active on it."""

    budget_key: str
    share: float  # 0..1 (a low batch sharing with others: 0, it takes what they leave)
    batches: int  # batches active on the budget, this one included


class FairShare:
    def __init__(self, store: BatchStore):
        self.store = store
        self.redis = store.redis

    # -- priorities -----------------------------------------------------------------

    def priority(self, batch_id: str) -> Priority:
        return stored_priority(self.redis.hget(keys.batch(batch_id), "priority"))

    def priorities(self, batch_ids) -> dict[str, Priority]:
        ids = list(batch_ids)
        pipe = self.redis.pipeline()
        for b in ids:
            pipe.hget(keys.batch(b), "priority")
        return {b: stored_priority(raw) for b, raw in zip(ids, pipe.execute())}

    def set_priority(self, batch_id: str, priority: str | Priority) -> Priority | None:
        """Set a batch's priority; its runners apply it within a second or two. Returns the one it
        had, None if there is no such batch."""
        new = priority if isinstance(priority, Priority) else parse_priority(priority)
        old = self.store.scripts.set_priority(keys=[keys.batch(batch_id)], args=[new.text])
        return None if old is None else stored_priority(_s(old))

    # -- runners and workers ----------------------------------------------------------

    def runner_alive(self, batch_id: str, token: str) -> None:
        """A runner of ``batch_id`` holds a worker (renewed every second or so by the runner)."""
        now = self.store.server_time_ms()
        pipe = self.redis.pipeline()
        pipe.zadd(keys.RUNNERS, {f"{batch_id}|{token}": now + RUNNER_TTL_MS})
        pipe.zremrangebyscore(keys.RUNNERS, "-inf", now)
        pipe.execute()

    def runner_gone(self, batch_id: str, token: str) -> None:
        self.redis.zrem(keys.RUNNERS, f"{batch_id}|{token}")

    def served(self, batch_id: str) -> None:
        """A worker starts one of ``batch_id``'s shards (round robin goes on from here). Batches not
        served for SERVED_KEEP_MS are forgotten, so the set stays as small as the fleet's recent work."""
        now = self.store.server_time_ms()
        pipe = self.redis.pipeline()
        pipe.zadd(keys.SERVED, {batch_id: now})
        pipe.zremrangebyscore(keys.SERVED, "-inf", now - SERVED_KEEP_MS)
        pipe.execute()

    def running(self) -> dict[str, int]:
        now = self.store.server_time_ms()
        counts: dict[str, int] = {}
        for member in self.redis.zrangebyscore(keys.RUNNERS, now, "+inf"):
            batch_id = _s(member).rpartition("|")[0]
            counts[batch_id] = counts.get(batch_id, 0) + 1
        return counts

    def waiting(self) -> dict[str, str]:
        """Batches with shard jobs in the RQ queue (its first QUEUE_LOOK jobs): batch -> first job id."""
        queue_key = self.store.queue.key
        ids = [_s(j) for j in self.redis.lrange(queue_key, 0, QUEUE_LOOK - 1)]
        if not ids:
            return {}
        pipe = self.redis.pipeline()
        for job_id in ids:
            pipe.hget(Job.key_for(job_id), "description")
        found: dict[str, str] = {}
        for job_id, description in zip(ids, pipe.execute()):
            text = _s(description or b"")
            if text.startswith(SHARD_DESCRIPTION):
                found.setdefault(text[len(SHARD_DESCRIPTION):].rpartition(":")[0], job_id)
        return found

    def fleet(self, waiting: dict[str, str] | None = None) -> FleetShare:
        waiting = self.waiting() if waiting is None else waiting
        running = self.running()
        batches = set(running) | set(waiting)
        weights = {b: p.weight for b, p in self.priorities(batches).items()}
        served = {_s(b): float(ms) for b, ms in self.redis.zrange(keys.SERVED, 0, -1, withscores=True)} if waiting else {}
        return FleetShare(running, waiting, weights, served)

    def to_front(self, job_id: str) -> bool:
        return bool(self.store.scripts.to_front(keys=[self.store.queue.key], args=[job_id]))

    # -- budgets ------------------------------------------------------------------

    def budget_shares(self, batch_id: str) -> list[BudgetShare]:
        """The batch's share of each budget it is active on now (for `status` and `list`)."""
        now = self.store.server_time_ms()
        out = []
        for budget_key in sorted(_s(k) for k in self.redis.smembers(keys.BUDGETS)):
            fields = {_s(k): _s(v) for k, v in self.redis.hgetall(keys.fair_share(budget_key)[0]).items()}
            weights = {}
            for name, value in fields.items():
                if not name.startswith("at:"):
                    continue
                b = name[3:]
                if float(fields.get(f"q:{b}", 0) or 0) > 0 or now - float(value) < ACTIVE_MS:
                    weights[b] = float(fields.get(f"w:{b}", 1) or 0)
            if batch_id in weights:
                out.append(BudgetShare(budget_key, budget_shares(weights)[batch_id], len(weights)))
        return out
