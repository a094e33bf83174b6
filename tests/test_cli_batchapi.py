"""The `batchrun` command with --via batch-api: run --mock, submit + worker + status + cancel
(cancelled upstream), and the options refused before anything is written."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import pytest
import redis

from batchrun.mock import MockServerThread
from tests.helpers import batchrun_cmd, check_exactly_once, cli_env, write_jobs


def _cli(args, env, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


def _summary(srv) -> dict:
    with urllib.request.urlopen(srv.base_url.removesuffix("/v1") + "/_mock/batches", timeout=10) as r:
        return json.load(r)


def test_run_via_the_batch_api_on_the_built_in_mock(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 60)
    out = tmp_path / "out.jsonl"
    done = _cli(["run", str(jobs), "-o", str(out), "--mock", "--via", "batch-api"], cli_env())
    assert done.returncode == 0, done.stderr
    assert "60 result(s) written" in done.stdout
    assert "in 1 new remote batch" in done.stderr and "completed: 60 result(s)" in done.stderr
    assert not check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")[1]


@pytest.mark.parametrize("args, words", [
    (["--via", "batch"], "Invalid value for '--via'"),
    (["--resend-via", "later"], "Invalid value for '--resend-via'"),
])
def test_a_wrong_via_is_refused_naming_the_option(tmp_path, args, words):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    done = _cli(["submit", str(jobs), *args], cli_env(BATCHRUN_REDIS_URL="redis://127.0.0.1:1/0"))
    assert done.returncode == 2 and words in done.stderr


@pytest.mark.redis
def test_a_batch_keeps_its_via(real_redis_url, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    assert _cli(["submit", str(jobs), "--batch-id", "b1", "--via", "batch-api"], env).returncode == 0
    again = _cli(["submit", str(jobs), "--batch-id", "b1", "--via", "live"], env)
    assert again.returncode == 2 and "--via live (it has batch-api)" in again.stderr


@pytest.mark.redis
def test_cancel_cancels_the_remote_batches_upstream_and_keeps_what_they_finished(spawn, real_redis_url, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 100)
    conn = redis.Redis.from_url(real_redis_url)
    with MockServerThread(batch_seconds=30) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
        submitted = _cli(["submit", str(jobs), "--via", "batch-api"], env)
        assert submitted.returncode == 0, submitted.stderr
        batch_id = submitted.stdout.split()[-1]
        worker = spawn(batchrun_cmd("-q", "worker"), env=env)
        deadline = time.monotonic() + 60
        while "in_progress" not in _summary(srv)["batches"].values():
            assert time.monotonic() < deadline, "no remote batch got in progress"
            time.sleep(0.2)
        time.sleep(6)  # about a fifth of its lines done upstream
        cancelled = _cli(["cancel", batch_id], env)
        assert cancelled.returncode == 0, cancelled.stderr
        assert "1 remote batch(es) at the Batch API are being cancelled" in cancelled.stdout
        while list(_summary(srv)["batches"].values()) != ["cancelled"]:
            assert time.monotonic() < deadline + 60, "the remote batch was not cancelled upstream"
            time.sleep(0.2)
        while conn.zcard(f"batchrun:batch:{batch_id}:leases"):  # the lines it had not run are let go
            assert time.monotonic() < deadline + 90, "the cancelled remote batch's leases stay"
            time.sleep(0.2)
        status = _cli(["status", batch_id], env)
        worker.terminate()
        worker.wait(timeout=60)
        summary, live = _summary(srv), srv.stats()["requests"]
    assert summary["cancels"] == 1 and summary["created"] == 1
    assert "cancelled" in status.stdout and "remote batches (Batch API): 1" in status.stdout
    done = int(conn.hget(f"batchrun:batch:{batch_id}", "done"))
    assert 0 < done < 100  # what ran before the cancel is kept, the rest never sent
    assert live == 0


def test_estimate_via_the_batch_api_shows_both_prices(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 1000, max_tokens=100)
    text = _cli(["estimate", str(jobs), "--via", "batch-api", "--typical-output", "50"], cli_env())
    assert text.returncode == 0, text.stderr
    assert "cost            $0.0336 (typical) to $0.0636" in text.stdout  # live, shipped gpt-4o-mini
    assert "via the Batch API: $0.0168 to $0.0318 (50% of the live $0.0336 to $0.0636" in text.stdout
    data = json.loads(_cli(["estimate", str(jobs), "--via", "batch-api", "--json"], cli_env()).stdout)
    total = data["total"]
    assert data["batch_api"]["cost_high_usd"] == pytest.approx(total["cost_high_usd"] / 2)
    assert data["batch_api"]["live_cost_low_usd"] == total["cost_low_usd"]
    plain = _cli(["estimate", str(jobs)], cli_env())
    assert "Batch API" not in plain.stdout
