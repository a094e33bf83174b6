"""An endpoint's fleet-wide ``max_in_flight``: a Redis semaphore whose slots are leases.

Every runner of every worker sending to the endpoint takes a slot before a request goes out
and gives it back when the answer is in (slot_acquire.lua, slot_release.lua). A slot is a lease
on Redis server time, renewed while its request is open (slot_renew.lua, from the runner's
lease renewal): a worker that dies stops renewing, and its slots come back when their leases
run out, without anyone having to notice the death.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from dataclasses import dataclass

import redis

from batchrun.state import keys
from batchrun.state.store import BatchStore

POLL_MIN_S = 0.01  # a runner waiting for a slot asks again after this at the soonest...
POLL_MAX_S = 0.25  # ...and this at the latest (a slot freed elsewhere is seen this late at most)


@dataclass
class _Take:
    """One slot_acquire on its thread, against its waiter being cancelled meanwhile."""

    abandoned: bool = False  # the waiter was cancelled
    handed: bool = False  # the thread had returned its answer to the waiter


class FleetSlots:
    """The slots of one endpoint (by base URL), as one runner takes and gives them back."""

    def __init__(self, store: BatchStore, base_url: str, limit: int, lease_ms: int, token: str):
        self._store = store
        self.key = keys.slots(keys.endpoint_id(base_url))
        self.limit = limit
        self._lease_ms = lease_ms
        self._token = token
        self._seq = itertools.count()
        self._held: set[str] = set()
        self._rng = random.Random()
        self._lock = threading.Lock()  # a take's thread against its waiter's cancellation

    @property
    def held(self) -> int:
        return len(self._held)

    def _take(self, member: str) -> tuple[int, int, int]:
        taken, held, wait = self._store.scripts.slot_acquire(keys=[self.key], args=[self.limit, self._lease_ms, member])
        return int(taken), int(held), int(wait)

    def _take_unless_abandoned(self, member: str, take: _Take) -> tuple[int, int, int]:
        got = self._take(member)
        with self._lock:
            if not take.abandoned:
                take.handed = True  # from now on a cancelled waiter gives it back itself
                return got
        if got[0]:  # the waiter was cancelled meanwhile: nobody will send with it
            self._release_quietly(member)
        return got

    async def acquire(self) -> str:
        """Wait for a slot; returns its name, for ``release``. Every wait is short and the loop
        ends when a slot frees (an answer elsewhere, or a dead worker's lease running out)."""
        member = f"{self._token}:{next(self._seq)}"
        delay = POLL_MIN_S
        while True:
            try:
                taken, _, _ = await asyncio.to_thread(self._take_unless_abandoned, member, take := _Take())
            except (redis.ConnectionError, redis.TimeoutError):
                taken = 0  # Redis away: wait and ask again, sending nothing meanwhile
            except asyncio.CancelledError:
                # Its thread goes on and may take the slot after all: that thread gives it back then
                # (else nobody would, until its lease ran out, holding the endpoint's cap for a lease).
                with self._lock:
                    take.abandoned = True
                    handed = take.handed  # it had returned, its answer not yet seen here
                if handed:
                    threading.Thread(target=self._release_quietly, args=(member,), daemon=True).start()
                raise
            if taken:
                self._held.add(member)
                return member
            await asyncio.sleep(delay * self._rng.uniform(0.5, 1.5))
            delay = min(POLL_MAX_S, delay * 2)

    async def release(self, member: str) -> None:
        self._held.discard(member)
        try:
            await asyncio.to_thread(self._store.scripts.slot_release, keys=[self.key], args=[member])
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # its lease runs out by itself

    def _release_quietly(self, member: str) -> None:
        try:
            self._store.scripts.slot_release(keys=[self.key], args=[member])
        except redis.RedisError:
            pass  # its lease runs out by itself

    def renew(self) -> None:
        """Extend the leases of the slots held (called with the runner's lease renewal)."""
        members = list(self._held)
        if members:
            self._store.scripts.slot_renew(keys=[self.key], args=[self._lease_ms, *members])


def slots_in_use(store: BatchStore, base_url: str) -> int:
    """Slots of an endpoint held now across the fleet (for `batchrun endpoints`)."""
    key = keys.slots(keys.endpoint_id(base_url))
    now = store.server_time_ms()
    return int(store.redis.zcount(key, f"({now}", "+inf"))
