"""A finished remote batch's output and error files, recorded as its jobs' outcomes through the
same store as live results (complete.lua: the first outcome of a job wins, its cost counted once).

Lines the remote batch did not run (it expired, was cancelled, a 5xx) are sent again, each
costing one attempt: live (its shard's todo set, which live runners take) or in a new remote
batch, as the batch's --resend-via says; past --max-attempts they end as errors.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field

from batchrun.files.outputs import error_line
from batchrun.policy.pricing import PriceTable, answer_cost, batch_price, usage_is_readable
from batchrun.policy.remote_lines import LineFate, line_outcome
from batchrun.remote.cap import worst_tokens
from batchrun.state import keys
from batchrun.state.items import CompleteItem, OutcomeKind, RequeueItem
from batchrun.state.remote_parts import REMOTE_TOKEN
from batchrun.state.store import BatchStore
from batchrun.text import decoded as _s

log = logging.getLogger("batchrun.remote")
CHUNK = 2000  # outcomes per complete/requeue call


@dataclass
class Collected:
    results: int = 0
    errors: int = 0
    resend: list[tuple[str, str, str]] = field(default_factory=list)  # (custom_id, code, message)


def read_file_lines(data: bytes, ours: set[str], into: dict[str, dict]) -> None:
    """Parse an output/error file's lines into ``into`` (custom_id -> line), keeping only lines
    for this part's jobs, the first one of each (a server that repeats a line changes nothing)."""
    for raw in data.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        cid = line.get("custom_id") if isinstance(line, dict) else None
        if isinstance(cid, str) and cid in ours and cid not in into:
            into[cid] = line


