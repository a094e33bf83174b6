"""Sending while the file loads (submit_file's on_loading, what `batchrun run` uses on the
in-process Redis): no job is lost or sent twice, and the batch does not finish early."""

from __future__ import annotations

import pytest

import asyncio
import threading

from batchrun.mock import MockConfig, MockServerThread
from batchrun.ops.collect import collect
from batchrun.ops.submit import submit_file
from batchrun.runner.shard import ShardRunner
from batchrun.settings import BatchOptions, WorkerSettings
from batchrun.state import keys
from batchrun.state.store import BatchStore
from tests.helpers import check_exactly_once, run_thread_worker, write_jobs

N, SHARD = 470, 50  # chunks of 100 jobs while loading early: 5 chunks, 10 shards, the last one short


def settings_for(server) -> WorkerSettings:
    return WorkerSettings(base_url=server.base_url, api_key="sk-test", concurrency=20)


def collect_once(store: BatchStore, bid: str, jobs, tmp_path) -> None:
    out, err = tmp_path / "r.jsonl", tmp_path / "e.jsonl"
    assert collect(store, bid, str(out), str(err)).finished
    _, errors = check_exactly_once(jobs, out, err)
    assert not errors


def test_shards_that_end_while_the_file_loads_do_not_finish_the_batch(store: BatchStore, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", N)
    seen: list[tuple[int, str]] = []
    with MockServerThread(MockConfig()) as srv:
        settings = settings_for(srv)

        def run_ready_shards(bid: str) -> None:
            # The first chunk has landed: run its shards to their end before the rest loads.
            loaded = store.redis.hlen(keys.sub(bid, "req"))
            for shard in range(loaded // SHARD):
                asyncio.run(ShardRunner(store, bid, shard, settings).run())
            seen.append((loaded, store.meta(bid)["state"]))

        rep = submit_file(store, str(jobs), options=BatchOptions(shard_size=SHARD), on_loading=run_ready_shards)
        assert len(seen) == 1 and 0 < seen[0][0] < N  # called early, once
        assert seen[0][1] == "running"  # every job landed so far is done, and the batch goes on
        assert rep.total == N and int(store.meta(rep.batch_id)["total"]) == N  # the reservation is gone
        run_thread_worker(store.redis, settings)
        assert srv.stats()["requests"] == N  # nothing sent twice
    collect_once(store, rep.batch_id, jobs, tmp_path)


def test_a_worker_sending_during_the_load_sends_every_job_once(store: BatchStore, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", N)
    worker: list[threading.Thread] = []
    loaded_at_start: list[int] = []
    with MockServerThread(MockConfig()) as srv:
        def start(bid: str) -> None:
            loaded_at_start.append(store.redis.hlen(keys.sub(bid, "req")))
            t = threading.Thread(target=run_thread_worker, args=(store.redis, settings_for(srv), 60), daemon=True)
            t.start()
            worker.append(t)

        rep = submit_file(store, str(jobs), options=BatchOptions(shard_size=SHARD), on_loading=start)
        worker[0].join(120)
        assert not worker[0].is_alive()
        assert loaded_at_start[0] < N  # it started before the file was loaded
        assert store.meta(rep.batch_id)["state"] == "finished"
        assert srv.stats()["requests"] == N
    collect_once(store, rep.batch_id, jobs, tmp_path)


def test_a_batch_that_exists_is_loaded_first(store: BatchStore, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 120)
    first = submit_file(store, str(jobs), batch_id="b", options=BatchOptions(shard_size=SHARD))
    more = write_jobs(tmp_path / "more.jsonl", 240)
    called: list[str] = []
    again = submit_file(store, str(more), batch_id="b", on_loading=called.append)
    assert not called  # its workers start after the submit, as without on_loading
    assert (first.total, again.total) == (120, 240)


def test_a_short_last_shard_whose_jobs_end_a_full_chunk_is_enqueued(store: BatchStore, tmp_path):
    # 300 jobs in chunks of 100 (shard_size // 2): the last chunk is full and ends inside shard 1,
    # which has only 100 jobs. (A 1,500-line file with the default shard size, 1,000 in chunks of
    # 500, is such a file: `batchrun run` waited for its last 500 jobs for ever.)
    jobs = write_jobs(tmp_path / "jobs.jsonl", 300)
    with MockServerThread(MockConfig()) as srv:
        rep = submit_file(store, str(jobs), options=BatchOptions(shard_size=200), on_loading=lambda bid: None)
        run_thread_worker(store.redis, settings_for(srv), 30)
        assert store.meta(rep.batch_id)["state"] == "finished"
        assert srv.stats()["requests"] == 300
    collect_once(store, rep.batch_id, jobs, tmp_path)


@pytest.mark.parametrize("lines, shard_size", [(1, 1), (7, 3), (10, 5), (11, 5), (199, 200), (400, 200),
                                               (401, 200), (550, 100), (3, 1000), (300, 200), (600, 400),
                                               (1500, 1000)])
def test_every_shard_is_run_whatever_the_file_and_shard_sizes(store: BatchStore, tmp_path, lines, shard_size):
    # Chunks, shards and a short or full last shard line up differently for each pair: none may be
    # left unqueued (a batch that never finishes).
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    with MockServerThread(MockConfig()) as srv:
        rep = submit_file(store, str(jobs), options=BatchOptions(shard_size=shard_size), on_loading=lambda bid: None)
        run_thread_worker(store.redis, settings_for(srv), 30)
        assert store.meta(rep.batch_id)["state"] == "finished"
        assert srv.stats()["requests"] == lines
    collect_once(store, rep.batch_id, jobs, tmp_path)


def test_a_sigterm_before_the_first_job_is_sent_exits_130(tmp_path):
    """Before the first shard has its jobs (the file is still being validated) nothing was sent:
    `run` says so and exits 130 as after any interrupt (it printed click's "Aborted!" and exited 1)."""
    import os
    import signal
    import subprocess

    from tests.helpers import batchrun_cmd, cli_env, wait_until_catching

    # Seconds of validation before the first shard (of 500 jobs, which lands in ~0.03 s after it).
    jobs = write_jobs(tmp_path / "jobs.jsonl", 200_000)
    with MockServerThread(MockConfig()) as srv:
        env = cli_env(OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test", BATCHRUN_REDIS_URL="")
        env.pop("BATCHRUN_REDIS_URL")
        proc = subprocess.Popen(batchrun_cmd("run", str(jobs), "-o", str(tmp_path / "out.jsonl")), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until_catching(proc, signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert srv.stats()["requests"] == 0, "the signal came too late for this test"
    assert proc.returncode == 130, stderr
    assert "no job was sent" in stderr and "Aborted" not in stderr, stderr
    assert not os.path.exists(tmp_path / "out.batchrun.json")
