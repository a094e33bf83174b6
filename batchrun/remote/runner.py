"""run_remote: the RQ job that drives a batch's remote batches (--via batch-api).

One runner per batch at a time (its remote lock). Each pass it takes new jobs out of the shards
into parts (policy/remote_split.py), then moves every part one step on (remote/steps.py), polling
with a backoff that starts short and is capped. It yields its RQ worker after MAX_RUN_SECONDS
and queues its successor; if it dies, its lock lapses and fleet maintenance queues a new one,
which reattaches to the remote batches recorded in Redis (nothing is uploaded or created twice).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from batchrun.endpoints import CONFIG_ENV, Endpoint, configured_endpoints, remote_endpoint
from batchrun.policy.remote_split import MAX_BYTES, MAX_REQUESTS, JobSize, split_parts
from batchrun.remote.auto import split_once
from batchrun.remote.client import RemoteClient, Unavailable
from batchrun.remote.collect import Recorder, input_line
from batchrun.remote.start import enqueue_remote, goes_on_at_the_cap, remote_models_of
from batchrun.remote.steps import PartSteps
from batchrun.run_scope import current_scope
from batchrun.state import keys
from batchrun.state.remote_parts import REMOTE_LEASE_MS, REMOTE_TOKEN, Part, PartState, RemoteParts
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore
from batchrun.text import decoded as _s

log = logging.getLogger("batchrun.remote")

# The runner renews its lock every pass (at least every third of it); a dead runner's lapses after it.
LOCK_MS = int(float(os.environ.get("BATCHRUN_REMOTE_LOCK_SECONDS") or 60) * 1000)
LEASE_CHUNK = 2000  # jobs per lease call (lease.lua unpacks twice as many arguments: Lua caps that near 8,000)
MAX_RUN_SECONDS = float(os.environ.get("BATCHRUN_REMOTE_RUN_SECONDS") or 600)
POLL_FIRST = 0.2  # seconds between passes after a change...
POLL_CAP = float(os.environ.get("BATCHRUN_REMOTE_POLL_CAP") or 30)  # ... growing to this while nothing changes


def run_remote(batch_id: str, generation: int) -> dict:
    """RQ entry point (JSON arguments and result). ``generation`` is unused (the worker's job
    check wants two arguments: a batch id and a number)."""
    from rq import get_current_job

    settings = current_scope().settings  # a run's own key and base URL in-process; else the worker's
    client = RemoteClient(settings.base_url, settings.api_key)
    return RemoteRunner(BatchStore(get_current_job().connection), batch_id, client).run()


class RemoteRunner:
    def __init__(self, store: BatchStore, batch_id: str, client: RemoteClient, *,
                 max_seconds: float = MAX_RUN_SECONDS, poll_cap: float = POLL_CAP,
                 max_requests: int = MAX_REQUESTS, max_bytes: int = MAX_BYTES,
                 endpoints: tuple[Endpoint, ...] | None = None):
        self.store, self.batch_id, self.client = store, batch_id, client
        self.endpoints = configured_endpoints() if endpoints is None else endpoints  # the worker's [[endpoints]]
        self._clients: dict[str, RemoteClient] = {}
        self.parts = RemoteParts(store.redis)
        self.token = f"remote-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.max_seconds = max_seconds
        self.poll_cap = min(poll_cap, LOCK_MS / 3000)  # a pass renews the lock: never sleep past a third of it
        self.max_requests, self.max_bytes = max_requests, max_bytes

    def run(self) -> dict:
        if not self.parts.lock(self.batch_id, self.token, LOCK_MS):
            return {"batch": self.batch_id, "left": "another runner drives its remote batches"}
        again = False
        stop = threading.Event()
        beat = threading.Thread(target=self._keep_lock, args=(stop,), name="remote-lock", daemon=True)
        beat.start()
        try:
            again = self._loop()
        except LostLock as exc:
            log.warning("%s; this runner stops", exc)
        finally:
            stop.set()
            beat.join()
            self.parts.unlock(self.batch_id, self.token)
        if again:
            enqueue_remote(self.store, self.batch_id)  # after the unlock: the successor takes the lock
        return {"batch": self.batch_id, "again": again}

    def _keep_lock(self, stop: threading.Event) -> None:
        """Renew the lock every third of its length while this runner lives, also while a call
        runs (an upload or a create may take up to the client's timeout, longer than the lock):
        a second runner must never take over a create still in flight. A dead runner renews nothing."""
        while not stop.wait(LOCK_MS / 3000):
            try:
                if not self.parts.lock(self.batch_id, self.token, LOCK_MS):
                    return  # taken over (this runner stalled past it): its next save says so
            except Exception as exc:  # noqa: BLE001 - Redis away for a moment: the next beat tries again
                log.warning("batch %s: renewing the remote lock failed: %s", self.batch_id, exc)

    def _loop(self) -> bool:
        """Passes until nothing is left to drive; True if time ran out with work left."""
        ends = time.monotonic() + self.max_seconds
        delay = POLL_FIRST
        recorder = Recorder(self.store, self.batch_id)
        steps = PartSteps(self.store, self.batch_id, self.client, recorder, self._save, self._reserve,
                          self._client_for)
        while True:
            meta = self.store.meta(self.batch_id)
            if not meta or not self.parts.lock(self.batch_id, self.token, LOCK_MS):
                return False  # purged, or another runner took over
            state = meta.get("state")
            if state == BatchState.RUNNING:
                self.plan(meta)
            parts = self.parts.parts(self.batch_id)
            changed = steps.cancel_all(parts) if state == BatchState.CANCELLED else steps.advance(parts)
            planning = state == BatchState.RUNNING and self._unplanned_left(self.store.meta(self.batch_id))
            now = self.parts.parts(self.batch_id)
            if all(p.state.ended for p in now) and not planning:
                return False  # (a batch that is not running plans nothing: its unplanned jobs wait for a resume)
            meta = self.store.meta(self.batch_id)
            if meta.get("state") == BatchState.PAUSED and \
                    not any(p.state is PartState.RUNNING or goes_on_at_the_cap(p, meta) for p in now):
                return False  # paused with nothing upstream (or paid for) to drive: a resume brings a runner back
            if time.monotonic() >= ends:
                return True
            time.sleep(delay)
            delay = POLL_FIRST if changed else min(delay * 1.5, self.poll_cap)

    def _save(self, parts: list[Part], ids: dict[int, list[str]] | None = None) -> None:
        if not self.parts.save(self.batch_id, self.token, parts, ids):
            raise LostLock(f"batch {self.batch_id}: another runner took its remote batches over")

    def _client_for(self, part: Part) -> RemoteClient:
        """The client of the endpoint a part goes to (the worker's own key for it, from its environment)."""
        client = self._clients.get(part.endpoint)
        if client is None:
            ep = next((e for e in self.endpoints if e.name == part.endpoint), None)
            if ep is None:
                path = os.environ.get(CONFIG_ENV) or "no config file"
                raise Unavailable(f"remote batch #{part.no} goes to endpoint {part.endpoint!r}, which this "
                                  f"worker's [[endpoints]] ({path}) do not have; start the workers with that config")
            client = self._clients[part.endpoint] = RemoteClient(ep.base_url, ep.api_key(), ep.api_key_env or "API key")
        return client

    def _reserve(self, part: Part, label: str, costs: list[tuple[str, float]]) -> tuple[int, str]:
        done, reason = self.parts.reserve(self.batch_id, self.token, part, label, costs)
        if done < 0:
            raise LostLock(f"batch {self.batch_id}: another runner took its remote batches over")
        return done, reason

    def _unplanned_left(self, meta: dict[str, str]) -> bool:
        return int(meta.get("remote_gen") or 0) > int(meta.get("remote_planned") or 0)

    # -- taking jobs into parts ----------------------------------------------

    def plan(self, meta: dict[str, str]) -> int:
        """Take the shards' new jobs into parts; returns how many parts were made. Also picks up jobs
        a runner leased before it died without recording their part."""
        gen = int(meta.get("remote_gen") or 0)
        only = remote_models_of(meta) if meta.get("via") == "live" else None  # per-endpoint via
        if gen <= int(meta.get("remote_planned") or 0) and (only is not None or self.parts.parts(self.batch_id)):
            return 0  # (per-endpoint via: live runners hold the other jobs; no pass takes them)
        if meta.get("via") == "auto":
            if not split_once(self.store, self.batch_id, meta):  # once: later jobs of the batch go live
                self.store.wake_all_shards(self.batch_id)
                self.store.promote_parked(limit=1000)
        else:
            resend_live = self.store.options(self.batch_id).resend_via == "live"
            for shard in range(int(meta.get("shards") or 0)):
                self._lease_shard(shard, resend_live, only)
            if only is not None:
                self.store.wake_all_shards(self.batch_id)  # the other models' jobs: live runners take them
                self.store.promote_parked(limit=1000)
        made = self._make_parts(only)
        self.store.redis.hset(keys.batch(self.batch_id), "remote_planned", gen)
        return made

    def _lease_shard(self, shard: int, resend_live: bool, only: set[str] | None = None) -> None:
        """Take the shard's jobs for remote batches; those that stay live go back to it: a job sent
        again live (it failed in a remote batch), and under per-endpoint via (``only``: the models
        whose endpoints are all via = "batch-api") the other models' jobs."""
        live: list[str] = []
        while True:  # (what stays live goes back once the shard is empty: leased again, it would loop)
            lease = self.store.lease(self.batch_id, shard, LEASE_CHUNK, REMOTE_LEASE_MS, REMOTE_TOKEN)
            if not lease.jobs:
                break
            live += [j.custom_id for j in lease.jobs if (j.attempts > 0 and resend_live) or
                     (only is not None and str((j.request.get("body") or {}).get("model", "")) not in only)]
        if live:
            Recorder(self.store, self.batch_id).resend_live([(c, "", "") for c in live], counts=False)

    def _make_parts(self, only: set[str] | None = None) -> int:
        """Parts for every job leased to the remote token that no part holds yet (under per-endpoint
        via, of the models in ``only``: others a runner killed while leasing held go back live)."""
        planned, went_live = self._planned_ids()
        mine = [_s(cid) for cid, owner in self.store.redis.hscan_iter(keys.sub(self.batch_id, "owner"), count=5000)
                if _s(owner).startswith(REMOTE_TOKEN + "|") and _s(cid) not in planned]
        if not mine:
            return 0
        sizes, live = [], []
        for i in range(0, len(mine), LEASE_CHUNK):
            chunk = mine[i:i + LEASE_CHUNK]
            for cid, raw in zip(chunk, self.store.redis.hmget(keys.sub(self.batch_id, "req"), chunk)):
                if raw and cid in went_live:  # an ended part sent it live; a later plan leased it again
                    live.append((cid, "", ""))
                elif raw:
                    req = json.loads(raw)
                    model = str((req.get("body") or {}).get("model", ""))
                    if only is not None and model not in only:
                        live.append((cid, "", ""))
                        continue
                    sizes.append(JobSize(cid, req.get("url", ""), model, len(input_line(cid, raw))))
        if live:
            Recorder(self.store, self.batch_id).resend_live(live, counts=False)
        if not sizes:
            return 0
        first = max((p.no for p in self.parts.parts(self.batch_id)), default=-1) + 1
        plans = split_parts(sizes, self.max_requests, self.max_bytes)
        new = [Part(first + i, plan.url, plan.model, len(plan.custom_ids), endpoint=self._endpoint_of(plan.model))
               for i, plan in enumerate(plans)]
        self._save(new, {part.no: plan.custom_ids for part, plan in zip(new, plans)})
        log.info("batch %s: %d job(s) in %d new remote batch(es)", self.batch_id, len(sizes), len(new))
        return len(new)


    def _planned_ids(self) -> tuple[set[str], set[str]]:
        """(the jobs of parts still open, those only ended parts name). A job leased to the remote
        token that only an ended part names was sent live by it (the remote batch failed, waited a
        day on a full queue, was late) and leased again by a later plan (jobs added to the batch)."""
        open_ids: set[str] = set()
        ended: set[str] = set()
        for part in self.parts.parts(self.batch_id):
            (ended if part.state.ended else open_ids).update(self.parts.ids(self.batch_id, part.no))
        return open_ids, ended - open_ids

    def _endpoint_of(self, model: str) -> str:
        """The [[endpoints]] name a model's remote batches go to ('': the worker's OPENAI_BASE_URL)."""
        ep = remote_endpoint(self.endpoints, model) if self.endpoints else None
        return ep.name if ep is not None else ""


class LostLock(Exception):
    """Another runner holds the batch's remote lock now: this one stops writing."""