class Recorder:
    """Records one batch's remote lines; knows its price table and options."""

    def __init__(self, store: BatchStore, batch_id: str):
        self.store, self.batch_id = store, batch_id
        self._prices: str | None = None
        self.refresh(store.meta(batch_id))
        self.options = store.options(batch_id)

    def refresh(self, meta: dict[str, str]) -> None:
        """Take the batch's price table again if it changed (`resume ID --prices FILE`): a runner
        that keeps going meanwhile (a remote batch still upstream) must not price by the old one."""
        stored = meta.get("prices") or ""
        if stored != self._prices:
            self.table = PriceTable.from_json(stored) if stored else PriceTable.load()
            self._prices = stored

    def owners(self, cids: list[str]) -> dict[str, str]:
        """custom_id -> lease owner ('remote|SHARD' while the job is in a remote batch; '' if not)."""
        raw = self.store.redis.hmget(keys.sub(self.batch_id, "owner"), cids) if cids else []
        return {cid: _s(o) if o else "" for cid, o in zip(cids, raw)}

    def record(self, model: str, ids: list[str], lines: dict[str, dict], url: str = "") -> Collected:
        """Outcomes for the lines that are final; the rest (and ids without a line) to resend."""
        out = Collected()
        price = self.table.price_for(model)
        by_owner: dict[str, list[CompleteItem]] = defaultdict(list)
        owners = self.owners(ids)
        for cid in ids:
            line = lines.get(cid)
            outcome = line_outcome(line, url) if line is not None else None
            if outcome is None:
                out.resend.append((cid, "remote_line_missing", "the remote batch returned no line for this request"))
                continue
            owner = owners.get(cid, "")
            owner = owner if owner.startswith(REMOTE_TOKEN + "|") else ""
            if outcome.fate is LineFate.RESULT:
                body = (line.get("response") or {}).get("body")
                body = body if isinstance(body, dict) else {}
                usage = body.get("usage")
                # Priced by the dearer of the model asked for and the one that answered, as a live
                # answer is; usage that cannot be read counts the job's worst case, as a live answer's does.
                answered = body.get("model")
                prices = [p for p in (price, self.table.price_for(answered) if isinstance(answered, str) and answered
                                      else None) if p is not None]
                worst = (0, 0) if not prices or usage_is_readable(usage) else \
                    worst_tokens(self.store.redis, self.batch_id, cid)
                cost = answer_cost([batch_price(p) for p in prices], usage, *worst)
                by_owner[owner].append(CompleteItem(OutcomeKind.RESULT, cid, json.dumps(line), cost))
                out.results += 1
            elif outcome.fate is LineFate.ERROR:
                err = error_line(cid, code=outcome.code, message=outcome.message, response=line.get("response"),
                                 line_id=line.get("id") if isinstance(line.get("id"), str) else None)
                by_owner[owner].append(CompleteItem(OutcomeKind.ERROR, cid, json.dumps(err)))
                out.errors += 1
            else:
                out.resend.append((cid, outcome.code, outcome.message))
        for owner, items in by_owner.items():
            for i in range(0, len(items), CHUNK):
                self.store.complete(self.batch_id, items[i:i + CHUNK], owner=owner)
        return out

    def fail(self, items: list[tuple[str, str, str]]) -> None:
        """End these jobs as errors (code, message each)."""
        by_owner: dict[str, list[CompleteItem]] = defaultdict(list)
        owners = self.owners([cid for cid, _, _ in items])
        for cid, code, message in items:
            owner = owners.get(cid, "")
            line = json.dumps(error_line(cid, code=code, message=message))
            by_owner[owner if owner.startswith(REMOTE_TOKEN + "|") else ""].append(
                CompleteItem(OutcomeKind.ERROR, cid, line))
        for owner, group in by_owner.items():
            for i in range(0, len(group), CHUNK):
                self.store.complete(self.batch_id, group[i:i + CHUNK], owner=owner)

    def attempts(self, cids: list[str]) -> dict[str, int]:
        raw = self.store.redis.hmget(keys.sub(self.batch_id, "attempts"), cids) if cids else []
        return {cid: int(a or 0) for cid, a in zip(cids, raw)}

    def over_limit(self, items: list[tuple[str, str, str]]) -> tuple[list, list]:
        """(those that may be sent again, those whose attempt was their last): a resend costs one
        attempt, and --max-attempts counts them as it counts live ones."""
        tries = self.attempts([cid for cid, _, _ in items])
        again, last = [], []
        for item in items:
            (again if tries[item[0]] + 1 < self.options.max_attempts else last).append(item)
        return again, last

    def resend_live(self, items: list[tuple[str, str, str]], *, counts: bool = True) -> int:
        """Give the jobs back to their shards' todo sets, due now; live runners send them."""
        owners = self.owners([cid for cid, _, _ in items])
        by_shard: dict[int, list[RequeueItem]] = defaultdict(list)
        for cid, code, message in items:
            owner = owners.get(cid, "")
            if not owner.startswith(REMOTE_TOKEN + "|"):
                continue  # ended meanwhile, or no longer ours
            history = json.dumps({"via": "batch-api", "code": code, "message": message}) if counts else ""
            by_shard[keys.owner_shard(owner)].append(RequeueItem(cid, 0, counts, history))
        n = 0
        for shard, group in by_shard.items():
            for i in range(0, len(group), CHUNK):
                n += self.store.requeue(self.batch_id, f"{REMOTE_TOKEN}|{shard}", shard, group[i:i + CHUNK]).requeued
        if n:
            self.store.wake_all_shards(self.batch_id)
            self.store.promote_parked(limit=1000)
        return n

    def count_attempt(self, items: list[tuple[str, str, str]]) -> None:
        """A resend through a new remote batch: the attempt counts now (the lease stays the runner's)."""
        pipe = self.store.redis.pipeline()
        for cid, code, message in items:
            pipe.hincrby(keys.sub(self.batch_id, "attempts"), cid, 1)
        pipe.hincrby(keys.batch(self.batch_id), "retries", len(items))
        pipe.execute()


def input_line(custom_id: str, raw_request: bytes | str) -> bytes:
    """The Batch API input line of a stored request ({"method", "url", "body"} JSON)."""
    raw = raw_request.encode() if isinstance(raw_request, str) else raw_request
    return b'{"custom_id": ' + json.dumps(custom_id).encode() + b", " + raw.strip()[1:] + b"\n"
