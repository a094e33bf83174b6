"""Group many small Redis operations from concurrent asyncio tasks into one call.

Hundreds of requests finish per second inside one shard runner; recording each
with its own round trip would make Redis the bottleneck. A ``Batcher`` collects
items for a few milliseconds and hands them to a synchronous function (run in
a thread, so the event loop keeps sending) in one call.

If Redis is unreachable the batch is kept and retried with backoff: a finished
result is never dropped because Redis restarted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from batchrun.state.retry import until_reachable

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("batchrun.worker")


class Batcher(Generic[T, R]):
    def __init__(self, flush: Callable[[list[T]], Sequence[R] | None], *, max_items: int = 500,
                 max_delay: float = 0.005, name: str = "batch"):
        self._flush = flush
        self._max_items = max_items
        self._max_delay = max_delay
        self._name = name
        self._items: list[T] = []
        self._futures: list[asyncio.Future] = []
        self._timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()  # one flush at a time, in submission order
        self._pending: set[asyncio.Task] = set()

    async def submit(self, item: T) -> R | None:
        fut = asyncio.get_running_loop().create_future()
        self._items.append(item)
        self._futures.append(fut)
        if len(self._items) >= self._max_items:
            self._start_flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._max_delay, self._start_flush)
        return await fut

    def _start_flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._items:
            return
        items, futures = self._items, self._futures
        self._items, self._futures = [], []
        task = asyncio.get_running_loop().create_task(self._run(items, futures))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _run(self, items: list[T], futures: list[asyncio.Future]) -> None:
        async with self._lock:
            try:
                out = await until_reachable(
                    lambda: self._flush(items),
                    lambda exc, delay: log.warning("Redis unreachable (%s); keeping %d %s item(s) and retrying in "
                                                   "%.1f s", exc, len(items), self._name, delay))
            except BaseException as exc:  # a bug: let every waiter see it
                for f in futures:
                    if not f.done():
                        f.set_exception(exc)
                return
        for i, f in enumerate(futures):
            if not f.done():
                f.set_result(out[i] if out is not None else None)

    async def drain(self) -> None:
        """Flush what is waiting and wait for every flush in progress."""
        self._start_flush()
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
