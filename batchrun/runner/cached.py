"""A shard runner's use of the response cache (state/cache.py): serve a job from it, wait for an
identical request another job is sending (in-batch dedupe), store a fresh answer.

A hit reserves no budget and no money: it is looked up before the spending cap and the rate
budget are asked, and it ends through complete.lua as a result marked ``"cached": true`` whose
cost field is what it saved. A miss claims the request's sending; a job that finds it claimed
waits (holding its slot, its lease renewed) until the answer lands or the claim goes (its
runner failed or died; then it claims and sends itself), at most a request timeout and two
leases, after which it sends anyway: a bounded wait, never an endless one.
``CacheSteps`` is a part of ``JobAttempts`` (runner/attempt.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from batchrun.files.outputs import result_line
from batchrun.policy.cache_entries import CachedAnswer, RequestKeys
from batchrun.policy.pricing import answer_cost
from batchrun.state.cache import CachePolicy, ResponseCache
from batchrun.state.cache_storage import CacheUnavailable
from batchrun.state.items import CompleteItem, OutcomeKind
from batchrun.state.store import LeasedJob

log = logging.getLogger("batchrun.worker")

CACHED_FIELD = "cached"  # the batchrun extension field of a result line served from the cache
_SAID: set[str] = set()  # the cache-unavailable sentences this process has logged (one each, not one per shard)
_FIRST_POLL, _LONGEST_POLL = 0.05, 1.0  # seconds between looks while an identical request is sent


def cache_policy_of(options) -> CachePolicy:
    ttl_days = options.cache_ttl_days or options.keep_days
    return CachePolicy(enabled=bool(options.cache), refresh=bool(options.cache_refresh),
                       ttl_seconds=ttl_days * 86400.0, max_bytes=int(options.cache_max_mb * 1024 * 1024),
                       not_before=options.cache_refresh)


def hit_outcome(custom_id: str, model: str, hit: CachedAnswer, price_of) -> tuple[str, float]:
    """A job served by the cache: its result line (the stored answer, marked ``"cached": true``)
    and what it saved, at the batch's prices (``price_of(model)``) from the answer's usage."""
    line = result_line(custom_id, status_code=hit.status_code, request_id=hit.request_id, body=hit.body)
    line[CACHED_FIELD] = True
    answered = hit.body.get("model")
    asked = price_of(model)
    other = price_of(answered) if isinstance(answered, str) and answered and answered != model else None
    saved = answer_cost([asked] if other is None or other == asked else [asked, other], hit.body.get("usage"), 0, 0)
    return json.dumps(line), saved


class CacheSteps:
    cache: ResponseCache | None = None  # (set by _set_up_cache; None: the batch bypasses the cache)
    _claimed: dict[str, str] = {}  # (replaced by _set_up_cache; only a runner with a cache adds to it)

    def _set_up_cache(self, meta: dict[str, str], options) -> None:
        self.cache_policy = cache_policy_of(options)
        self.cache = None
        if self.cache_policy.enabled:
            try:
                self.cache = ResponseCache.for_store(self.store, self.owner)
            except CacheUnavailable as exc:  # every request is sent, as with --no-cache
                if str(exc) not in _SAID:
                    _SAID.add(str(exc))
                    log.warning("batch %s: %s; until then requests are sent without it", self.batch_id, exc)
        self._claimed: dict[str, str] = {}  # custom_id -> the cache key whose sending it claimed
        # [[endpoints]]: a key names the servers the request may go to, not OPENAI_BASE_URL
        self._request_keys = RequestKeys(self.settings.base_url,
                                         tuple(r.endpoint for r in self.routes.all if r.endpoint is not None))
        self._cache_failing = False

    def _cache_key_of(self, job: LeasedJob) -> str | None:
        """The job's cache key; None when the batch or its line bypasses the cache."""
        if self.cache is None:
            return None
        return self._request_keys.key(job.request)

    async def _served_from_cache(self, job: LeasedJob, key: str) -> bool:
        """True: the job ended with a cached answer. False: send it (this job now holds the claim,
        or it waited as long as it may)."""
        deadline = time.monotonic() + self.settings.request_timeout + 2 * self.settings.lease_seconds
        pause = _FIRST_POLL
        while True:
            hit = self._cache_lookup(key)
            if hit is not None:
                await self._record_hit(job, hit)
                return True
            claimed = self._cache_call(self.cache.claim, key, self.lease_ms)
            if claimed is None:  # the cache is unreachable: the job is sent as without it
                return False
            if claimed:
                hit = self._cache_lookup(key)  # it may have landed between the look and the claim
                if hit is not None:
                    self._cache_call(self.cache.release, key)
                    await self._record_hit(job, hit)
                    return True
                self._claimed[job.custom_id] = key
                return False
            if time.monotonic() > deadline:
                log.warning("batch %s: job %s waited %.0f s for an identical request another job is sending; "
                            "it is sent itself", self.batch_id, job.custom_id, self.settings.request_timeout)
                return False
            self.stats["cache_waits"] += 1
            await asyncio.sleep(pause)
            pause = min(pause * 2, _LONGEST_POLL)

    def _cache_lookup(self, key: str) -> CachedAnswer | None:
        return self._cache_call(self.cache.lookup, key, self.cache_policy.not_before)

    def _cache_call(self, fn, *args):
        """A cache call; None (and one warning until it works again) when its storage fails."""
        try:
            out = fn(*args)
        except Exception as exc:
            if not self._cache_failing:
                log.warning("batch %s: the response cache (%s) cannot be used (%s: %s); requests are sent "
                            "without it", self.batch_id, self.cache.storage.where, type(exc).__name__, exc)
            self._cache_failing = True
            return None
        self._cache_failing = False
        return out

    async def _record_hit(self, job: LeasedJob, hit: CachedAnswer) -> None:
        line, saved = hit_outcome(job.custom_id, str(job.request["body"].get("model", "")), hit, self._price)
        await self.completer.submit(CompleteItem(OutcomeKind.RESULT, job.custom_id, line, saved, False, True))
        self.stats["done"] += 1
        self.stats["cache_hits"] += 1
        self.metrics["ended"] += 1

    def _store_in_cache(self, custom_id: str, answer) -> None:
        """A job's fresh result, stored for the jobs waiting on it and for later runs."""
        key = self._claimed.get(custom_id)
        if key is None or not isinstance(answer.body, dict):
            return
        stored = self._cache_call(self.cache.store, key, answer.status_code, answer.request_id, answer.body,
                                  self.cache_policy)
        if stored is False:
            log.info("batch %s: the answer of job %s is larger than --cache-max-mb; it is not cached",
                     self.batch_id, custom_id)

    def _release_claim(self, custom_id: str) -> None:
        key = self._claimed.pop(custom_id, None)
        if key is not None:
            self._cache_call(self.cache.release, key)

    def _renew_cache_claims(self) -> None:
        if getattr(self, "cache", None) is not None and self.cache.claims:
            self._cache_call(self.cache.renew_claims, self.lease_ms)
