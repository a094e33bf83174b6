"""The shared requests/tokens-per-minute budget.

A budget is identified by the API's base URL, a fingerprint of the API key
(never the key) and the model: every worker on the same Redis sending with the
same key to the same model draws from it, whichever batch it runs. The state
is one small hash changed only by ``reserve.lua``, on Redis server time.
"""

from __future__ import annotations

import hashlib

from batchrun import keys
from batchrun.batching import Batcher
from batchrun.settings import BatchOptions, WorkerSettings
from batchrun.store import BatchStore


def budget_id(base_url: str, key_fingerprint: str, model: str) -> str:
    url = hashlib.sha256(base_url.rstrip("/").encode()).hexdigest()[:10]
    return f"{url}:{key_fingerprint}:{model}"


class SharedLimiter:
    """``await limiter.reserve(model, tokens)`` → seconds to wait before sending, or None if it can never fit."""

    def __init__(self, store: BatchStore, settings: WorkerSettings, options: BatchOptions):
        self._store = store
        self._settings = settings
        self._options = options
        self._batchers: dict[str, Batcher] = {}

    def limits(self, model: str) -> tuple[int, int]:
        return self._options.limits.for_model(model)

    async def reserve(self, model: str, tokens: int) -> float | None:
        rpm, tpm = self.limits(model)
        if not rpm and not tpm:
            return 0.0
        batcher = self._batchers.get(model)
        if batcher is None:
            key = keys.budget(budget_id(self._settings.base_url, self._settings.key_fingerprint(), model))
            batcher = self._batchers[model] = Batcher(self._flush_for(key, rpm, tpm), name="reservation")
        wait_ms = await batcher.submit(tokens)
        return None if wait_ms < 0 else wait_ms / 1000

    def _flush_for(self, key: str, rpm: int, tpm: int):
        burst = self._options.burst_seconds

        def flush(costs: list[int]) -> list[int]:
            out = self._store.scripts.reserve(keys=[key], args=[rpm, tpm, burst, *costs])
            return [int(w) for w in out]

        return flush

    async def drain(self) -> None:
        for b in self._batchers.values():
            await b.drain()
