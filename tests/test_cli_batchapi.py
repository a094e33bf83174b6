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


def test_estimate_via_the_batch_api_names_the_models_it_could_not_price(tmp_path):
    # The live cost line said "(without my-llama: no price known)"; the Batch API line beside it
    # gave the same partial sum as if it were the whole file's.
    priced = write_jobs(tmp_path / "a.jsonl", 3, max_tokens=100)
    unpriced = write_jobs(tmp_path / "b.jsonl", 3, max_tokens=100, model="my-llama", prefix="llama")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(priced.read_text() + unpriced.read_text())
    text = _cli(["estimate", str(jobs), "--via", "batch-api", "--no-cache"], cli_env())
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if x.startswith("via the Batch API:"))
    assert "without my-llama: no price known" in line, line


def _run_auto(srv, jobs, out, deadline, *extra):
    """`run --via auto`; returns it and the seconds from the batch's creation (the deadline counts
    from there: the line naming the batch is printed as it is made) to the run's end."""
    env = cli_env(OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
    proc = subprocess.Popen(batchrun_cmd("run", str(jobs), "-o", str(out), "--via", "auto", "--deadline", deadline,
                                         "--rpm", "600", *extra), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    started, made, lines = time.monotonic(), None, []
    for line in proc.stderr:
        if made is None and " job(s) on " in line:
            made = time.monotonic()
        lines.append(line)
    stdout = proc.stdout.read()
    proc.wait(timeout=300)
    took = time.monotonic() - (made or started)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(lines)), took


def test_via_auto_sends_live_what_the_budget_carries_by_the_deadline_and_the_rest_remote(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 800)
    out = tmp_path / "out.jsonl"
    with MockServerThread(rpm=600, batch_seconds=3) as srv:
        done, took = _run_auto(srv, jobs, out, "45s")
        live, summary = srv.stats()["requests"], _summary(srv)
    assert done.returncode == 0, done.stderr
    # (+5 s: the live budget's ramp-up on 2 shared, loaded cores; bench/batch_split.py measures it quiet)
    assert took < 45 + 5, f"the batch took {took:.0f} s, past its 45 s deadline"
    # 600 RPM for the time left at the split (under 45 s), with 0.6 headroom: at most 270 live
    assert 50 <= live <= 270 and summary["created"] == 1
    assert f"{live} job(s) live by the deadline" in done.stderr and f"{800 - live} through the Batch API" in done.stderr
    assert not check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")[1]


def test_via_auto_moves_a_late_remote_batchs_lines_to_live(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 300)
    out = tmp_path / "out.jsonl"
    with MockServerThread(rpm=6000, batch_seconds=120) as srv:  # the remote batch would take 2 minutes
        done, took = _run_auto(srv, jobs, out, "40s")  # (long enough that the remote batch is made before it is late)
        live, summary = srv.stats()["requests"], _summary(srv)
    assert done.returncode == 0, done.stderr
    assert summary["cancels"] == 1 and list(summary["batches"].values()) == ["cancelled"]
    assert "late for the deadline: cancelled upstream" in done.stderr
    assert live > 150  # the live share and the late batch's unfinished lines
    assert not check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")[1]


def test_via_auto_needs_a_deadline_and_a_deadline_needs_auto(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    env = cli_env(BATCHRUN_REDIS_URL="redis://127.0.0.1:1/0")
    no_deadline = _cli(["submit", str(jobs), "--via", "auto"], env)
    assert no_deadline.returncode == 2 and "--via auto needs --deadline DURATION" in no_deadline.stderr
    stray = _cli(["submit", str(jobs), "--deadline", "6h"], env)
    assert stray.returncode == 2 and "--deadline applies to --via auto only" in stray.stderr
    bad = _cli(["submit", str(jobs), "--via", "auto", "--deadline", "soon"], env)
    assert bad.returncode == 2 and "'soon' is not a duration" in bad.stderr
