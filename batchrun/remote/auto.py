"""--via auto --deadline: the split between live sending and the Batch API, made once per batch
by its remote runner before any live shard runs (policy/via_split.py says how many go live).

The live share is the batch's first jobs; the rest are taken from the last shards backwards
into remote batches, and then the shards are woken for live runners. A remote batch still
running when the deadline is near (LATE_SHARE of the deadline before it) is cancelled upstream,
and its unfinished lines move to live sending (steps.py), which the budget paces as always.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

from batchrun.policy.via_split import live_share, request_tokens
from batchrun.state import keys
from batchrun.state.jobcounts import jobs_left
from batchrun.state.remote_parts import REMOTE_LEASE_MS, REMOTE_TOKEN
from batchrun.state.store import BatchStore

log = logging.getLogger("batchrun.remote")
SAMPLE = 1000  # requests read to learn the average charge and the main model
LATE_SHARE = 0.1  # a remote batch not done this share of the deadline before it is late
LEASE_CHUNK = 2000


def deadline_s(meta: dict[str, str]) -> float:
    """Unix seconds the batch should end by (0: no deadline)."""
    seconds = float(meta.get("deadline_seconds") or 0)
    return float(meta.get("created") or 0) + seconds if seconds else 0.0


def is_late(meta: dict[str, str], now: float | None = None) -> bool:
    """--via auto: is it past the point where a remote batch must have ended?"""
    end = deadline_s(meta)
    if not end or meta.get("via") != "auto":
        return False
    return (now or time.time()) >= end - LATE_SHARE * float(meta.get("deadline_seconds") or 0)


def split_once(store: BatchStore, batch_id: str, meta: dict[str, str]) -> bool:
    """Make the batch's live/remote split if it has none yet; True if it made it now."""
    if meta.get("auto_live") is not None:
        return False
    # The jobs still to send, not the batch's total: a rerun's cache hits (ended at submit) and
    # jobs ended before are in the total, and would push sendable jobs to the Batch API.
    total = jobs_left(meta)
    avg, model = _sample(store, batch_id)
    rpm, tpm = store.options(batch_id).limits.for_model(model)
    left = deadline_s(meta) - store.server_time_ms() / 1000
    live = live_share(total, avg, rpm, tpm, left)
    store.redis.hset(keys.batch(batch_id), mapping={"auto_live": live, "auto_remote": total - live})
    _take_from_the_end(store, batch_id, total - live, int(meta.get("shards") or 0))
    log.info("batch %s: %d job(s) live by the deadline (%s: %s RPM, %s TPM, ~%.0f tokens a job), %d through the "
             "Batch API", batch_id, live, model, rpm or "no", tpm or "no", avg, total - live)
    return True


def _sample(store: BatchStore, batch_id: str) -> tuple[float, str]:
    charges, models = [], Counter()
    for _, raw in store.redis.hscan_iter(keys.sub(batch_id, "req"), count=SAMPLE):
        req = json.loads(raw)
        body = req.get("body") or {}
        out = body.get("max_completion_tokens") or body.get("max_tokens") or 0
        charges.append(request_tokens(len(raw), int(out) if isinstance(out, int) else 0))
        models[str(body.get("model", ""))] += 1
        if len(charges) >= SAMPLE:
            break
    avg = sum(charges) / len(charges) if charges else 1.0
    return avg, models.most_common(1)[0][0] if models else ""


def _take_from_the_end(store: BatchStore, batch_id: str, n: int, shards: int) -> None:
    """Lease ``n`` jobs to the remote token, from the last shard backwards (the live share is the
    batch's first jobs)."""
    for shard in range(shards - 1, -1, -1):
        while n > 0:
            lease = store.lease(batch_id, shard, min(n, LEASE_CHUNK), REMOTE_LEASE_MS, REMOTE_TOKEN)
            if not lease.jobs:
                break
            n -= len(lease.jobs)
        if n <= 0:
            break
    store.wake_all_shards(batch_id)  # the live share: its shards get runners now
    store.promote_parked(limit=1000)


__all__ = ["deadline_s", "is_late", "split_once"]
