"""A new batch loaded while it sends (`run` on the in-process Redis) starts with a small shard: the
first request waits for FIRST_SHARD_JOBS jobs to land, not for a whole shard of up to 10,000."""

from __future__ import annotations

import pytest

from batchrun.mock import MockConfig, MockServerThread
from batchrun.ops.collect import collect
from batchrun.ops.submit import FIRST_SHARD_JOBS, submit_file
from batchrun.settings import BatchOptions, WorkerSettings
from batchrun.state import keys
from tests.helpers import check_exactly_once, run_thread_worker, write_jobs


def shard_sizes(store, bid: str) -> list[int]:
    shards = int(store.meta(bid)["shards"])
    return [store.redis.zcard(keys.todo(bid, s)) for s in range(shards)]


def test_the_first_shard_is_small_and_ready_before_the_file_has_loaded(store, tmp_path):
    n = 4 * 1000 + 300
    jobs = write_jobs(tmp_path / "jobs.jsonl", n)
    at_start: list[tuple[int, list[int]]] = []

    def started(bid: str) -> None:
        at_start.append((store.redis.hlen(keys.sub(bid, "req")), shard_sizes(store, bid)))

    rep = submit_file(store, str(jobs), options=BatchOptions(shard_size=1000), on_loading=started)
    loaded, sizes = at_start[0]
    assert sizes[0] == FIRST_SHARD_JOBS < 1000  # the first shard alone had landed
    assert loaded < n
    # Then shards of the batch's size; the last one short. Every job in exactly one.
    assert shard_sizes(store, rep.batch_id) == [FIRST_SHARD_JOBS, 1000, 1000, 1000, n - FIRST_SHARD_JOBS - 3000]


def test_without_early_sending_every_shard_has_the_batch_size(store, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 2500)
    rep = submit_file(store, str(jobs), options=BatchOptions(shard_size=1000))
    assert shard_sizes(store, rep.batch_id) == [1000, 1000, 500]


@pytest.mark.parametrize("lines, shard_size", [(FIRST_SHARD_JOBS, 1000), (FIRST_SHARD_JOBS + 1, 1000),
                                               (1000, 1000), (1501, 1000), (1200, 700)])
def test_every_job_is_sent_once_whatever_the_sizes(store, tmp_path, lines, shard_size):
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    with MockServerThread(MockConfig()) as srv:
        settings = WorkerSettings(base_url=srv.base_url, api_key="sk-test", concurrency=50)
        rep = submit_file(store, str(jobs), options=BatchOptions(shard_size=shard_size), on_loading=lambda bid: None)
        assert sum(shard_sizes(store, rep.batch_id)) == lines
        run_thread_worker(store.redis, settings)
        assert store.meta(rep.batch_id)["state"] == "finished"
        assert srv.stats()["requests"] == lines
    out, err = tmp_path / "r.jsonl", tmp_path / "e.jsonl"
    assert collect(store, rep.batch_id, str(out), str(err)).finished
    _, errors = check_exactly_once(jobs, out, err)
    assert not errors
