"""A batch's remote batches (OpenAI Batch API), as records in Redis.

Each part is one input file and one remote batch: its record says how far it got (planned,
uploaded, creating, running, held, done, cancelled) and holds the upstream ids, so a runner that
restarts picks up where the last one stopped instead of uploading or creating again. Records are
written only by the holder of the batch's remote lock (remote_save.lua), and the lock lapses by
itself when its runner dies (remote_lock.lua).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from batchrun.enums import StoredText
from batchrun.state import keys
from batchrun.state.scripts import source
from batchrun.text import decoded as _s

REMOTE_TOKEN = "remote"  # lease owner token of jobs in remote batches ("remote|SHARD")
# Jobs in a remote batch are leased to it for longer than the 24-hour window and the capped
# queue-full waits: only a runner that is gone for days gives them back to live sending.
REMOTE_LEASE_MS = 4 * 86_400_000


class PartState(StoredText):
    PLANNED = "planned"  # its jobs are taken from the shards; no file yet
    UPLOADED = "uploaded"  # its input file is upstream; no batch yet
    CREATING = "creating"  # a create was sent: on restart, look the batch up by metadata first
    RUNNING = "running"  # the remote batch exists; polled until it ends
    HELD = "held"  # the model's enqueued-token queue was full: created again at hold_until
    DONE = "done"  # every line recorded (or sent again)
    CANCELLED = "cancelled"  # the batch was cancelled: upstream cancelled, what ran recorded

    @property
    def ended(self) -> bool:
        return self in (PartState.DONE, PartState.CANCELLED)


@dataclass
class Part:
    no: int
    url: str
    model: str
    size: int  # jobs
    state: PartState = PartState.PLANNED
    file_id: str = ""
    remote_id: str = ""
    remote_status: str = ""  # the upstream status last seen
    counts: dict = field(default_factory=dict)  # its request_counts last seen
    hold_until_ms: int = 0
    holds: int = 0  # times the queue was full
    held_since_ms: int = 0
    note: str = ""  # the last thing worth telling the user (a failed create, a hold)
    resend: bool = False  # a part of lines sent again (they cost an attempt already)
    late: bool = False  # --via auto: cancelled for the deadline; its unfinished lines go live
    down_since_ms: int = 0  # its calls have failed (5xx, 429, unreachable) since then; 0: the last one worked
    reserved: bool = False  # --max-cost: its jobs' worst case is set aside (reserve_part.lua); it may go on at the cap
    endpoint: str = ""  # the [[endpoints]] name it goes to ('': the worker's OPENAI_BASE_URL)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "state": str(self.state)})

    @classmethod
    def from_json(cls, text: str) -> "Part":
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        part = cls(**known)
        part.state = PartState(part.state)
        return part


class RemoteParts:
    """The remote-batch records of batches, over one Redis client."""

    def __init__(self, redis):
        self.redis = redis
        self._lock = redis.register_script(source("remote_lock"))
        self._save = redis.register_script(source("remote_save"))
        self._reserve = redis.register_script(source("reserve_part"))

    def lock(self, batch_id: str, token: str, ms: int) -> bool:
        """Take or keep the batch's remote lock for ``ms``; False if another runner holds it."""
        return bool(self._lock(keys=[keys.sub(batch_id, "rlock")], args=[token, int(ms)]))

    def unlock(self, batch_id: str, token: str) -> None:
        self._lock(keys=[keys.sub(batch_id, "rlock")], args=[token, "0"])

    def locked(self, batch_id: str) -> bool:
        return bool(self.redis.exists(keys.sub(batch_id, "rlock")))

    def save(self, batch_id: str, token: str, parts: list[Part], ids: dict[int, list[str]] | None = None) -> bool:
        """Write these records (and, for new parts, their custom_ids); False if ``token`` lost the lock."""
        args: list = [token]
        for part in parts:
            args += (part.no, part.to_json(), "\n".join((ids or {}).get(part.no, ())))
        return bool(self._save(keys=[keys.sub(batch_id, "rlock"), keys.sub(batch_id, "rparts"),
                                     keys.sub(batch_id, "rids")], args=args))

    def reserve(self, batch_id: str, token: str, part: Part, label: str,
                costs: list[tuple[str, float]]) -> tuple[int, str]:
        """Set aside ``costs`` (custom_id, worst-case USD) for ``part`` under the batch's --max-cost,
        all or none, and record the part as reserved. Returns (1 reserved, 0 not: the reason if the
        cap refused it, -1 ``token`` lost the lock; the reason or '')."""
        record = Part.from_json(part.to_json())
        record.reserved = True
        args: list = [batch_id, token, part.no, record.to_json(), label]
        for cid, worst in costs:
            args += (cid, repr(float(worst)))
        out = self._reserve(keys=[keys.batch(batch_id), keys.sub(batch_id, "owner"), keys.sub(batch_id, "costres"),
                                  keys.sub(batch_id, "rlock"), keys.sub(batch_id, "rparts")], args=args)
        return int(out[0]), _s(out[1])

    def parts(self, batch_id: str) -> list[Part]:
        raw = self.redis.hgetall(keys.sub(batch_id, "rparts"))
        return sorted((Part.from_json(_s(v)) for v in raw.values()), key=lambda p: p.no)

    def ids(self, batch_id: str, no: int) -> list[str]:
        raw = self.redis.hget(keys.sub(batch_id, "rids"), str(no))
        return _s(raw).split("\n") if raw else []
