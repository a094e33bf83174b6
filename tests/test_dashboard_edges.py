"""Edges of the dashboard and /metrics found in review: a Redis that goes away while the page is
open, a Redis holding very many active batches, and the rendered progress itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from dashboard_helpers import get
from helpers import ROOT, batchrun_cmd, cli_env, spare_port, write_jobs


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to start one")
def test_a_redis_that_goes_away_is_a_sentence_on_every_route_and_no_traceback(spawn, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from chaos import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        env = cli_env(BATCHRUN_REDIS_URL=server.url, OPENAI_API_KEY="sk-test")
        jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
        assert subprocess.run(batchrun_cmd("submit", str(jobs), "--batch-id", "gone"), env=env,
                              capture_output=True, timeout=60).returncode == 0
        port = spare_port()
        dash = spawn(batchrun_cmd("dashboard", "--port", str(port)), env=env, stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE, text=True)
        assert "dashboard of" in dash.stderr.readline()
        assert get(port, "/api/overview")[0] == 200
        server.kill()
        time.sleep(1.5)  # past the snapshot the dashboard keeps for a second
        for path in ("/api/overview", "/api/batch/gone", "/metrics"):
            code, body = get(port, path)
            assert code == 503 and "cannot read Redis" in body and "Server got itself in trouble" not in body, body
        server.start()  # back: the page carries on (once the failure kept for a second is past)
        time.sleep(1.5)
        assert get(port, "/api/overview")[0] == 200 and get(port, "/metrics")[0] == 200
    finally:
        server.kill()
    dash.terminate()
    err = dash.communicate(timeout=30)[1]
    assert "Traceback" not in err and "cannot read Redis" in err, err[-3000:]


def test_worker_metrics_on_a_redis_gone_answer_503_with_a_sentence(capfd):
    from batchrun.dashboard.prometheus import serve_metrics
    from batchrun.state.connections import connect
    from batchrun.state.store import BatchStore

    dead = spare_port()  # nothing listens there
    server = serve_metrics(BatchStore(connect(f"redis://127.0.0.1:{dead}/0")), "127.0.0.1", 0)
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/metrics")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=60)
        assert info.value.code == 503 and "cannot read Redis" in info.value.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" not in capfd.readouterr().err



@pytest.mark.redis
def test_very_many_active_batches_keep_each_refresh_and_scrape_bounded(real_redis_url):
    """Thousands of batches waiting for workers made every poll read each one (minutes per refresh,
    megabytes of JSON) and /metrics too slow for a scrape: both now take the newest ones only and say
    how many more there are."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from batchrun.dashboard import prometheus, snapshot
    from batchrun.dashboard.snapshot import Dashboard
    from batchrun.settings import BatchOptions
    from batchrun.state.connections import connect
    from batchrun.state.store import BatchStore

    store = BatchStore(connect(real_redis_url))
    n = snapshot.RECENT_BATCHES + snapshot.MAX_ACTIVE_ROWS + 40
    for i in range(n):
        store.create_batch(f"many-{i:04d}", BatchOptions())
        store.redis.zadd("batchrun:batches", {f"many-{i:04d}": 1_000_000 + i})  # created one after another
    over = Dashboard(store).overview()
    shown = [b["batch_id"] for b in over["batches"]]
    assert len(shown) == snapshot.RECENT_BATCHES + snapshot.MAX_ACTIVE_ROWS
    assert over["batches_not_shown"] == 40
    assert shown[0] == f"many-{n - 1:04d}" and "many-0000" not in shown  # the newest first, the oldest left out
    text = generate_latest(prometheus.fleet_registry(store)).decode()
    series = {s.labels["batch"] for f in text_string_to_metric_families(text) if f.name == "batchrun_jobs"
              for s in f.samples}
    assert len(series) <= prometheus.PER_BATCH + prometheus.MAX_ACTIVE_SERIES and f"many-{n - 1:04d}" in series


