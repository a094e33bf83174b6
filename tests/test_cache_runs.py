"""The response cache and in-batch dedupe end to end: the real `batchrun` command in subprocesses,
on the zero-setup default (the cache file) and on a real Redis (the fleet's cache), counting what
the server was sent."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from batchrun.mock import MockConfig, MockServerThread
from batchrun.policy.cache_entries import cache_key
from tests.helpers import batchrun_cmd, check_exactly_once, cli_env, read_lines, write_jobs
from tests.hostile import HostileServer, Reply, ok


def _env(server, **extra) -> dict:
    env = cli_env(OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-test", **extra)
    if "BATCHRUN_REDIS_URL" not in extra:
        env.pop("BATCHRUN_REDIS_URL", None)
    return env


def _cli(args, env, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


def _bodies(path: Path) -> dict[str, dict]:
    return {r["custom_id"]: r["response"]["body"] for r in read_lines(path)}


def write_repeated_jobs(path: Path, n: int, distinct: int, **extra_fields) -> Path:
    """``n`` lines whose bodies cycle through ``distinct`` different ones."""
    with open(path, "w") as f:
        for i in range(n):
            body = {"model": "gpt-4o-mini", "max_tokens": 20,
                    "messages": [{"role": "user", "content": f"Tell me one fact about the number {i % distinct}."}]}
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body, **extra_fields}) + "\n")
    return path


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def where(request):
    """Extra environment: none (the in-process Redis, the cache file) or a real Redis."""
    if request.param == "memory":
        return {}
    return {"BATCHRUN_REDIS_URL": request.getfixturevalue("real_redis_url")}


def test_a_file_run_twice_to_a_new_output_sends_nothing_the_second_time(where, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 30)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv, **where)
        one = _cli(["run", str(jobs), "-o", str(first)], env)
        assert one.returncode == 0, one.stderr
        assert srv.stats()["requests"] == 30
        two = _cli(["run", str(jobs), "-o", str(second)], env)
        assert two.returncode == 0, two.stderr
        assert srv.stats()["requests"] == 30, "the second run sent requests the cache holds"
    assert _bodies(second) == _bodies(first)
    assert all(line["cached"] is True for line in read_lines(second))
    assert not any("cached" in line for line in read_lines(first))
    assert "30 of them from the response cache (not sent, not paid: $0.0" in two.stdout
    check_exactly_once(jobs, second, tmp_path / "second.errors.jsonl")


@pytest.mark.parametrize("shards", [[], ["--shard-size", "100"]], ids=["one-shard", "ten-shards"])
def test_1000_lines_over_100_bodies_send_100_requests(shards, tmp_path):
    jobs = write_repeated_jobs(tmp_path / "jobs.jsonl", 1000, 100)
    out = tmp_path / "out.jsonl"
    with MockServerThread(MockConfig()) as srv:
        done = _cli(["run", str(jobs), "-o", str(out), *shards], _env(srv))
        assert done.returncode == 0, done.stderr
        assert srv.stats()["requests"] == 100
    results, _ = check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")  # each line its own answer
    assert sum(1 for r in results if r.get("cached")) == 900
    assert "900 of them from the response cache" in done.stdout


@pytest.mark.redis
def test_a_cap_and_a_budget_see_only_what_was_sent(real_redis_url, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 20)
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv, BATCHRUN_REDIS_URL=real_redis_url)
        assert _cli(["run", str(jobs), "-o", str(tmp_path / "a.jsonl")], env).returncode == 0
        with open(jobs, "a") as f:  # one line the cache cannot serve
            f.write(json.dumps({"custom_id": "new-1", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "gpt-4o-mini", "max_tokens": 20,
                                         "messages": [{"role": "user", "content": "Something new."}]}}) + "\n")
        # A cap of about 1.5 worst cases of one job: 21 jobs fit only if the 20 hits set nothing aside.
        run = _cli(["run", str(jobs), "-o", str(tmp_path / "b.jsonl"), "--batch-id", "capped",
                    "--max-cost", "0.00003", "--rpm", "gpt-4o-mini=2"], env)
        assert run.returncode == 0, run.stderr + run.stdout
        assert srv.stats()["requests"] == 21
    status = json.loads(_cli(["status", "capped", "--json"], env).stdout)
    assert status["totals"]["requests"] == 1
    assert status["cache"] == {"enabled": True, "hits": 20, "saved_usd": pytest.approx(status["cache"]["saved_usd"])}
    assert status["cache"]["saved_usd"] > 0
    assert 0 < status["cost"]["spent_usd"] < 0.00003
    assert [m["requests"] for m in status["models"]] == [1]
    human = _cli(["status", "capped"], env).stdout
    assert "cache: 20 answers from the response cache (not sent, not paid:" in human


def test_stored_answers_expire_after_cache_ttl_and_clear_removes_them(where, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv, **where)
        runs = iter(range(10))

        def run(*extra) -> None:
            done = _cli(["run", str(jobs), "-o", str(tmp_path / f"o{next(runs)}.jsonl"), *extra], env)
            assert done.returncode == 0, done.stderr

        run("--cache-ttl", "0.00001")  # 0.86 s
        time.sleep(2.0)
        run()
        assert srv.stats()["requests"] == 10, "an expired answer was served"
        run()
        assert srv.stats()["requests"] == 10
        stats = _cli(["cache", "stats"], env)
        assert stats.returncode == 0 and "5 answers" in stats.stdout
        kept = _cli(["cache", "clear", "--older-than", "1"], env)
        assert "removed 0 answers stored more than 1 day(s) ago" in kept.stdout
        cleared = _cli(["cache", "clear"], env)
        assert cleared.returncode == 0 and "removed 5 answers from the response cache" in cleared.stdout
        run()
        assert srv.stats()["requests"] == 15


@pytest.mark.redis
def test_two_workers_on_one_redis_share_the_answers(spawn, real_redis_url, tmp_path):
    jobs = write_repeated_jobs(tmp_path / "jobs.jsonl", 200, 20)
    with MockServerThread(MockConfig(latency_ms=100)) as srv:
        env = _env(srv, BATCHRUN_REDIS_URL=real_redis_url)
        first = _cli(["submit", str(jobs), "--shard-size", "50"], env).stdout.split()[-1]
        workers = [spawn(batchrun_cmd("-q", "worker", "--burst", "--concurrency", "20"), env=env) for _ in range(2)]
        for w in workers:
            assert w.wait(timeout=120) == 0
        assert srv.stats()["requests"] == 20, "identical requests were sent by both workers"
        second = _cli(["submit", str(jobs), "--shard-size", "50"], env).stdout.split()[-1]
        assert subprocess.run(batchrun_cmd("-q", "worker", "--burst"), env=env, timeout=120).returncode == 0
        assert srv.stats()["requests"] == 20
    for bid in (first, second):
        out, err = tmp_path / f"{bid}.jsonl", tmp_path / f"{bid}.errors.jsonl"
        assert _cli(["collect", bid, "-o", str(out), "--errors", str(err)], env).returncode == 0
        check_exactly_once(jobs, out, err)


def _corrupt_sqlite_entries(cache_dir: str, keys: list[str], how: bytes) -> None:
    db = sqlite3.connect(Path(cache_dir) / "responses.sqlite3")
    with db:
        for k in keys:
            assert db.execute("UPDATE entries SET value = ? WHERE key = ?", (how, k)).rowcount == 1
    db.close()


@pytest.mark.parametrize("how", [b"BRC1\x78\x9c garbage", b"not ours at all", b""])
def test_a_corrupt_entry_is_ignored_and_logged_never_written_as_a_result(how, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 6)
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv)
        assert _cli(["run", str(jobs), "-o", str(tmp_path / "a.jsonl")], env).returncode == 0
        lines = read_lines(jobs)[:2]
        keys = [cache_key(srv.base_url, line["url"], line["body"]) for line in lines]
        _corrupt_sqlite_entries(os.environ["BATCHRUN_CACHE_DIR"], keys, how)
        again = _cli(["run", str(jobs), "-o", str(tmp_path / "b.jsonl")], env)
        assert again.returncode == 0, again.stderr
        assert srv.stats()["requests"] == 8  # the two corrupt ones were sent again
    assert again.stderr.count("cannot be read") == 2 and "it is ignored and removed" in again.stderr
    results, _ = check_exactly_once(jobs, tmp_path / "b.jsonl", tmp_path / "b.errors.jsonl")
    fresh = {r["custom_id"] for r in results if not r.get("cached")}
    assert fresh == {line["custom_id"] for line in lines}


def test_no_cache_refresh_and_the_per_line_opt_out(tmp_path):
    jobs = write_repeated_jobs(tmp_path / "jobs.jsonl", 4, 2)
    with open(jobs, "a") as f:  # two identical lines that opt out: both sent, every time
        for i in range(2):
            f.write(json.dumps({"custom_id": f"own-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "batchrun": {"cache": False},
                                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}})
                    + "\n")
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv)

        def run(name: str, *extra) -> list[dict]:
            done = _cli(["run", str(jobs), "-o", str(tmp_path / name), *extra], env)
            assert done.returncode == 0, done.stderr
            return read_lines(tmp_path / name)

        run("a.jsonl")
        assert srv.stats()["requests"] == 2 + 2
        plain = run("b.jsonl", "--no-cache")
        assert srv.stats()["requests"] == 4 + 6 and not any("cached" in r for r in plain)
        refreshed = run("c.jsonl", "--refresh")
        assert srv.stats()["requests"] == 10 + 2 + 2  # one per distinct body again, and the opted-out lines
        served = run("d.jsonl")
        assert srv.stats()["requests"] == 14 + 2
    ids = {r["custom_id"]: r["response"]["request_id"] for r in refreshed if not r.get("cached")}
    again = {r["custom_id"]: r["response"]["request_id"] for r in served if r.get("cached")}
    assert set(again.values()) <= set(ids.values()) and len(again) == 4, "--refresh did not overwrite the answers"
    assert not any(r.get("cached") for r in served if r["custom_id"].startswith("own-"))
    both = _cli(["run", str(jobs), "-o", str(tmp_path / "e.jsonl"), "--no-cache", "--refresh"], env)
    assert both.returncode == 2 and "give one of them" in both.stderr


def test_an_unreadable_opt_out_field_is_refused_naming_the_line(tmp_path):
    jobs = write_repeated_jobs(tmp_path / "jobs.jsonl", 3, 3)
    with open(jobs, "a") as f:
        f.write(json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
                            "batchrun": {"cache": "no"}, "body": {"model": "gpt-4o-mini", "messages": []}}) + "\n")
    done = _cli(["run", str(jobs), "-o", str(tmp_path / "o.jsonl"), "--mock"], cli_env())
    assert done.returncode == 1
    assert "line 4: 'batchrun.cache' must be true or false" in done.stderr
    assert not (tmp_path / "o.jsonl").exists() or not read_lines(tmp_path / "o.jsonl")


def test_estimate_says_what_the_cache_and_repeated_lines_would_serve(tmp_path):
    jobs = write_repeated_jobs(tmp_path / "jobs.jsonl", 10, 5)
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv)
        before = json.loads(_cli(["estimate", str(jobs), "--json"], env).stdout)["cache"]
        assert before["from_cache"] == 0 and before["duplicates"] == 5
        assert _cli(["run", str(jobs), "-o", str(tmp_path / "o.jsonl")], env).returncode == 0
        after = _cli(["estimate", str(jobs)], env)
    assert after.returncode == 0
    assert "from the cache  5 lines not sent, saving $0.0" in after.stdout
    assert "repeated        5 lines repeat an earlier line's request" in after.stdout


@pytest.mark.redis
def test_a_follower_ends_when_the_worker_sending_its_request_is_killed(spawn, real_redis_url, tmp_path):
    jobs = write_repeated_jobs(tmp_path / "jobs.jsonl", 2, 1)  # one body twice, one shard each

    def script(seen):
        return Reply(delay=120) if len(srv.requests) == 1 else ok("the answer")

    with HostileServer(script) as srv:
        env = _env(srv, BATCHRUN_REDIS_URL=real_redis_url, BATCHRUN_LEASE_SECONDS="3")
        bid = _cli(["submit", str(jobs), "--shard-size", "1"], env).stdout.split()[-1]
        doomed = spawn(batchrun_cmd("-q", "worker", "--concurrency", "5"), env=env)
        deadline = time.monotonic() + 60
        while not srv.requests:  # the leader's request is on the wire, and hangs
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # its worker has taken the other shard too, or not: either way it dies now
        os.kill(doomed.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-P", str(doomed.pid)])  # its work horse with it
        doomed.wait()
        survivor = subprocess.run(batchrun_cmd("-q", "worker", "--burst", "--concurrency", "5"), env=env,
                                  timeout=150)
        assert survivor.returncode == 0
        assert len(srv.requests) == 2, "the answer after the leader died was not shared"
    out, err = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    assert _cli(["collect", bid, "-o", str(out), "--errors", str(err)], env).returncode == 0
    results = read_lines(out)
    assert sorted(r["custom_id"] for r in results) == ["req-0", "req-1"] and not read_lines(err)
    assert [r.get("cached", False) for r in sorted(results, key=lambda r: not r.get("cached"))] == [True, False]


def test_the_python_api_counts_hits_and_what_they_saved():
    import batchrun

    bodies = [{"model": "gpt-4o-mini", "max_tokens": 10, "messages": [{"role": "user", "content": f"q{i % 3}"}]}
              for i in range(6)]
    with MockServerThread(MockConfig()) as srv:
        on = {"base_url": srv.base_url, "api_key": "sk-mock", "progress": False}
        first = batchrun.run(bodies, **on)
        assert srv.stats()["requests"] == 3  # repeats take the first one's answer
        second = batchrun.run(bodies, **on)
        assert srv.stats()["requests"] == 3
        fresh = batchrun.run(bodies[:2], cache=False, **on)
        assert srv.stats()["requests"] == 5
        with pytest.raises(ValueError, match="give one of them"):
            batchrun.run(bodies, cache=False, refresh=True, **on)
    assert [r.text for r in second] == [r.text for r in first]
    assert sum(r.cached for r in first) == 3 and all(r.cached for r in second)
    assert all(r.cost_usd == 0.0 and r.saved_usd > 0 for r in second)
    assert not any(r.cached for r in fresh) and all(r.cost_usd > 0 for r in fresh)


@pytest.mark.parametrize("how", ["not a database", "no directory"])
def test_a_cache_file_that_cannot_be_opened_is_a_warning_and_every_request_is_sent(how, tmp_path):
    cache_dir = tmp_path / "cache"
    if how == "not a database":
        cache_dir.mkdir()
        (cache_dir / "responses.sqlite3").write_bytes(b"this is no sqlite file, " * 400)
    else:
        (tmp_path / "a-file").write_text("x")
        cache_dir = tmp_path / "a-file" / "cache"  # its parent is a file: it cannot be made
    jobs = write_repeated_jobs(tmp_path / "jobs.jsonl", 6, 3)
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv, BATCHRUN_CACHE_DIR=str(cache_dir))
        done = _cli(["run", str(jobs), "-o", str(tmp_path / "o.jsonl")], env, timeout=90)
        assert done.returncode == 0, done.stderr
        assert srv.stats()["requests"] == 6  # as with --no-cache: nothing to dedupe against
        estimate = _cli(["estimate", str(jobs)], env)
        stats = _cli(["cache", "stats"], env)
        clear = _cli(["cache", "clear"], env)
    assert len(read_lines(tmp_path / "o.jsonl")) == 6
    for out in (done, estimate, stats, clear):
        assert "Traceback" not in out.stderr, out.stderr
        if out is estimate and how == "no directory":
            continue  # (no file: an estimate does not look, and says nothing)
        assert f"the response cache file {cache_dir / 'responses.sqlite3'} cannot be used" in out.stderr
    assert done.stderr.count("cannot be used") == 1  # one warning, not one per shard or job
    assert estimate.returncode == 0 and stats.returncode == 1 and clear.returncode == 1
    assert "BATCHRUN_CACHE_DIR" in stats.stderr


def test_estimate_counts_lines_that_opt_out_as_sent(tmp_path):
    """A line with "batchrun": {"cache": false} is sent by a run even when an earlier line repeats
    its body or the cache holds it: the estimate must not count it as served."""
    jobs = tmp_path / "jobs.jsonl"
    body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "same"}]}
    with open(jobs, "w") as f:
        for i, ext in enumerate([{}, {"batchrun": {"cache": False}}, {"batchrun": {"cache": False}}]):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body, **ext}) + "\n")
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv)
        before = json.loads(_cli(["estimate", str(jobs), "--json"], env).stdout)["cache"]
        assert _cli(["run", str(jobs), "-o", str(tmp_path / "o.jsonl")], env).returncode == 0
        assert srv.stats()["requests"] == 3  # the run sends all three
        after = json.loads(_cli(["estimate", str(jobs), "--json"], env).stdout)["cache"]
    assert before["duplicates"] == 0 and before["from_cache"] == 0
    assert after["from_cache"] == 1 and after["duplicates"] == 0


def test_answers_of_one_endpoints_config_do_not_serve_a_config_sending_elsewhere(tmp_path):
    """With [[endpoints]] the request goes to an endpoint's server, not to OPENAI_BASE_URL: an
    answer of server A (its model, its weights) must not serve a run whose config sends to B."""
    jobs = write_repeated_jobs(tmp_path / "jobs.jsonl", 4, 4)
    with MockServerThread(MockConfig()) as a, MockServerThread(MockConfig()) as b:
        env = cli_env(OPENAI_API_KEY="sk-test")
        env.pop("BATCHRUN_REDIS_URL", None)
        env.pop("OPENAI_BASE_URL", None)
        for name, srv in (("a", a), ("b", b)):
            config = tmp_path / f"{name}.toml"
            config.write_text(f'[[endpoints]]\nname = "{name}"\nbase_url = "{srv.base_url}"\n')
            done = _cli(["--config", str(config), "run", str(jobs), "-o", str(tmp_path / f"{name}.jsonl")], env)
            assert done.returncode == 0, done.stderr
        assert a.stats()["requests"] == 4
        assert b.stats()["requests"] == 4, "server A's answers were served to the run sending to server B"
        estimate = _cli(["--config", str(tmp_path / "b.toml"), "estimate", str(jobs), "--json"], env)
        assert json.loads(estimate.stdout)["cache"]["from_cache"] == 4  # the estimate keys as the run does
        again = _cli(["--config", str(tmp_path / "b.toml"), "run", str(jobs), "-o", str(tmp_path / "b2.jsonl")], env)
        assert again.returncode == 0 and b.stats()["requests"] == 4  # its own answers do serve it
    assert all(r.get("cached") for r in read_lines(tmp_path / "b2.jsonl"))
