"""Redis connections: a real server by URL, or an in-process one.

``memory://`` (the default when no URL is configured) means fakeredis in this
process: zero set-up, but only workers in this process can see it.
"""

from __future__ import annotations

import os
import threading

import redis

from batchrun.urls import mask_url

MEMORY_URL = "memory://"
ENV_URL = "BATCHRUN_REDIS_URL"

_fake_servers: dict[str, object] = {}
_lock = threading.Lock()


def resolve_url(url: str | None) -> str:
    return url or os.environ.get(ENV_URL) or MEMORY_URL


def is_memory(url: str) -> bool:
    return url.startswith("memory://")


def connect(url: str | None = None) -> redis.Redis:
    """A Redis client for ``url`` (``memory://NAME`` shares one fakeredis per NAME in this process)."""
    url = resolve_url(url)
    if is_memory(url):
        import fakeredis

        with _lock:
            server = _fake_servers.setdefault(url, fakeredis.FakeServer())
        return fakeredis.FakeRedis(server=server)
    # socket_timeout bounds every command; RQ raises it for its own blocking pops.
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30)


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    if is_memory(url):
        return "in-process Redis (fakeredis)"
    return mask_url(url)
