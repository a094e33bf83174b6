"""The workers a Redis knows (RQ's own registry), as the dashboard and /metrics show them:
alive or not, the shard each runs, its requests in flight and its last heartbeat.

Nothing here is written by batchrun for the dashboard: RQ keeps its workers' hashes (a heartbeat
at least every job-monitoring interval), and a shard's leases name their owner ("token|shard").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from datetime import timezone

from rq import Worker
from rq.serializers import JSONSerializer

from batchrun.state import keys
from batchrun.text import decoded as _s

STALE_SECONDS = 120  # no heartbeat for this long: shown as not alive (RQ's own worker TTL is 420 s)
SHARD_DESCRIPTION = "batchrun shard "  # what store.enqueue_shards writes before "BATCH:SHARD"


@dataclass(frozen=True, slots=True)
class WorkerView:
    name: str
    hostname: str
    pid: int | None
    state: str  # RQ's: idle, busy, suspended, ...
    alive: bool
    last_heartbeat: float | None  # unix seconds
    seconds_since_heartbeat: float | None
    batch_id: str | None  # the shard it runs now
    shard: int | None
    in_flight: int  # that shard's requests in flight
    jobs_run: int  # shard jobs it finished (RQ's count)

    def to_dict(self) -> dict:
        return asdict(self)


def _current_shard(worker: Worker) -> tuple[str | None, int | None]:
    try:
        job = worker.get_current_job()
    except Exception:  # noqa: BLE001 - its job expired or is not RQ's shape: shown idle
        return None, None
    description = (job.description or "") if job else ""
    if not description.startswith(SHARD_DESCRIPTION):
        return None, None
    batch_id, _, shard = description[len(SHARD_DESCRIPTION):].rpartition(":")
    return (batch_id, int(shard)) if batch_id and shard.isdigit() else (None, None)


def in_flight_by_shard(redis, batch_ids: list[str]) -> Counter:
    """(batch_id, shard) -> leases held now, from each batch's owner hash (its size is the
    batch's requests in flight, so this stays bounded by the fleet's concurrency)."""
    counts: Counter = Counter()
    pipe = redis.pipeline(transaction=False)
    for batch_id in batch_ids:
        pipe.hvals(keys.sub(batch_id, "owner"))
    for batch_id, owners in zip(batch_ids, pipe.execute() if batch_ids else []):
        for owner in owners:
            shard = keys.owner_shard(_s(owner))
            if shard is not None:
                counts[batch_id, shard] += 1
    return counts


def list_workers(redis, now: float, active_batches: list[str]) -> list[WorkerView]:
    """Every worker RQ has registered on this Redis, the busiest first."""
    in_flight = in_flight_by_shard(redis, active_batches)
    out = []
    for w in Worker.all(connection=redis, serializer=JSONSerializer):
        beat = w.last_heartbeat.replace(tzinfo=timezone.utc).timestamp() if w.last_heartbeat else None
        since = None if beat is None else max(0.0, now - beat)
        batch_id, shard = _current_shard(w)
        out.append(WorkerView(
            name=w.name, hostname=w.hostname or "", pid=w.pid, state=_s(w.get_state()),
            alive=since is not None and since < STALE_SECONDS, last_heartbeat=beat,
            seconds_since_heartbeat=None if since is None else round(since, 1), batch_id=batch_id, shard=shard,
            in_flight=in_flight.get((batch_id, shard), 0) if batch_id is not None else 0,
            jobs_run=w.successful_job_count + w.failed_job_count))
    return sorted(out, key=lambda v: (-v.in_flight, v.name))
