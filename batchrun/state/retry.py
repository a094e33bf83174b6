"""Waiting out an unreachable Redis: the one retry loop for calls from the event loop.

A runner must not drop a finished result, nor give up its shard, because Redis restarted:
the call is made again with a growing delay until Redis answers. Any other error is the
caller's (it propagates at once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import redis

UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)  # Redis away: worth waiting for
FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0

R = TypeVar("R")


async def until_reachable(call: Callable[[], R], on_retry: Callable[[Exception, float], None]) -> R:
    """``call()`` in a thread, again and again while Redis is unreachable; ``on_retry(exc, delay)``
    is told before each wait (to log it)."""
    delay = FIRST_DELAY_S
    while True:
        try:
            return await asyncio.to_thread(call)
        except UNREACHABLE as exc:
            on_retry(exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)
