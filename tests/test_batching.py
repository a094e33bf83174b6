"""state.batching.Batcher: many submits become few flushes, in order, and nothing is dropped."""

from __future__ import annotations

import asyncio

import pytest
import redis

from batchrun.state.batching import Batcher


def test_items_submitted_together_go_in_one_flush_and_each_gets_its_answer():
    calls: list[list[int]] = []

    def flush(items):
        calls.append(list(items))
        return [i * 10 for i in items]

    async def go():
        batcher = Batcher(flush, max_delay=0.01)
        return await asyncio.gather(*(batcher.submit(i) for i in range(5)))

    assert asyncio.run(go()) == [0, 10, 20, 30, 40]
    assert calls == [[0, 1, 2, 3, 4]]


def test_a_full_batch_is_flushed_at_once_and_flushes_keep_their_order():
    calls: list[list[int]] = []

    async def go():
        batcher = Batcher(lambda items: calls.append(list(items)), max_items=3, max_delay=10.0)
        await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(6))), 5)

    asyncio.run(go())  # a 10 s delay: only max_items can have flushed them
    assert calls == [[0, 1, 2], [3, 4, 5]]


def test_redis_away_keeps_the_items_and_retries(monkeypatch):
    monkeypatch.setattr("batchrun.state.batching.asyncio.sleep", _no_sleep)
    tries: list[list[str]] = []

    def flush(items):
        tries.append(list(items))
        if len(tries) < 3:
            raise redis.ConnectionError("down")
        return ["ok"] * len(items)

    async def go():
        batcher = Batcher(flush, max_delay=0.001)
        return await asyncio.gather(batcher.submit("a"), batcher.submit("b"))

    assert asyncio.run(go()) == ["ok", "ok"]
    assert tries == [["a", "b"]] * 3


def test_a_bug_in_the_flush_reaches_every_waiter():
    def flush(items):
        raise KeyError("bug")

    async def go():
        batcher = Batcher(flush, max_delay=0.001)
        return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)

    assert [type(e) for e in asyncio.run(go())] == [KeyError, KeyError]


def test_drain_flushes_what_waits_before_its_delay():
    calls: list[list[int]] = []

    async def go():
        batcher = Batcher(lambda items: calls.append(list(items)), max_delay=60.0)
        waiter = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0)
        await asyncio.wait_for(batcher.drain(), 5)
        assert waiter.done() and waiter.result() is None  # a flush that returns nothing answers None

    asyncio.run(go())
    assert calls == [[1]]


_real_sleep = asyncio.sleep


async def _no_sleep(seconds):
    await _real_sleep(0)


@pytest.mark.parametrize("n", [1, 7])
def test_answers_match_their_items(n):
    async def go():
        batcher = Batcher(lambda items: [f"<{i}>" for i in items], max_items=4)
        return await asyncio.gather(*(batcher.submit(i) for i in range(n)))

    assert asyncio.run(go()) == [f"<{i}>" for i in range(n)]