def _raw_status(port: int, request: bytes) -> bytes:
    """The status line the dashboard answers ``request`` (raw bytes, as a hostile client sends them)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n")[0]


@pytest.mark.redis
def test_the_token_header_any_case_scheme_and_bytes_that_are_not_utf8(real_redis_url, spawn):
    token = "s3cret-token-for-the-tests"
    port = spare_port()
    dash = spawn(batchrun_cmd("dashboard", "--port", str(port)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 text=True, env=cli_env(BATCHRUN_REDIS_URL=real_redis_url, BATCHRUN_DASHBOARD_TOKEN=token))
    assert "dashboard of" in dash.stderr.readline()
    # RFC 7235: the scheme is case-insensitive ("bearer" from curl or a proxy is the same thing)
    assert get(port, "/api/overview", headers={"Authorization": "bearer " + token})[0] == 200
    assert get(port, "/api/overview", headers={"Authorization": "BEARER  " + token})[0] == 401  # not the token
    # A header of bytes that are not UTF-8 is a wrong token (401), not a 500 and a traceback in the log
    hostile = b"GET /api/overview HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xc3\r\nConnection: close\r\n\r\n"
    assert _raw_status(port, hostile) == b"HTTP/1.1 401 Unauthorized"
    dash.terminate()
    err = dash.communicate(timeout=30)[1]
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.redis
def test_errors_counted_from_part_of_a_long_batch_say_how_many_outcomes_were_not_read(real_redis_url):
    """A dashboard started late in a long batch reads only its last outcomes: the counts it shows
    then fall short of `status`, and the JSON (and page) must say by how much, not look complete."""
    import json

    from batchrun.dashboard import errors
    from batchrun.dashboard.snapshot import Dashboard
    from batchrun.settings import BatchOptions
    from batchrun.state import keys
    from batchrun.state.connections import connect
    from batchrun.state.store import BatchStore

    store = BatchStore(connect(real_redis_url))
    store.create_batch("long", BatchOptions())
    line = json.dumps({"custom_id": "x", "error": {"code": "server_error", "message": "boom"}})
    store.redis.rpush(keys.sub("long", "results"), *(["E" + line] * (errors.FIRST_LOOK + 500)))
    dash = Dashboard(store)
    page = dash.batch_page("long")
    assert [e["count"] for e in page["errors"]] == [errors.FIRST_LOOK]
    assert page["errors_not_read"] == 500
    over = dash.overview()
    assert over["errors_not_read"] == {"long": 500}


@pytest.mark.redis
def test_errors_of_a_purged_batch_leave_the_overview(real_redis_url):
    """The tally kept every batch it had ever read: a purged batch's errors stayed on the overview
    (linking to a page that is gone), and a dashboard left open for months grew with every batch."""
    import json

    from batchrun.dashboard.snapshot import Dashboard
    from batchrun.settings import BatchOptions
    from batchrun.state import keys
    from batchrun.state.connections import connect
    from batchrun.state.store import BatchStore

    store = BatchStore(connect(real_redis_url))
    line = json.dumps({"custom_id": "x", "error": {"code": "server_error", "message": "boom"}})
    for batch_id in ("old", "new"):
        store.create_batch(batch_id, BatchOptions())
        store.redis.rpush(keys.sub(batch_id, "results"), "E" + line, "E" + line)
    dash = Dashboard(store)
    assert dash.overview()["errors"][0]["batches"] == {"old": 2, "new": 2}
    store.purge("old")
    [group] = dash.overview()["errors"]
    assert group["batches"] == {"new": 2} and group["count"] == 2
    assert set(dash.errors._read) == {"new"}


def test_requests_queued_behind_a_failed_refresh_share_its_failure():
    """A Redis that hangs makes a refresh wait its socket timeout (30 s) and fail: every poll queued
    behind it (a page polls every 2 s) used to wait its own 30 s in turn, a backlog growing for as
    long as Redis hung. They now get the same failure as soon as it comes."""
    import asyncio

    import redis

    from batchrun.dashboard.app import Snapshots

    calls = []

    def make():
        calls.append(1)
        raise redis.TimeoutError("Timeout reading from socket")

    async def main():
        snapshots = Snapshots(dashboard=None)
        return await asyncio.gather(*(snapshots.get("overview", make) for _ in range(5)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, redis.TimeoutError) for r in results) and len(calls) == 1
