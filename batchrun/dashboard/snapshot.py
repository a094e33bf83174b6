"""What the dashboard shows, read from Redis only (through the state/ layer and ops/status.py):
the fleet's overview (batches, budgets, workers, errors) and one batch's page.

A ``Dashboard`` keeps what never changes once read (closed metric buckets, outcomes already
tallied) between refreshes; everything else is read again each time. Its methods are
synchronous (redis-py): the web app calls them from a thread, at most once a refresh interval
however many pages are open.
"""

from __future__ import annotations

import time

from batchrun.dashboard.errors import ErrorTally
from batchrun.dashboard.history import BucketHistory, minute_series
from batchrun.ops.status import _cost, _eta, batch_status
from batchrun.settings import BatchOptions
from batchrun.state import keys
from batchrun.state.budgets import describe_budgets
from batchrun.state.jobcounts import jobs_ended, jobs_left
from batchrun.state.meta import BatchMeta
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore
from batchrun.state.workers import list_workers
from batchrun.text import decoded as _s
from batchrun.urls import mask_url

RECENT_BATCHES = 30  # the overview's batches: the newest this many, and the newest MAX_ACTIVE_ROWS active ones
MAX_ACTIVE_ROWS = 100  # active batches beyond the newest: a Redis may hold thousands waiting for workers
HISTORY_BATCHES = 50  # at most this many batches' buckets make the budgets' history
RATE_WINDOW = 60  # seconds of recent counts behind a batch's pace (as `status`)
TOP_RETRIED = 10
RETRY_SCAN = 5000  # attempt counts looked at for the most-retried jobs


def _options(meta: BatchMeta) -> BatchOptions:
    try:
        return BatchOptions.from_fields(meta.fields)
    except (ValueError, TypeError, OverflowError, AttributeError):  # its runner pauses it, saying why
        return BatchOptions()


