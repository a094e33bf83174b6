"""The gate in front of every request: the shared budget, cooldowns and the circuit breaker.

A budget is identified by the API's base URL, a fingerprint of the API key
(never the key) and the model: every worker on the same Redis sending with the
same key to the same model draws from it, whichever batch it runs. A circuit
belongs to an endpoint (base URL). Both are small hashes in Redis, changed only
by ``reserve.lua``, ``cool_down.lua`` and ``circuit.lua`` on Redis server time.

Calls from the many requests of a runner are grouped (``Batcher``), so the
gate costs a fraction of a round trip per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from dataclasses import dataclass

from batchrun import keys
from batchrun.batching import Batcher
from batchrun.settings import BatchOptions, CircuitPolicy, WorkerSettings
from batchrun.store import BatchStore

DEFAULT_SPACING_MS = 5.0  # release rate after a cooldown when the RPM is not known (200/s)


@dataclass(frozen=True, slots=True)
class Admission:
    wait: float  # seconds to sleep before sending
    probe: bool  # this request probes an open circuit


@dataclass(frozen=True, slots=True)
class CircuitState:
    state: str  # 'closed' or 'open'
    open_until_ms: int
    now_ms: int

    @property
    def open(self) -> bool:
        return self.state == "open"


def _digest(text: str) -> str:
    return hashlib.sha256(text.rstrip("/").encode()).hexdigest()[:10]


def budget_id(base_url: str, key_fingerprint: str, model: str) -> str:
    return f"{_digest(base_url)}:{key_fingerprint}:{model}"


class SharedLimiter:
    def __init__(self, store: BatchStore, settings: WorkerSettings, options: BatchOptions):
        self._store = store
        self._settings = settings
        self._options = options
        self._circuit: CircuitPolicy = settings.circuit
        self.circuit_key = keys.circuit(_digest(settings.base_url))
        self._gates: dict[str, Batcher] = {}
        self._recorder = Batcher(self._flush_outcomes, name="circuit outcome", max_delay=0.02)
        self._rng = random.Random()

    @property
    def burst_seconds(self) -> float:
        return self._options.burst_seconds

    def limits(self, model: str) -> tuple[int, int]:
        return self._options.limits.for_model(model)

    def budget_key(self, model: str) -> str:
        return keys.budget(budget_id(self._settings.base_url, self._settings.key_fingerprint(), model))

    async def admit(self, model: str, tokens: int) -> Admission | None:
        """Wait for the circuit if it is open, then reserve; None if the request can never fit."""
        gate = self._gates.get(model)
        if gate is None:
            gate = self._gates[model] = Batcher(self._flush_for(model), name="reservation", max_delay=0.002)
        while True:
            ms, verdict = await gate.submit(tokens)
            if verdict == -1:
                return None
            if verdict == 1:  # circuit open: come back when it may have closed, not all at once
                await asyncio.sleep(ms / 1000 + self._rng.uniform(0, 0.5))
                continue
            return Admission(ms / 1000, probe=verdict == 2)

    def _flush_for(self, model: str):
        rpm, tpm = self.limits(model)
        spacing = 60000 / rpm if rpm else DEFAULT_SPACING_MS
        args = [rpm, tpm, self._options.burst_seconds, spacing]
        keys_ = [self.budget_key(model), self.circuit_key]

        def flush(costs: list[int]) -> list[tuple[int, int]]:
            out = self._store.scripts.reserve(keys=keys_, args=[*args, *costs])
            return [(int(out[i]), int(out[i + 1])) for i in range(0, len(out), 2)]

        return flush

    async def cool_down(self, model: str, seconds: float) -> None:
        """The server said this budget is exhausted: the whole fleet holds off for ``seconds``."""
        await asyncio.to_thread(self._store.scripts.cool_down, keys=[self.budget_key(model)],
                                args=[max(1, int(seconds * 1000))])

    async def record(self, failed: bool, probe: bool = False) -> CircuitState:
        """Count an outcome toward the endpoint's circuit (failed = outage-like)."""
        return await self._recorder.submit((failed, probe))

    def _flush_outcomes(self, items: list[tuple[bool, bool]]) -> list[CircuitState]:
        ok = sum(1 for failed, probe in items if not failed and not probe)
        fail = sum(1 for failed, probe in items if failed and not probe)
        probes = [failed for failed, probe in items if probe]
        probe_result = "" if not probes else ("0" if probes[-1] else "1")
        p = self._circuit
        out = self._store.scripts.circuit(
            keys=[self.circuit_key],
            args=[self._settings.base_url, p.window_ms, p.min_outcomes, p.failure_share, p.first_cooling_ms,
                  p.max_cooling_ms, ok, fail, probe_result])
        state = CircuitState(*(x.decode() if isinstance(x, bytes) else str(x) for x in out[:1]),
                             int(out[1]), int(out[2]))
        return [state] * len(items)

    async def drain(self) -> None:
        for b in self._gates.values():
            await b.drain()
        await self._recorder.drain()
