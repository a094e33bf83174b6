"""The chaos benchmark, shortened for CI: workers killed at random and a Redis restart mid-batch.

`bench/chaos.py` is the full version (5 runs of 3,000 jobs); this is one run of 400.
"""

from __future__ import annotations

import shutil
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))

pytestmark = [pytest.mark.redis,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to start one")]


def test_kills_and_a_redis_restart_lose_and_double_nothing():
    import chaos

    r = chaos.run_once(n_jobs=400, workers=3, kill_every=2.0, seed=11)  # its redis-server on a spare port
    # Each kill took the work horse too, when the worker had one (checked gone by kill_machine).
    assert r["redis_restarts"] == 1 and r["kills"] >= 1 and r["horses_killed"] >= 1, r
    assert r["missing"] == 0 and r["lines"] == r["distinct"] == 400, r
    assert r["errors"] == 0 and r["mismatched"] == 0, r


def test_a_lost_machine_is_the_worker_and_its_work_horse_and_both_are_gone(spawn, real_redis_url, tmp_path):
    """RQ puts the horse in a process group of its own: killing the worker's group would leave it."""
    import os
    import subprocess
    import time

    import chaos
    import redis

    from batchrun.mock import MockConfig, MockServerThread
    from tests.helpers import batchrun_cmd, cli_env, write_jobs

    jobs = write_jobs(tmp_path / "jobs.jsonl", 300)
    conn = redis.Redis.from_url(real_redis_url)
    with MockServerThread(MockConfig(latency_ms=200)) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
        sub = subprocess.run(batchrun_cmd("-q", "submit", str(jobs)), env=env, capture_output=True, text=True,
                             timeout=60)
        batch_id = sub.stdout.split()[-1]
        worker = spawn(batchrun_cmd("-q", "worker", "--concurrency", "5"), env=env)
        deadline = time.monotonic() + 60
        while int(conn.hget(f"batchrun:batch:{batch_id}", "done") or 0) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [horse] = chaos.descendants(worker.pid)
        assert os.getpgid(horse) != os.getpgid(worker.pid)
        killed = chaos.kill_machine(worker)
        assert killed == [worker.pid, horse]
        assert not chaos.alive(worker.pid) and not chaos.alive(horse)
        done = int(conn.hget(f"batchrun:batch:{batch_id}", "done"))
        time.sleep(1.0)
        assert int(conn.hget(f"batchrun:batch:{batch_id}", "done")) == done, "nothing finishes jobs any more"
