"""--via batch-api end to end against the mock's /v1/files and /v1/batches: remote batches made,
polled, collected exactly once; a killed worker reattaches; expired lines finish live; resends
through new remote batches; a full queue waits; cancel cancels upstream; the Python API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest
import redis

import batchrun
from batchrun.mock import MockServerThread
from batchrun.ops.collect import collect
from batchrun.ops.submit import submit_file
from batchrun.remote.client import RemoteClient
from batchrun.remote.runner import RemoteRunner
from batchrun.settings import BatchOptions, WorkerSettings
from batchrun.state.remote_parts import Part, PartState, RemoteParts
from batchrun.state.store import BatchStore
from tests.conftest import REAL_REDIS_URL
from tests.helpers import batchrun_cmd, check_exactly_once, cli_env, read_lines, run_thread_worker, write_jobs

pytestmark = pytest.mark.redis


@pytest.fixture
def real_store(real_redis_url):
    conn = redis.Redis.from_url(real_redis_url)
    yield BatchStore(conn)
    conn.close()


def mock_summary(srv) -> dict:
    with urllib.request.urlopen(srv.base_url.removesuffix("/v1") + "/_mock/batches", timeout=10) as r:
        return json.load(r)


def settings_for(srv) -> WorkerSettings:
    return WorkerSettings(base_url=srv.base_url, api_key="sk-test")


def collected(store, batch_id, tmp_path):
    out, err = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    collect(store, batch_id, str(out), str(err), on_note=lambda s: None)
    return out, err


def test_120000_lines_go_out_as_three_remote_batches_and_come_back_exactly_once(real_store, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 120_000, max_tokens=2)
    with MockServerThread(batch_seconds=0.3) as srv:
        report = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api"))
        run_thread_worker(real_store.redis, settings_for(srv), timeout=600)
        summary, live = mock_summary(srv), srv.stats()["requests"]
    assert summary["created"] == 3 and sorted(summary["batches"].values()) == ["completed"] * 3
    assert live == 0  # nothing went live
    parts = RemoteParts(real_store.redis).parts(report.batch_id)
    assert [p.size for p in parts] == [50_000, 50_000, 20_000] and all(p.state is PartState.DONE for p in parts)
    meta = real_store.meta(report.batch_id)
    assert (meta["state"], meta["done"], meta["failed"]) == ("finished", "120000", "0")
    assert float(meta["cost"]) > 0
    out, err = collected(real_store, report.batch_id, tmp_path)
    results = read_lines(out)
    ids = [r["custom_id"] for r in results]
    assert len(ids) == len(set(ids)) == 120_000 and not read_lines(err)


def test_a_killed_worker_reattaches_without_creating_new_remote_batches(spawn, real_redis_url, tmp_path):
    jobs = write_jobs(tmp_path / "a.jsonl", 120, model="gpt-4o-mini")
    more = write_jobs(tmp_path / "b.jsonl", 80, model="gpt-4o", prefix="other")
    both = tmp_path / "jobs.jsonl"
    both.write_text(jobs.read_text() + more.read_text())
    conn = redis.Redis.from_url(real_redis_url)
    with MockServerThread(batch_seconds=8) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test",
                      BATCHRUN_REMOTE_LOCK_SECONDS="3")
        out = subprocess.run(batchrun_cmd("submit", str(both), "--via", "batch-api"), env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        batch_id = out.stdout.split()[-1]
        doomed = spawn(batchrun_cmd("-q", "worker"), env=env)
        deadline = time.monotonic() + 60
        while mock_summary(srv)["created"] < 2:
            assert time.monotonic() < deadline, "the worker created no remote batches"
            time.sleep(0.1)
        time.sleep(0.5)  # (the runner records the second batch's id)
        os.killpg(doomed.pid, signal.SIGKILL)  # worker and work horse: a lost machine
        doomed.wait()
        status = subprocess.run(batchrun_cmd("status", batch_id), env=env, capture_output=True, text=True, timeout=60)
        assert "remote batches (Batch API): 2" in status.stdout and "running batch_" in status.stdout, status.stdout
        survivor = subprocess.run(batchrun_cmd("-q", "worker", "--burst"), env=env, timeout=180, capture_output=True)
        assert survivor.returncode == 0, survivor.stderr
        summary = mock_summary(srv)
    assert summary["created"] == 2  # reattached: the same two remote batches, none created again
    assert conn.hget(f"batchrun:batch:{batch_id}", "state") == b"finished"
    r, e = tmp_path / "r.jsonl", tmp_path / "e.jsonl"
    subprocess.run(batchrun_cmd("collect", batch_id, "-o", str(r), "--errors", str(e)), env=env, check=True,
                   capture_output=True, timeout=60)
    assert not check_exactly_once(both, r, e)[1]


def test_an_expired_remote_batchs_lines_finish_live_each_for_one_attempt(real_store, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 200)
    with MockServerThread(batch_seconds=0.5, batch_expire_fraction=0.25) as srv:
        report = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api"))
        run_thread_worker(real_store.redis, settings_for(srv), timeout=120)
        summary, live = mock_summary(srv), srv.stats()["requests"]
    assert summary["created"] == 1 and list(summary["batches"].values()) == ["expired"]
    assert live == 150  # the 150 the remote batch did not run, each sent once, live
    meta = real_store.meta(report.batch_id)
    assert (meta["state"], meta["done"], meta["retries"]) == ("finished", "200", "150")
    out, err = collected(real_store, report.batch_id, tmp_path)
    assert not check_exactly_once(jobs, out, err)[1]
    resent = [cid for cid in real_store.redis.hkeys(f"batchrun:batch:{report.batch_id}:attempts")]
    assert len(resent) == 150


def test_resend_via_batch_api_puts_failed_lines_in_a_new_remote_batch(real_store, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 100)
    with MockServerThread(batch_seconds=0.3, batch_error_rate=0.3, seed=1) as srv:
        options = BatchOptions(via="batch-api", resend_via="batch-api", max_attempts=20)
        report = submit_file(real_store, str(jobs), options=options)
        run_thread_worker(real_store.redis, settings_for(srv), timeout=180)
        summary, live = mock_summary(srv), srv.stats()["requests"]
    assert summary["created"] >= 2 and live == 0  # the 500s went again through the Batch API, never live
    parts = RemoteParts(real_store.redis).parts(report.batch_id)
    assert parts[0].size == 100 and all(p.resend for p in parts[1:])
    out, err = collected(real_store, report.batch_id, tmp_path)
    assert not check_exactly_once(jobs, out, err)[1]


def test_a_full_queue_holds_the_next_files_back_until_capacity_frees(real_store, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 150)
    with MockServerThread(batch_seconds=1.0, batch_queue_tokens=2500) as srv:  # about one part of 50 at a time
        report = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api"))
        client = RemoteClient(srv.base_url, "sk-test")
        runner = RemoteRunner(real_store, report.batch_id, client, max_seconds=120, poll_cap=0.5, max_requests=50)
        assert runner.run()["again"] is False
        summary = mock_summary(srv)
    parts = RemoteParts(real_store.redis).parts(report.batch_id)
    assert len(parts) == 3 and all(p.state is PartState.DONE for p in parts)
    assert sum(p.holds for p in parts) >= 1  # at least one file waited for the queue
    assert "failed" in summary["batches"].values()  # (the upstream refused it while full)
    meta = real_store.meta(report.batch_id)
    assert (meta["state"], meta["done"], meta["failed"]) == ("finished", "150", "0")


def test_a_create_sent_before_a_crash_is_found_by_its_metadata_not_sent_again(real_store, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 30)
    with MockServerThread(batch_seconds=0.3) as srv:
        report = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api"))
        bid = report.batch_id
        client = RemoteClient(srv.base_url, "sk-test")
        first = RemoteRunner(real_store, bid, client, max_seconds=0)
        parts = RemoteParts(real_store.redis)
        assert parts.lock(bid, first.token, 10_000)
        first.plan(real_store.meta(bid))
        [part] = parts.parts(bid)
        part.file_id = client.upload("x.jsonl", b"".join(
            _line(cid, raw) for cid, raw in zip(parts.ids(bid, 0), real_store.redis.hmget(
                f"batchrun:batch:{bid}:req", parts.ids(bid, 0)))))
        client.create(part.file_id, part.url, {"batchrun_batch": bid, "batchrun_part": "0"})  # sent, then died
        part.state = PartState.CREATING
        assert parts.save(bid, first.token, [part])
        parts.unlock(bid, first.token)
        RemoteRunner(real_store, bid, client, max_seconds=60, poll_cap=0.3).run()
        assert mock_summary(srv)["created"] == 1
    assert real_store.meta(bid)["done"] == "30"


def _line(cid, raw):
    from batchrun.remote.collect import input_line
    return input_line(cid, raw)


def test_a_stale_runner_cannot_overwrite_what_the_lock_holder_keeps(real_store):
    parts = RemoteParts(real_store.redis)
    real_store.create_batch("b1", BatchOptions(via="batch-api"))
    assert parts.lock("b1", "new", 5000) and not parts.lock("b1", "old", 5000)
    assert not parts.save("b1", "old", [Part(0, "/v1/chat/completions", "m", 1, PartState.RUNNING, remote_id="x")])
    assert parts.parts("b1") == []


def test_the_python_api_runs_through_the_batch_api():
    requests = [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 5}
                for i in range(20)]
    with MockServerThread(batch_seconds=0.3) as srv:
        results = batchrun.run(requests, via="batch-api", base_url=srv.base_url, api_key="sk-test",
                               progress=False, redis_url=REAL_REDIS_URL)
        summary, live = mock_summary(srv), srv.stats()["requests"]
    redis.Redis.from_url(REAL_REDIS_URL).flushdb()
    assert [r.ok for r in results] == [True] * 20 and summary["created"] == 1 and live == 0
    assert all(r.text.startswith("mock:") for r in results)


def test_a_batch_cancelled_before_its_runner_started_ends_the_runner_at_once(real_store, tmp_path):
    from batchrun.state.states import BatchState

    jobs = write_jobs(tmp_path / "jobs.jsonl", 10)
    with MockServerThread() as srv:
        report = submit_file(real_store, str(jobs), options=BatchOptions(via="batch-api"))
        real_store.set_state(report.batch_id, BatchState.CANCELLED, "cancelled by the user")
        started = time.monotonic()
        out = RemoteRunner(real_store, report.batch_id, RemoteClient(srv.base_url, "k"), max_seconds=30).run()
        assert out["again"] is False and time.monotonic() - started < 10
        assert mock_summary(srv)["created"] == 0
