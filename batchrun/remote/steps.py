"""One step of a remote batch's life: upload, create (idempotently), wait out a full queue,
poll, collect; and cancelling them all.

Each step records its result before the next one starts, and a create records its intent
(CREATING) first: a runner that dies after sending it looks the batch up by its metadata
(batchrun's batch id and part number) instead of creating a second one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from batchrun.policy.decision import PauseKind
from batchrun.remote.auto import is_late
from batchrun.remote.cap import part_costs
from batchrun.remote.client import KeyRefused, QueueFull, Refused, RemoteClient, RemoteError, Unavailable
from batchrun.remote.collect import Recorder, input_line, read_file_lines
from batchrun.policy.remote_lines import is_queue_full
from batchrun.state import keys
from batchrun.state.remote_parts import REMOTE_LEASE_MS, REMOTE_TOKEN, Part, PartState, RemoteParts
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore
from batchrun.urls import mask_url

log = logging.getLogger("batchrun.remote")

ENDED_UPSTREAM = ("completed", "expired", "cancelled")
HOLD_FIRST, HOLD_CAP = 2.0, 600.0  # seconds between creates while the model's queue is full
MAX_HOLD_SECONDS = 86_400.0  # a part held this long goes to live sending instead
CANCEL_WAIT_SECONDS = 300.0  # cancelling: how long the upstream gets to end the batches


def now_ms() -> int:
    return int(time.time() * 1000)


class CapPaused(Exception):
    """The part does not fit under --max-cost (or its model has no price): the batch is paused."""


class PartSteps:
    def __init__(self, store: BatchStore, batch_id: str, client: RemoteClient, recorder: Recorder,
                 save: Callable[..., None], reserve: Callable[[Part, str, list], tuple[int, str]] | None = None,
                 clients: Callable[[Part], RemoteClient] | None = None):
        self.store, self.batch_id, self.client, self.recorder, self.save = store, batch_id, client, recorder, save
        self.reserve = reserve
        self.clients = clients  # a part's client when it names an [[endpoints]] endpoint (may raise Unavailable)
        self.cancel_started: float | None = None

    def advance(self, parts: list[Part]) -> bool:
        """Move each part one step on; True if any changed."""
        changed = False
        held = {p.model for p in parts if p.state is PartState.HELD}
        meta = self.store.meta(self.batch_id)
        self.recorder.refresh(meta)  # prices given at a resume count from this pass on
        late, paused = is_late(meta), meta.get("state") == BatchState.PAUSED
        at_cap = meta.get("pause_kind") == PauseKind.COST_CAP
        for part in parts:
            if part.state.ended or (paused and part.state is not PartState.RUNNING
                                    and not (at_cap and part.reserved)):
                continue  # (paused: nothing new goes upstream; what is there, or paid for, still goes on)
            if late and not part.late:
                changed |= self._late(part)
                continue
            if part.state is PartState.UPLOADED and part.model in held:
                continue  # the model's queue is full: this file waits behind the held one
            if part.state is not PartState.RUNNING and self._cancelled():
                break  # cancelled during this pass: nothing more goes upstream (cancel_all takes over)
            before = part.to_json()
            try:
                self.step(part)
                part.down_since_ms = 0
            except Unavailable as exc:
                paused |= self._unavailable(part, str(exc))
            except KeyRefused as exc:  # every job would fail alike: pause, as live sending does
                paused = True
                self._pause(part, f"the API key was refused at {self._where(part)} ({exc}), so the "
                                  f"batch is paused; no job failed. Set a valid {self._key_var(part)} for the workers, "
                                  f"then run `batchrun resume {self.batch_id}`")
            except Refused as exc:
                self._refused(part, str(exc))
            except CapPaused:
                paused = at_cap = True
            if part.to_json() != before:
                self.save([part])
                changed = True
            if part.state is PartState.HELD:
                held.add(part.model)
        return changed

    def step(self, part: Part) -> None:
        match part.state:
            case PartState.PLANNED:
                self._upload(part)
            case PartState.UPLOADED:
                self._create(part)
            case PartState.CREATING:
                found = self._client(part).find(self._metadata(part))
                if found:
                    self._running(part, found)
                else:
                    self._create(part)
            case PartState.HELD:
                if now_ms() - part.held_since_ms >= MAX_HOLD_SECONDS * 1000:
                    self._to_live(part, "the model's Batch API queue stayed full")
                elif now_ms() >= part.hold_until_ms:
                    part.state = PartState.UPLOADED
                    self._create(part)
            case PartState.RUNNING:
                self._poll(part)

    def _unavailable(self, part: Part, why: str) -> bool:
        """A call failed for now (5xx, 429, unreachable): tried again at the next poll, until the
        part has failed for --give-up-after; then the batch pauses (True) rather than trying for ever."""
        part.down_since_ms = part.down_since_ms or now_ms()
        part.note = f"{why} (tried again at the next poll)"
        give_up = self.recorder.options.give_up_seconds
        down_for = (now_ms() - part.down_since_ms) / 1000
        if not give_up > 0 or down_for < give_up:
            return False
        self._pause(part, f"the Batch API at {self._where(part)} has failed for {down_for:.0f} s "
                          f"({why}), past --give-up-after {give_up:g} s, so the batch is paused rather than trying "
                          f"for ever; no job failed. Check {self._url_source(part)} and that the server is up, then "
                          f"run `batchrun resume {self.batch_id}`")
        return True

    def _pause(self, part: Part, reason: str) -> None:
        part.note, part.down_since_ms = reason, 0  # (a resume starts the count again)
        self.store.set_state(self.batch_id, BatchState.PAUSED, reason, only_from=(BatchState.RUNNING,))
        log.warning("batch %s, remote batch %d: %s", self.batch_id, part.no, reason)

    def _client(self, part: Part) -> RemoteClient:
        if self.clients is None or not part.endpoint:
            return self.client
        return self.clients(part)

    def _where(self, part: Part) -> str:
        try:
            return mask_url(self._client(part).base_url) + (f" (endpoint {part.endpoint!r})" if part.endpoint else "")
        except RemoteError:
            return f"endpoint {part.endpoint!r}"

    def _url_source(self, part: Part) -> str:
        """Where the part's URL comes from, for a sentence: the worker's OPENAI_BASE_URL, or its endpoint."""
        return f"endpoint {part.endpoint!r} in the workers' config file" if part.endpoint else "OPENAI_BASE_URL"

    def _key_var(self, part: Part) -> str:
        try:
            return self._client(part).key_env
        except RemoteError:
            return "API key"

    def _metadata(self, part: Part) -> dict[str, str]:
        return {"batchrun_batch": self.batch_id, "batchrun_part": str(part.no)}

    def _upload(self, part: Part) -> None:
        cids = self._still_ours(part)
        lines = []
        for i in range(0, len(cids), 5000):
            chunk = cids[i:i + 5000]
            for cid, raw in zip(chunk, self.store.redis.hmget(keys.sub(self.batch_id, "req"), chunk)):
                if raw:  # (no request: the job ended meanwhile)
                    lines.append(input_line(cid, raw))
        if not lines:
            part.state, part.note = PartState.DONE, "every job had ended (or gone to live sending) before the upload"
            return
        if not self._within_cap(part, cids):
            return
        part.file_id = self._client(part).upload(f"batchrun-{self.batch_id}-part{part.no}.jsonl", b"".join(lines))
        part.state, part.note = PartState.UPLOADED, ""

    def _still_ours(self, part: Part) -> list[str]:
        """The part's jobs still leased to the remote token, their leases renewed for the whole
        remote lease from now (the upload). A part planned long ago (its batch paused longer than
        the lease) may have had jobs reclaimed into their shards, where live runners send them:
        uploaded too, they would be sent twice, with nothing set aside for their remote copy. They
        leave the part (its ids are rewritten), so that the part holds what went up."""
        cids = self._ids(part)
        by_owner: dict[str, list[str]] = {}
        for cid, owner in self.recorder.owners(cids).items():
            if owner.startswith(REMOTE_TOKEN + "|"):
                by_owner.setdefault(owner, []).append(cid)
        for owner, group in by_owner.items():
            for i in range(0, len(group), 5000):
                self.store.renew(self.batch_id, owner, REMOTE_LEASE_MS, group[i:i + 5000])
        # (read again after the renewal: a lease that lapsed just before it was not renewed)
        kept = [cid for cid, owner in self.recorder.owners(cids).items() if owner.startswith(REMOTE_TOKEN + "|")]
        if len(kept) < len(cids):
            log.warning("batch %s, remote batch %d: %d of its %d job(s) are no longer leased to it (their lease "
                        "ran out while it waited; live sending has them): they are not uploaded", self.batch_id,
                        part.no, len(cids) - len(kept), len(cids))
            if kept:
                part.size = len(kept)
                self.save([part], {part.no: kept})
        return kept

    def _within_cap(self, part: Part, cids: list[str]) -> bool:
        """Under --max-cost: set the part's worst case aside before its file goes up, or pause the
        batch (CapPaused) and leave the part planned; False if the batch stopped running meanwhile."""
        cap = float(self.store.meta(self.batch_id).get("max_cost") or 0)
        if cap <= 0 or part.reserved or self.reserve is None:
            return True
        costs, unpriced = part_costs(self.store.redis, self.batch_id, cids, self.recorder.table)
        if unpriced:
            message = (f"no price is known for model {unpriced!r} (remote batch #{part.no}), so the --max-cost "
                       f"cannot be kept; give its price with: batchrun resume {self.batch_id} --prices FILE")
            if self.store.set_state(self.batch_id, BatchState.PAUSED, message, only_from=(BatchState.RUNNING,),
                                    pause_kind=PauseKind.NO_PRICE):
                log.error("batch %s paused: %s", self.batch_id, message)
            raise CapPaused(message)
        label = f"remote batch (#{part.no}: {len(costs):,} job(s) of {part.model})"
        done, reason = self.reserve(part, label, costs)
        if done == 1:
            part.reserved = True
            return True
        if reason:
            log.warning("batch %s paused: %s", self.batch_id, reason)
            part.note = "not uploaded: it would take the batch past its --max-cost"
            raise CapPaused(reason)
        return False

    def _create(self, part: Part) -> None:
        part.state = PartState.CREATING
        self.save([part])  # the intent first: a crash after the create finds the batch by its metadata
        try:
            created = self._client(part).create(part.file_id, part.url, self._metadata(part))
        except QueueFull as exc:
            self._hold(part, str(exc))
            return
        self._running(part, created)

    def _hold(self, part: Part, why: str) -> None:
        wait = min(HOLD_CAP, HOLD_FIRST * 2 ** min(part.holds, 20))
        part.state, part.holds = PartState.HELD, part.holds + 1
        part.held_since_ms = part.held_since_ms or now_ms()
        part.hold_until_ms = now_ms() + int(wait * 1000)
        part.remote_id, part.remote_status = "", ""
        part.note = f"the model's Batch API queue is full; created again in {wait:.0f} s ({why})"
        log.warning("batch %s, remote batch %d: %s", self.batch_id, part.no, part.note)

    def _running(self, part: Part, batch: dict) -> None:
        part.state, part.remote_id = PartState.RUNNING, batch["id"]
        part.remote_status, part.counts = batch.get("status") or "", dict(batch.get("request_counts") or {})
        part.held_since_ms, part.note = 0, ""

    def _poll(self, part: Part) -> None:
        batch = self._client(part).retrieve(part.remote_id)
        part.remote_status, part.counts = batch.get("status") or "", dict(batch.get("request_counts") or {})
        if part.remote_status in ENDED_UPSTREAM:
            self._collect(part, batch)
        elif part.remote_status == "failed":
            errors = ((batch.get("errors") or {}).get("data") or [])
            first = errors[0] if errors else {}
            if is_queue_full(first.get("code"), first.get("message")):
                self._hold(part, str(first.get("message") or first.get("code")))
            else:
                self._to_live(part, f"the remote batch failed: {first.get('message') or 'no reason given'}")

    def _collect(self, part: Part, batch: dict) -> None:
        ids = self._ids(part)
        ours, lines = set(ids), {}
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if file_id:
                read_file_lines(self._client(part).content(file_id), ours, lines)
        got = self.recorder.record(part.model, ids, lines, part.url)
        again = self._resend(part, got.resend)
        part.state = PartState.CANCELLED if self._cancelled() else PartState.DONE
        part.note = f"{got.results} result(s), {got.errors} error(s), {len(got.resend)} sent again"
        if again is not None:
            # The new part and this one's end in one write: a runner killed between two writes
            # would collect this part again and make a second new part of the same lines.
            new, items = again
            self.save([new, part], {new.no: [c for c, _, _ in items]})
            self.recorder.count_attempt(items)  # after the write: a kill before it costs no attempt twice
        log.info("batch %s, remote batch %d (%s) %s: %s", self.batch_id, part.no, part.remote_id,
                 part.remote_status, part.note)

    def _resend(self, part: Part, items: list[tuple[str, str, str]]) -> tuple[Part, list] | None:
        """Send these lines again; with --resend-via batch-api, returns the new part (and its lines)
        for the caller to save with this part's end."""
        if not items:
            return None
        if self._cancelled() or part.late:
            # A cancelled batch takes nothing back (the leases go); a late part's lines were not tried.
            self.recorder.resend_live(items, counts=False)
            return None
        again, last = self.recorder.over_limit(items)
        if last:
            self.recorder.fail(last)
        if not again:
            return None
        if self.recorder.options.resend_via == "batch-api":
            no = max(p.no for p in self._all_parts()) + 1
            return Part(no, part.url, part.model, len(again), resend=True, endpoint=part.endpoint), again
        self.recorder.resend_live(again)
        return None

    def _late(self, part: Part) -> bool:
        """--via auto, the deadline near: cancel the remote batch upstream (what it finished is kept,
        the rest goes live when it has ended) or, if it is not upstream yet, send its jobs live."""
        part.late = True
        try:
            if part.state is PartState.CREATING:
                found = self._client(part).find(self._metadata(part))
                if found:
                    self._running(part, found)
            if part.state is PartState.RUNNING:
                if self._client(part).cancel(part.remote_id) is not None:
                    part.remote_status = "cancelling"
                part.note = "late for the deadline: cancelled upstream, its unfinished lines go live"
            else:
                self._to_live(part, "late for the deadline")
        except RemoteError as exc:
            part.late, part.note = False, f"late for the deadline, and cancelling failed: {exc}"
        self.save([part])
        log.warning("batch %s, remote batch %d: %s", self.batch_id, part.no, part.note)
        return True

    def _to_live(self, part: Part, why: str) -> None:
        """The part's jobs go to live sending (no attempt counted: none was made)."""
        n = self.recorder.resend_live([(cid, "", "") for cid in self._ids(part)], counts=False)
        part.state, part.note = PartState.DONE, f"{why}; its {n} job(s) went to live sending"
        log.warning("batch %s, remote batch %d: %s", self.batch_id, part.no, part.note)

    def _refused(self, part: Part, why: str) -> None:
        """The upstream refused the file or the batch for good: each job ends with that reason."""
        items = [(cid, "remote_batch_refused", why) for cid in self._ids(part)]
        self.recorder.fail(items)
        part.state, part.note = PartState.DONE, why

    # -- cancel ----------------------------------------------------------------

    def cancel_all(self, parts: list[Part]) -> bool:
        """The batch was cancelled: cancel upstream, record what the remote batches had finished,
        and free the rest. Bounded: after CANCEL_WAIT_SECONDS, what is still open is left."""
        self.cancel_started = self.cancel_started or time.monotonic()
        late = time.monotonic() - self.cancel_started > CANCEL_WAIT_SECONDS
        changed = False
        for part in parts:
            if part.state.ended:
                continue
            before = part.to_json()
            try:
                self._cancel_one(part, late)
            except RemoteError as exc:
                part.note = f"cancelling: {exc}"
            if part.to_json() != before:
                self.save([part])
                changed = True
        return changed

    def _cancel_one(self, part: Part, late: bool) -> None:
        if part.state is PartState.CREATING:
            found = self._client(part).find(self._metadata(part))
            if found:
                self._running(part, found)
        if part.state is not PartState.RUNNING or late:
            self.recorder.resend_live([(cid, "", "") for cid in self._ids(part)], counts=False)
            part.state = PartState.CANCELLED
            part.note = part.note or "cancelled before it was created upstream"
            return
        if part.remote_status not in ("cancelling", "cancelled", *ENDED_UPSTREAM):
            self._client(part).cancel(part.remote_id)
            part.remote_status = "cancelling"
            return
        self._poll(part)

    def _cancelled(self) -> bool:
        return self.store.redis.hget(keys.batch(self.batch_id), "state") in (b"cancelled", "cancelled")

    def _ids(self, part: Part) -> list[str]:
        return RemoteParts(self.store.redis).ids(self.batch_id, part.no)

    def _all_parts(self) -> list[Part]:
        return RemoteParts(self.store.redis).parts(self.batch_id)
