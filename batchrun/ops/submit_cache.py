"""A rerun's cache hits served while its file is submitted: a line whose answer the response cache
holds ends there and then, as a result marked ``"cached": true`` (state/lua/serve_cached.lua),
and never enters a shard; only the misses are loaded as jobs, leased and sent.

Only `run` (and ``batchrun.run()``) serve hits at submit: they know where their workers send (the
base URL, the config's [[endpoints]]), which is part of a cache key. `batchrun submit` leaves
every line to the workers, which key it by their own settings.

A hit costs what a hit served by a runner costs: no budget, no money. It is counted in the
batch's ``cache_hits`` and ``cache_saved`` as complete.lua counts one, not in the last minute's
ended jobs (it did not run: the pace and the ETA are the misses'). Lines are looked up a block at
a time (one read of the storage, one script call), since one round trip per line on the
in-process Redis costs more than the rest of a hit. A cache that cannot be opened or read serves
nothing here: the runners then send those lines, and say so, once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from batchrun.policy.cache_entries import RequestKeys
from batchrun.policy.pricing import PriceTable
from batchrun.runner.cached import cache_policy_of, hit_outcome
from batchrun.settings import BatchOptions
from batchrun.state.cache import ResponseCache
from batchrun.state.cache_storage import CacheUnavailable
from batchrun.state.store import BatchStore

BLOCK = 1000  # lines looked up at once
SERVE_BYTES = 16 << 20  # result lines per serve_cached call, at most (a Redis command stays small)


class HitServer:
    """Serves the hits among a submit's (custom_id, request JSON) pairs, passing the misses on."""

    def __init__(self, store: BatchStore, batch_id: str, cache: ResponseCache, options: BatchOptions,
                 keys: RequestKeys, prices: PriceTable):
        self.store, self.batch_id, self.cache, self.keys, self.prices = store, batch_id, cache, keys, prices
        self.not_before = cache_policy_of(options).not_before  # --refresh: older answers are not used
        self._prices: dict = {}
        self.served = 0
        self.saved = 0.0
        self.failed = False  # the storage failed once: the rest goes to the runners

    @classmethod
    def open(cls, store: BatchStore, batch_id: str, options: BatchOptions, keys: RequestKeys,
             prices: PriceTable) -> HitServer | None:
        """The server for a batch with the cache on; None when it bypasses the cache or the cache
        cannot be opened (its runners warn about that)."""
        if not cache_policy_of(options).enabled:
            return None
        try:
            cache = ResponseCache.for_store(store, "submit")
        except CacheUnavailable:
            return None
        return cls(store, batch_id, cache, options, keys, prices)

    def misses(self, pairs: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
        """The pairs the cache does not serve, in their order; the hits among them are served."""
        block: list[tuple[str, bytes]] = []
        for pair in pairs:
            block.append(pair)
            if len(block) >= BLOCK:
                yield from self._serve(block)
                block = []
        if block:
            yield from self._serve(block)

    def _serve(self, block: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        if self.failed:
            return block
        loads, key_of = json.loads, self.keys.key
        keyed = []
        for cid, raw in block:
            request = loads(raw)
            keyed.append((cid, raw, key_of(request), request))
        try:
            hits = self.cache.lookup_many([k for _, _, k, _ in keyed if k is not None], self.not_before)
        except Exception:  # (a locked or broken file, Redis away): the runners look again, and warn
            self.failed = True
            return block
        if not hits:
            return block
        misses, items = [], []
        for cid, raw, key, request in keyed:
            hit = hits.get(key) if key is not None else None
            if hit is None:
                misses.append((cid, raw))
                continue
            line, saved = hit_outcome(cid, str(request["body"].get("model", "")), hit, self._price)
            items.append((cid, line, saved))
        self._record(items)
        return misses

    def _record(self, items: list[tuple[str, str, float]]) -> None:
        part: list[tuple[str, str, float]] = []
        size = 0
        for item in items:
            part.append(item)
            size += len(item[1])
            if size >= SERVE_BYTES:
                self._send(part)
                part, size = [], 0
        if part:
            self._send(part)

    def _send(self, part: list[tuple[str, str, float]]) -> None:
        served, saved = self.store.serve_cached(self.batch_id, part)
        self.served += served
        self.saved += saved

    def _price(self, model: str):
        if model not in self._prices:
            self._prices[model] = self.prices.price_for(model)
        return self._prices[model]
