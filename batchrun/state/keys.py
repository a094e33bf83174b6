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
``…:m:BUCKET``      hash    counts in one 5-second bucket (expires by itself)
==================  ======  ==================================================
"""

from __future__ import annotations

import re

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
SUBKEYS = ("req", "leases", "owner", "attempts", "history", "status", "results", "costres", "lapsed")


def todo(batch_id: str, shard: int) -> str:
    return f"{batch(batch_id)}:todo:{shard}"


def circuit(endpoint_id: str) -> str:
    return f"{PREFIX}:circuit:{endpoint_id}"


def budget(budget_id: str) -> str:
    return f"{PREFIX}:budget:{budget_id}"


def parked_member(batch_id: str, shard: int) -> str:
    return f"{batch_id}:{shard}"


def split_parked_member(member: str) -> tuple[str, int]:
    batch_id, _, shard = member.rpartition(":")
    return batch_id, int(shard)
