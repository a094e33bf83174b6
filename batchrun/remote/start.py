"""Getting a batch's remote batches driven: the RQ job that does it, queued on submit, by fleet
maintenance when its runner died, and by cancel (which then cancels upstream)."""

from __future__ import annotations

import json

from rq import Queue

from batchrun.policy.decision import PauseKind
from batchrun.settings import BatchOptions
from batchrun.state import keys
from batchrun.state.remote_parts import Part, PartState, RemoteParts
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore

RUN_REMOTE = "batchrun.remote.runner.run_remote"
JOB_TIMEOUT = 3600  # seconds; a runner yields its RQ worker long before (runner.MAX_RUN_SECONDS)
WAKE_MS = 30_000  # a revived batch is not queued again for this long (its runner takes the lock first)


def uses_batch_api(options: BatchOptions) -> bool:
    """Does the batch send through the Batch API (all of it, or the share --via auto gives it)?"""
    return options.via in ("batch-api", "auto")


def remote_models_of(meta: dict[str, str]) -> set[str]:
    """Under the batch's --via live: the models its [[endpoints]] send through the Batch API only
    (every endpoint serving them is via = "batch-api"), as submit recorded them."""
    raw = meta.get("remote_models")
    return set(json.loads(raw)) if raw else set()


def sends_remote(meta: dict[str, str]) -> bool:
    """Does the batch (its meta hash) have jobs for the Batch API: by its --via, or its endpoints'?"""
    return meta.get("via") in ("batch-api", "auto") or bool(remote_models_of(meta))


def goes_on_at_the_cap(part: Part, meta: dict[str, str]) -> bool:
    """A part whose cost was set aside is paid for in advance, as a live request in flight is:
    a batch paused at its --max-cost still uploads, creates and collects it."""
    return part.reserved and not part.state.ended and meta.get("pause_kind") == PauseKind.COST_CAP


def enqueue_remote(store: BatchStore, batch_id: str) -> None:
    """Queue the RQ job that drives the batch's remote batches (harmless if one runs: it takes
    the batch's lock first, and a second one leaves at once)."""
    data = Queue.prepare_data(RUN_REMOTE, args=(batch_id, 0), timeout=JOB_TIMEOUT, result_ttl=0,
                              failure_ttl=86400, description=f"batchrun remote batches {batch_id}")
    store.queue.enqueue_many([data])


def request_plan(store: BatchStore, batch_id: str) -> None:
    """New jobs for the Batch API: the runner takes them into remote batches at its next pass."""
    store.redis.hincrby(keys.batch(batch_id), "remote_gen", 1)
    enqueue_remote(store, batch_id)


def revive(store: BatchStore) -> int:
    """Queue a runner for each batch with remote work whose runner is gone (its lock lapsed):
    the new one reattaches to the remote batches recorded in Redis. Returns how many were queued."""
    parts = RemoteParts(store.redis)
    queued = 0
    for batch_id in store.active_batches():
        meta = store.meta(batch_id)
        if not sends_remote(meta) or meta.get("state") not in (BatchState.RUNNING, BatchState.PAUSED):
            continue
        if parts.locked(batch_id) or not needs_runner(store, parts, batch_id, meta):
            continue
        if store.redis.set(keys.sub(batch_id, "rwake"), "1", nx=True, px=WAKE_MS):
            enqueue_remote(store, batch_id)
            queued += 1
    return queued


def needs_runner(store: BatchStore, parts: RemoteParts, batch_id: str, meta: dict[str, str]) -> bool:
    if meta.get("state") == BatchState.PAUSED:  # nothing new goes upstream; what is there (or paid for) goes on
        return any(p.state is PartState.RUNNING or goes_on_at_the_cap(p, meta) for p in parts.parts(batch_id))
    if int(meta.get("remote_gen") or 0) > int(meta.get("remote_planned") or 0):
        return True
    return any(not p.state.ended for p in parts.parts(batch_id))


def remote_paid_for_open(store: BatchStore, batch_id: str) -> bool:
    """Paused at its --max-cost with remote batches whose cost was set aside still to collect?"""
    meta = store.meta(batch_id)
    return sends_remote(meta) and \
        any(goes_on_at_the_cap(p, meta) or (p.reserved and p.state is PartState.RUNNING)
            for p in RemoteParts(store.redis).parts(batch_id))


def cancel_upstream(store: BatchStore, batch_id: str) -> int:
    """After a cancel: queue the runner that cancels the batch's remote batches and records what
    they had finished. Returns how many remote batches are still to be cancelled."""
    open_parts = [p for p in RemoteParts(store.redis).parts(batch_id) if not p.state.ended]
    if open_parts:
        enqueue_remote(store, batch_id)
    return len(open_parts)


def remote_summary(store: BatchStore, batch_id: str) -> list[dict]:
    """Each remote batch's record, for `status`."""
    out = []
    for p in RemoteParts(store.redis).parts(batch_id):
        out.append({"part": p.no, "model": p.model, "jobs": p.size, "state": str(p.state),
                    "remote_id": p.remote_id, "remote_status": p.remote_status,
                    "completed": int((p.counts or {}).get("completed") or 0),
                    "failed": int((p.counts or {}).get("failed") or 0), "note": p.note})
    return out


def describe_remote(parts: list[dict]) -> list[str]:
    """`status` lines for the remote batches (none for a live batch)."""
    if not parts:
        return []
    lines = [f"  remote batches (Batch API): {len(parts)}"]
    for p in parts:
        upstream = f" {p['remote_id']} {p['remote_status']}" if p["remote_id"] else ""
        lines.append(f"    #{p['part']} {p['model']}: {p['jobs']:,} jobs, {p['state']}{upstream}, "
                     f"{p['completed']:,} completed, {p['failed']:,} failed" + (f" — {p['note']}" if p["note"] else ""))
    return lines
