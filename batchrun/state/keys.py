"""Redis key names, in one place.

Everything batchrun keeps lives under one prefix. A batch is a hash at
``batchrun:batch:ID``; its per-job structures hang off that name:

==================  ======  ==================================================
``…:req``           hash    custom_id -> request JSON, until the job ends
``…:todo:N``        zset    shard N's jobs waiting to be sent -> due ms
``…:leases``        zset    jobs in flight -> lease expiry ms
``…:owner``         hash    jobs in flight -> "runner-token|shard"
``…:attempts``      hash    custom_id -> failed attempts so far
``…:history``       hash    custom_id -> JSON lines, one per failed attempt
``…:status``        hash    custom_id -> 'R' (result) or 'E' (error), once ended
``…:results``       list    'R'/'E' + output line, in the order jobs ended
``…:costres``       hash    custom_id -> worst-case USD set aside (--max-cost)
``…:lapsed``        hash    "owner custom_id" -> worst case counted for a lapsed lease
``…:m:BUCKET``      hash    counts in one 5-second bucket (expires after an hour)
``…:counts``        hash    running totals of the per-model and per-budget counts (/metrics)
``…:rparts``        hash    part number -> remote batch record JSON (--via batch-api)
``…:rids``          hash    part number -> its custom_ids, one a line
``…:rlock``         string  the token of the runner driving its remote batches (expires)
==================  ======  ==================================================

A budget (``batchrun:budget:ENDPOINT:KEYFP:MODEL``) has its runners' held reservations
at ``…:held``; a circuit is ``batchrun:circuit:ENDPOINT``. Lua scripts get every key
they touch from here, through KEYS; only per-shard todo sets and metric buckets, whose
names depend on what a script reads, are derived in Lua from a prefix built here.
"""

from __future__ import annotations

import hashlib
import re
from typing import NamedTuple

PREFIX = "batchrun"
BATCHES = f"{PREFIX}:batches"  # zset batch id -> created (unix s), for `list`
ACTIVE = f"{PREFIX}:active"  # set of batch ids with work left
PARKED = f"{PREFIX}:parked"  # zset "batch_id:shard" -> due ms
BUDGETS = f"{PREFIX}:budgets"  # set of budget keys in use (for maintenance and `limits`)
ENDED = f"{PREFIX}:ended"  # set of batch ids that ended and whose keys need an expiry
QUEUE = "batchrun"  # the RQ queue shard jobs go to

BATCH_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def batch(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


def sub(batch_id: str, name: str) -> str:
    return f"{batch(batch_id)}:{name}"


# A batch's keys besides its hash and the per-shard todo sets.
SUBKEYS = ("req", "leases", "owner", "attempts", "history", "status", "results", "costres", "lapsed", "counts",
           "rparts", "rids", "rlock")  # the last three: its remote batches (state/remote_parts.py)


def todo(batch_id: str, shard: int) -> str:
    return f"{todo_prefix(batch_id)}{shard}"


def owner_shard(owner: str) -> int | None:
    """The shard of a lease owner string ("token|shard", as runners sign their leases), or None
    for a caller without one ('')."""
    token, bar, shard = owner.rpartition("|")
    return int(shard) if bar and shard.isdigit() else None


def todo_prefix(batch_id: str) -> str:
    """What a shard number follows in its todo set's name (for scripts that find the shard)."""
    return f"{batch(batch_id)}:todo:"


def metrics_bucket(batch_id: str, bucket: int) -> str:
    """The counts of one 5-second bucket (number: Redis time in s // 5)."""
    return f"{metrics_prefix(batch_id)}{bucket}"


def metrics_prefix(batch_id: str) -> str:
    return f"{batch(batch_id)}:m:"


def batch_pattern(batch_id: str) -> str:
    """A SCAN pattern for every key under the batch's name (its hash excepted)."""
    return f"{batch(batch_id)}:*"


def circuit(endpoint_id: str) -> str:
    return f"{PREFIX}:circuit:{endpoint_id}"


def endpoint_id(base_url: str) -> str:
    """A short, stable name for an API base URL (a trailing slash makes no difference)."""
    return hashlib.sha256(base_url.rstrip("/").encode()).hexdigest()[:10]


def slots(endpoint_id: str) -> str:
    """The leases on an endpoint's fleet-wide max_in_flight (zset member -> expiry ms)."""
    return f"{PREFIX}:slots:{endpoint_id}"


def budget_id(base_url: str, key_fingerprint: str, model: str) -> str:
    return f"{endpoint_id(base_url)}:{key_fingerprint}:{model}"


def budget(budget_id: str) -> str:
    return f"{PREFIX}:budget:{budget_id}"


def day_counts(budget_key: str) -> str:
    """The hash of a budget's requests and tokens counted today, for per-day limits (rpd, tpd)."""
    return f"{budget_key}:day"


def held(budget_key: str) -> str:
    """The hash of reservations runners hold on a budget but have not sent yet."""
    return f"{budget_key}:held"


def fair_share(budget_key: str) -> tuple[str, str]:
    """A budget's fair-share hash and its queue of reservations not yet due (state/lua/_fairshare.lua).
    Not under the budget's own name: what scans ``batchrun:budget:*`` reads hashes only."""
    budget_id = budget_key[len(f"{PREFIX}:budget:"):]
    return f"{PREFIX}:fairshare:{budget_id}", f"{PREFIX}:fairqueue:{budget_id}"


RUNNERS = f"{PREFIX}:fair:runners"  # zset "batch_id|runner token" -> expiry ms: the shard runners alive
SERVED = f"{PREFIX}:fair:served"  # zset batch_id -> ms a worker last started one of its shards


class BudgetName(NamedTuple):
    endpoint: str  # endpoint_id of the base URL
    key_fingerprint: str
    model: str


def split_budget(budget_key: str) -> BudgetName:
    """The parts of a budget key (a model name may hold colons: it is the rest)."""
    _, _, endpoint, fingerprint, model = budget_key.split(":", 4)
    return BudgetName(endpoint, fingerprint, model)


CIRCUIT_PATTERN = f"{PREFIX}:circuit:*"
BUDGET_PATTERN = f"{PREFIX}:budget:*"


def parked_member(batch_id: str, shard: int) -> str:
    return f"{parked_prefix(batch_id)}{shard}"


def parked_prefix(batch_id: str) -> str:
    """What a shard number follows in the batch's members of PARKED (for scripts that find the shard)."""
    return f"{batch_id}:"


class ParkedShard(NamedTuple):
    batch_id: str
    shard: int


def split_parked_member(member: str) -> ParkedShard:
    batch_id, _, shard = member.rpartition(":")
    return ParkedShard(batch_id, int(shard))
