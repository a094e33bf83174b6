"""Shared fixtures: Redis backends (fakeredis and the real server), a BatchStore, batches made quickly.

The real Redis is 127.0.0.1:6379, database 12 (or BATCHRUN_TEST_REDIS_DB, so that two runs of the suite on
one machine keep out of each other's way) plus the pytest-xdist worker's number (gw0 -> +0, gw3 -> +3), so
that the workers of one run under ``-n 4`` use DBs 12-15 and never flush each other's; it is flushed before
and after each test that uses it. When it is unreachable the "real" tests are skipped, unless
BATCHRUN_REQUIRE_REDIS=1 (as in CI), which makes them fail instead.
"""

from __future__ import annotations

import json
import os
import sys

import fakeredis
import pytest
import redis

from batchrun.settings import BatchOptions
from batchrun.state.store import BatchStore

REDIS_DATABASES = 16  # redis-server's default "databases"
FIRST_TEST_DB = int(os.environ.get("BATCHRUN_TEST_REDIS_DB") or 12)


def _xdist_worker_index() -> int:
    """0 outside pytest-xdist; N for its worker "gwN". A worker that replaces a crashed one gets a new
    number past the count: modulo the count it takes the dead one's DB, which nothing uses any more."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    return int(worker[2:]) % count if worker.startswith("gw") and worker[2:].isdigit() else 0


def pytest_configure(config) -> None:
    """In the controller: refuse a worker count whose DBs would not all exist, before any worker starts."""
    if os.environ.get("PYTEST_XDIST_WORKER") or getattr(config.option, "dist", "no") == "no":
        return
    last = FIRST_TEST_DB + len(getattr(config.option, "tx", None) or [None]) - 1
    if not 0 <= FIRST_TEST_DB <= last < REDIS_DATABASES:
        raise pytest.UsageError(
            f"the xdist workers would use Redis DBs {FIRST_TEST_DB}-{last} (BATCHRUN_TEST_REDIS_DB="
            f"{FIRST_TEST_DB} plus one per worker), past 0-{REDIS_DATABASES - 1}: set a lower "
            "BATCHRUN_TEST_REDIS_DB or run fewer workers (-n)")


REAL_REDIS_URL = f"redis://127.0.0.1:6379/{FIRST_TEST_DB + _xdist_worker_index()}"


def _require_redis() -> bool:
    return os.environ.get("BATCHRUN_REQUIRE_REDIS", "").strip() not in ("", "0", "false", "no")


def _connect_real_redis() -> redis.Redis:
    """A client on the test DB, flushed; skips (or fails, under BATCHRUN_REQUIRE_REDIS=1) if Redis is down."""
    client = redis.Redis.from_url(REAL_REDIS_URL, socket_connect_timeout=1.0)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        client.close()
        reason = f"real Redis at {REAL_REDIS_URL} is unreachable ({exc})"
        if _require_redis():
            pytest.fail(f"{reason}, and BATCHRUN_REQUIRE_REDIS=1 requires it")
        pytest.skip(reason)
    client.flushdb()
    return client


# The longest test files are collected first: under `-n 4` their tests then run beside the many
# short ones rather than last, when the other workers may have nothing left (the last 3 % of one CI
# run took two minutes; the 120,000-line remote test alone takes 80-130 s). Only the order changes.
SLOW_FIRST = ("tests/test_remote.py", "tests/test_cli_batchapi.py", "tests/test_cache_runs.py",
              "tests/test_cache_submit.py", "tests/test_fairshare_fleet.py", "tests/test_endpoints_fleet.py",
              "tests/test_chaos.py", "tests/test_packaging.py", "tests/test_recovery.py", "tests/test_liveness.py",
              "tests/test_remote_edges.py", "tests/test_remote_cap.py", "tests/test_endpoints_days_edges.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:  # (stable: each file keeps its order)
        return next((i for i, path in enumerate(SLOW_FIRST) if item.nodeid.startswith(path)), len(SLOW_FIRST))

    items.sort(key=rank)


@pytest.fixture(params=[
    pytest.param("fake", id="fake"),
    pytest.param("real", id="real", marks=pytest.mark.redis),
])
def redis_client(request):
    """A Redis client with an empty database: fakeredis ("fake") or the real server's test DB ("real")."""
    if request.param == "fake":
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        yield client
        client.close()
        return
    client = _connect_real_redis()
    try:
        yield client
    finally:
        try:
            client.flushdb()
        finally:
            client.close()


@pytest.fixture
def store(redis_client) -> BatchStore:
    return BatchStore(redis_client)


@pytest.fixture
def real_redis_url():
    """The URL of the real Redis test DB (flushed before and after), for tests that start other processes."""
    client = _connect_real_redis()
    try:
        yield REAL_REDIS_URL
    finally:
        try:
            client.flushdb()
        finally:
            client.close()


def request_json(i: int, model: str = "gpt-4o-mini") -> str:
    return json.dumps({"method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "max_tokens": 20,
                                "messages": [{"role": "user", "content": f"Say the number {i}."}]}})


def make_batch(store: BatchStore, batch_id: str, n_jobs: int, shard_size: int = 1000, *,
               model: str = "gpt-4o-mini", prefix: str = "job", **options) -> list[str]:
    """Create batch ``batch_id`` with ``n_jobs`` chat jobs, ``shard_size`` per shard; returns the custom_ids.

    Extra keyword arguments go to ``BatchOptions``. The custom_ids are ``f"{prefix}-{i:05d}"``; job i is in
    shard ``i // shard_size``.
    """
    store.create_batch(batch_id, BatchOptions(shard_size=shard_size, **options))
    cids = [f"{prefix}-{i:05d}" for i in range(n_jobs)]
    items = [(cid, i // shard_size, request_json(i, model)) for i, cid in enumerate(cids)]
    for start in range(0, len(items), 2000):
        store.add_jobs(batch_id, items[start:start + 2000])
    return cids


@pytest.fixture(name="make_batch")
def make_batch_fixture():
    """The ``make_batch(store, batch_id, n_jobs, shard_size=...)`` helper, as a fixture."""
    return make_batch


@pytest.fixture
def mock():
    """A mock OpenAI server that logs what it was sent (point the Python API at it with
    ``tests.helpers.on(mock)``)."""
    from batchrun.mock import MockConfig, MockServerThread

    with MockServerThread(MockConfig(log_requests=True)) as server:
        yield server


@pytest.fixture
def spawn():
    """subprocess.Popen for tests, each process in its own group; whatever is still running when the
    test ends (it failed half way) is killed with its children, so no worker outlives its test."""
    import os
    import signal
    import subprocess

    procs = []

    def start(*args, **kwargs):
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(*args, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


@pytest.fixture(autouse=True)
def _no_stop_left_over():
    """A run interrupted in this process sets the shard runners' STOP flag; a test that starts
    runners itself after it (pytest-xdist orders tests freely) must not find them stopping."""
    shard = sys.modules.get("batchrun.runner.shard")
    if shard is not None:
        shard.STOP.clear()
    yield
    shard = sys.modules.get("batchrun.runner.shard")
    if shard is not None:
        shard.STOP.clear()


@pytest.fixture(autouse=True)
def _own_response_cache(tmp_path_factory, monkeypatch):
    """Each test its own response cache file (BATCHRUN_CACHE_DIR, inherited by the commands it
    starts): answers stored by one test (same bodies, a port the OS gave out again) must not serve
    another, and no test writes into the user's ~/.cache."""
    monkeypatch.setenv("BATCHRUN_CACHE_DIR", str(tmp_path_factory.mktemp("response-cache")))