class Dashboard:
    def __init__(self, store: BatchStore, *, allow_actions: bool = False):
        self.store = store
        self.allow_actions = allow_actions
        self.history = BucketHistory()
        self.errors = ErrorTally()

    # -- the overview ---------------------------------------------------------------

    def overview(self) -> dict:
        now_ms = self.store.server_time_ms()
        ids, not_shown = self._batch_ids()
        batches = [b for b in (self.batch_row(bid, now_ms) for bid in ids) if b is not None]
        recent = [b["batch_id"] for b in batches if _in_last_hour(b, now_ms / 1000)][:HISTORY_BATCHES]
        by_budget, by_batch = minute_series(self.history.buckets(self.store, recent, now_ms))
        for b in batches:
            series = by_batch.get(b["batch_id"])
            b["history"] = series.to_dict() if series else None
        self.errors.refresh(self.store, [b["batch_id"] for b in batches])
        self.errors.drop(self._gone(self.errors.known()))  # purged or expired: their errors go with them
        active = self.store.active_batches()
        return {
            "now": now_ms / 1000,
            "batches": batches,
            "batches_not_shown": not_shown,
            "budgets": self.budgets(by_budget, now_ms),
            "workers": [w.to_dict() for w in list_workers(self.store.redis, time.time(), active)],
            "errors": self.errors.groups(),
            # outcomes from before the dashboard first saw a batch: not in the error counts
            "errors_not_read": {b["batch_id"]: n for b in batches if (n := self.errors.skipped.get(b["batch_id"]))},
            "actions": self.allow_actions,
        }

    def _batch_ids(self) -> tuple[list[str], int]:
        """The batches the overview shows, and how many active ones it leaves out."""
        recent = self.store.recent_batches(RECENT_BATCHES)
        active = newest_first(self.store, [bid for bid in self.store.active_batches() if bid not in recent])
        return recent + active[:MAX_ACTIVE_ROWS], max(0, len(active) - MAX_ACTIVE_ROWS)

    def _gone(self, batch_ids: list[str]) -> list[str]:
        """Those of ``batch_ids`` this Redis no longer holds, in one round trip."""
        pipe = self.store.redis.pipeline(transaction=False)
        for batch_id in batch_ids:
            pipe.exists(keys.batch(batch_id))
        return [bid for bid, there in zip(batch_ids, pipe.execute() if batch_ids else []) if not there]

    def batch_row(self, batch_id: str, now_ms: int) -> dict | None:
        """One line of the batches table: state, progress, ETA and cost (what `status` says, without
        the fleet-wide conditions it scans for, which the budgets table shows once)."""
        meta = self.store.batch_meta(batch_id)
        if meta is None:
            return None
        jobs = self.store.counts(batch_id)
        recent, span = self.store.recent_metrics(batch_id, RATE_WINDOW)
        if meta.created:
            span = min(span, now_ms / 1000 - meta.created)
        rate = recent.get("ended", 0) / max(1.0, span)
        eta = _eta(meta.state, jobs_left(jobs), rate)
        return {
            "batch_id": batch_id,
            "state": meta.state or meta.state_text,
            "reason": meta.reason or None,
            "pause_kind": meta.pause_kind,
            "created_at": meta.created or None,
            "finished_at": meta.finished_at or None,
            "jobs": jobs,
            "ended": jobs_ended(jobs),
            "progress": round(jobs_ended(jobs) / jobs["total"], 4) if jobs["total"] else 0.0,
            "jobs_per_second": round(rate, 2),
            "eta_seconds": None if eta is None else round(eta, 1),
            "cost": _cost(meta, jobs, _options(meta)),
        }

    # -- budgets ------------------------------------------------------------------

    def budgets(self, by_budget: dict, now_ms: int) -> list[dict]:
        out = []
        circuits: dict[str, dict] = {}
        for b in describe_budgets(self.store):
            key = keys.budget(f"{b['endpoint']}:{b['key_fingerprint']}:{b['model']}")
            if b["endpoint"] not in circuits:
                circuits[b["endpoint"]] = self._circuit(b["endpoint"], now_ms)
            series = by_budget.get(key)
            out.append({**b, "budget": key, "rpm_limit": b["configured_rpm"] or b["learnt_rpm"] or None,
                        "tpm_limit": b["configured_tpm"] or b["learnt_tpm"] or None,
                        "circuit": circuits[b["endpoint"]], "history": series.to_dict() if series else None})
        return out

    def _circuit(self, endpoint: str, now_ms: int) -> dict:
        c = {_s(k): _s(v) for k, v in self.store.redis.hgetall(keys.circuit(endpoint)).items()}
        open_until = float(c.get("open_until") or 0)
        is_open = c.get("state") == "open" and open_until > now_ms
        return {"state": "open" if is_open else "closed", "url": mask_url(c["url"]) if c.get("url") else None,
                "seconds_left": round((open_until - now_ms) / 1000, 1) if is_open else 0.0}

    # -- one batch ----------------------------------------------------------------

    def batch_page(self, batch_id: str) -> dict:
        """The batch's `status --json`, its history, errors, most-retried jobs and workers.
        Raises LookupError for a batch this Redis does not hold."""
        status = batch_status(self.store, batch_id)
        now_ms = self.store.server_time_ms()
        _, by_batch = minute_series(self.history.buckets(self.store, [batch_id], now_ms))
        self.errors.refresh(self.store, [batch_id])
        series = by_batch.get(batch_id)
        workers = [w.to_dict() for w in list_workers(self.store.redis, time.time(), [batch_id])
                   if w.batch_id == batch_id]
        row = self.batch_row(batch_id, now_ms) or {}
        return {"now": now_ms / 1000, "status": status, "progress": row.get("progress", 0.0),
                "history": series.to_dict() if series else None, "errors": self.errors.groups(batch_id),
                "errors_not_read": self.errors.skipped.get(batch_id, 0),
                "most_retried": self.most_retried(batch_id), "workers": workers, "actions": self.allow_actions}

    def most_retried(self, batch_id: str) -> list[dict]:
        """The jobs with the most failed attempts (of the first RETRY_SCAN with any), with the last one's
        error and when the first failed (a job still not ended long after is the batch's slowest)."""
        counts: list[tuple[int, str]] = []
        for cid, n in self.store.redis.hscan_iter(keys.sub(batch_id, "attempts"), count=1000):
            counts.append((int(n), _s(cid)))
            if len(counts) >= RETRY_SCAN:
                break
        top = sorted(counts, key=lambda t: (-t[0], t[1]))[:TOP_RETRIED]
        out = []
        for n, cid in top:
            history = self.store.history(batch_id, cid)
            last = history[-1] if history else {}
            out.append({"custom_id": cid, "failed_attempts": n, "last_error": last.get("error"),
                        "first_failed_at": history[0].get("at") if history else None,
                        "last_status": last.get("status"), "last_message": (last.get("message") or "")[:200],
                        "ended": self.store.redis.hget(keys.sub(batch_id, "status"), cid) is not None})
        return out


def newest_first(store: BatchStore, batch_ids: list[str]) -> list[str]:
    """``batch_ids`` the newest first (by when they were created), in one round trip."""
    pipe = store.redis.pipeline(transaction=False)
    for batch_id in batch_ids:
        pipe.zscore(keys.BATCHES, batch_id)
    created = pipe.execute() if batch_ids else []
    return [bid for _, bid in sorted(zip(created, batch_ids), key=lambda t: (-(t[0] or 0), t[1]))]


def _in_last_hour(row: dict, now: float) -> bool:
    if row["state"] in (BatchState.RUNNING, BatchState.PAUSED):
        return True
    return max(row["finished_at"] or 0, row["created_at"] or 0) >= now - 3600
