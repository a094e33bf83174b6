"""Never lose or duplicate work: killed workers, graceful stops, Ctrl-C and resume from the files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import redis

from batchrun.mock import MockConfig, MockServerThread
from tests.helpers import batchrun_cmd, check_exactly_once, cli_env, read_lines, write_jobs

pytestmark = pytest.mark.redis


def _lines(path) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _submit(env, jobs, *extra) -> str:
    out = subprocess.run(batchrun_cmd("submit", str(jobs), *extra), env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-1]


def _wait_done(conn, batch_id: str, at_least: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while int(conn.hget(f"batchrun:batch:{batch_id}", "done") or 0) < at_least:
        assert time.monotonic() < deadline, f"fewer than {at_least} jobs done after {timeout} s"
        time.sleep(0.05)


def test_a_killed_workers_jobs_are_finished_by_another_and_written_once(spawn, real_redis_url, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 150)
    conn = redis.Redis.from_url(real_redis_url)
    with MockServerThread(MockConfig(latency_ms=200)) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test",
                      BATCHRUN_LEASE_SECONDS="3")
        batch_id = _submit(env, jobs, "--shard-size", "150")
        doomed = spawn(batchrun_cmd("-q", "worker", "--concurrency", "10"), env=env)
        _wait_done(conn, batch_id, 20, timeout=60)
        os.kill(doomed.pid, signal.SIGKILL)  # the RQ worker; its work horse keeps running a moment
        subprocess.run(["pkill", "-KILL", "-P", str(doomed.pid)])  # the work horse with it, as a lost machine
        doomed.wait()
        killed_at = time.monotonic()
        survivor = subprocess.run(batchrun_cmd("-q", "worker", "--burst", "--concurrency", "20"), env=env,
                                  timeout=120)
        assert survivor.returncode == 0
        recovered_in = time.monotonic() - killed_at
        sent = srv.stats()["requests"]
    out, err = tmp_path / "r.jsonl", tmp_path / "e.jsonl"
    subprocess.run(batchrun_cmd("collect", batch_id, "-o", str(out), "--errors", str(err)), env=env, check=True,
                   capture_output=True, timeout=60)
    assert not check_exactly_once(jobs, out, err)[1]
    # Requests in flight when it died may go again (at most its concurrency), finished ones never.
    assert sent <= 150 + 10
    assert recovered_in < 60


def test_sigterm_lets_requests_in_flight_finish_and_gives_back_the_rest(spawn, real_redis_url, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 200)
    conn = redis.Redis.from_url(real_redis_url)
    with MockServerThread(MockConfig(latency_ms=300)) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
        batch_id = _submit(env, jobs, "--shard-size", "200")
        worker = spawn(batchrun_cmd("-q", "worker", "--concurrency", "10", "--grace", "20"), env=env)
        _wait_done(conn, batch_id, 15, timeout=60)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=40) == 0
        meta = {k.decode(): v.decode() for k, v in conn.hgetall(f"batchrun:batch:{batch_id}").items()}
        assert int(meta["done"]) < 200 and conn.zcard(f"batchrun:batch:{batch_id}:leases") == 0
        # What it did not finish waits in the queue for the next worker, untouched.
        assert not conn.hgetall(f"batchrun:batch:{batch_id}:attempts")
        subprocess.run(batchrun_cmd("-q", "worker", "--burst"), env=env, timeout=120, check=True)
        sent = srv.stats()["requests"]
    out, err = tmp_path / "r.jsonl", tmp_path / "e.jsonl"
    subprocess.run(batchrun_cmd("collect", batch_id, "-o", str(out), "--errors", str(err)), env=env, check=True,
                   capture_output=True, timeout=60)
    assert not check_exactly_once(jobs, out, err)[1]
    assert sent == 200, "the graceful stop sent nothing twice"


def test_ctrl_c_in_run_then_the_printed_resume_command_completes_the_file(spawn, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 300)
    out = tmp_path / "results.jsonl"
    with MockServerThread(MockConfig(latency_ms=100)) as srv:
        env = cli_env(OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
        env.pop("BATCHRUN_REDIS_URL", None)  # the zero-setup in-process Redis: gone with the process
        run = spawn(batchrun_cmd("run", str(jobs), "-o", str(out), "--concurrency", "10"), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 60
        while _lines(out) < 60:
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C at a terminal
        _, stderr = run.communicate(timeout=60)
        assert run.returncode == 130
        [command] = [line.split(": ", 1)[1] for line in stderr.splitlines() if line.startswith("to finish the batch")]
        assert command == f"batchrun resume {jobs} -o {out}"
        partial = _lines(out)
        assert 60 <= partial < 300
        resumed = subprocess.run(batchrun_cmd(*command.split()[1:]), env=env, capture_output=True, text=True,
                                 timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        sent = srv.stats()["requests"]
    check_exactly_once(jobs, out, tmp_path / "results.errors.jsonl")
    assert sent == 300, "no job that had finished was sent again"


def test_resume_from_the_files_retries_failed_jobs_when_asked(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 10)
    out, err = tmp_path / "r.jsonl", tmp_path / "r.errors.jsonl"
    lines = [json.loads(line) for line in open(jobs)]
    with open(out, "w") as f:  # a previous run: 6 results, 2 errors, 2 never done
        for job in lines[:6]:
            f.write(json.dumps({"custom_id": job["custom_id"], "response": {"status_code": 200}}) + "\n")
    with open(err, "w") as f:
        for job in lines[6:8]:
            f.write(json.dumps({"custom_id": job["custom_id"], "error": {"code": "server_error"}}) + "\n")
    with MockServerThread(MockConfig()) as srv:
        env = cli_env(OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
        env.pop("BATCHRUN_REDIS_URL", None)
        first = subprocess.run(batchrun_cmd("resume", str(jobs), "-o", str(out)), env=env, capture_output=True,
                               text=True, timeout=60)
        assert first.returncode == 3, first.stderr  # finished, but the errors file holds two errors
        assert srv.stats()["requests"] == 2  # only the two never done
        again = subprocess.run(batchrun_cmd("resume", str(jobs), "-o", str(out), "--retry-failed"), env=env,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert srv.stats()["requests"] == 4  # and now the two that had failed
    ids = [line["custom_id"] for line in read_lines(out)] + [line["custom_id"] for line in read_lines(err)]
    assert sorted(ids) == sorted(job["custom_id"] for job in lines)
    assert len(read_lines(str(err) + ".previous")) == 2


def test_a_second_ctrl_c_stops_at_once_and_still_loses_nothing(spawn, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 200)
    out = tmp_path / "results.jsonl"
    # Slow answers: the grace would be long. 15 s: the second wave, sent 1 s before the first Ctrl-C,
    # would end 13.5 s after the second, clear of the 10 s that "at once" is given below.
    with MockServerThread(MockConfig(latency_ms=15_000)) as srv:
        env = cli_env(OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
        env.pop("BATCHRUN_REDIS_URL", None)
        run = spawn(batchrun_cmd("run", str(jobs), "-o", str(out), "--concurrency", "20"), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 90
        while _lines(out) < 20:  # the first 20 answers, after 15 s
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.05)
        time.sleep(1)  # the next 20 are on their way (they take 15 s)
        os.killpg(run.pid, signal.SIGINT)
        time.sleep(0.5)
        stopped = time.monotonic()
        os.killpg(run.pid, signal.SIGINT)  # the impatient second Ctrl-C
        _, stderr = run.communicate(timeout=60)
        assert time.monotonic() - stopped < 10, "the second Ctrl-C did not stop it at once"
        assert "stopped at once" in stderr
        [command] = [line.split(": ", 1)[1] for line in stderr.splitlines() if line.startswith("to finish the batch")]
        assert all(line.endswith("}") for line in out.read_text().splitlines())  # whole lines only
        srv.set_config(latency_ms=0)
        resumed = subprocess.run(batchrun_cmd(*command.split()[1:]), env=env, capture_output=True, text=True,
                                 timeout=120)
        assert resumed.returncode == 0, resumed.stderr
    check_exactly_once(jobs, out, tmp_path / "results.errors.jsonl")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to start one")
def test_collect_follow_and_workers_carry_on_across_a_redis_restart(spawn, tmp_path):
    import sys

    from tests.helpers import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from chaos import RedisServer

    server = RedisServer(tmp_path)  # AOF on a spare port
    server.start()
    jobs = write_jobs(tmp_path / "jobs.jsonl", 300)
    out, err = tmp_path / "r.jsonl", tmp_path / "e.jsonl"
    try:
        with MockServerThread(MockConfig(latency_ms=100)) as srv:
            env = cli_env(BATCHRUN_REDIS_URL=server.url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test")
            batch_id = _submit(env, jobs, "--shard-size", "100")
            follow = spawn(batchrun_cmd("collect", batch_id, "-o", str(out), "--errors", str(err),
                                                   "--follow"), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            worker = spawn(batchrun_cmd("-q", "worker", "--burst", "--concurrency", "10"), env=env)
            deadline = time.monotonic() + 60
            while _lines(out) < 60:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            server.kill()
            time.sleep(2)
            server.start()
            assert worker.wait(timeout=120) == 0
            stdout, stderr = follow.communicate(timeout=60)
            assert follow.returncode == 0, stderr
            assert "Redis is unreachable" in stderr  # it noticed, and waited
    finally:
        server.kill()
    check_exactly_once(jobs, out, err)


# --- what counts as maybe paid (--max-cost's unaccounted_usd) -------------------------------------

def _worst(store, batch_id: str, cid: str) -> float:
    from batchrun.policy.pricing import PriceTable, worst_case_cost
    from batchrun.policy.tokens import estimate_tokens

    request = json.loads(store.redis.hget(f"batchrun:batch:{batch_id}:req", cid))
    e = estimate_tokens(request["url"], request["body"])
    return worst_case_cost(PriceTable.load().price_for("gpt-4o-mini"), e.input_tokens, e.output_tokens)


def _run_shard(store, batch_id: str, base_url: str, meanwhile=None, **settings):
    """Run shard 0 of the batch in this process (and ``meanwhile(runner)`` beside it), within 60 s."""
    import asyncio

    from batchrun.settings import WorkerSettings
    from batchrun.runner.shard import ShardRunner

    settings = WorkerSettings(base_url=base_url, api_key="sk-test", **{"concurrency": 10, **settings})
    runner = ShardRunner(store, batch_id, 0, settings)

    async def go():
        side = asyncio.ensure_future(meanwhile(runner)) if meanwhile else None
        try:
            return await asyncio.wait_for(runner.run(), 60)
        finally:
            if side is not None:
                await side
    return asyncio.run(go())


def test_a_refused_connection_is_not_counted_as_maybe_paid_and_does_not_pause_a_capped_batch(store, make_batch):
    import asyncio

    from tests.hostile import HostileServer, closed_port, ok

    cids = make_batch(store, "b", 3, backoff_base=0.05, backoff_cap=0.2)
    worst = _worst(store, "b", cids[0])
    store.set_max_cost("b", 3.5 * worst)  # room for the three at their worst, not for one more
    port = closed_port()
    servers = []

    async def then_the_server_comes_up(runner):
        deadline = time.monotonic() + 20
        while int(store.meta("b").get("retries", 0)) < 6 and store.meta("b")["state"] == "running":
            assert time.monotonic() < deadline  # every job refused twice, at least
            await asyncio.sleep(0.01)
        servers.append(HostileServer([ok()], port=port).start())

    try:
        _run_shard(store, "b", f"http://127.0.0.1:{port}/v1", then_the_server_comes_up)
    finally:
        for srv in servers:
            srv.stop()
    meta = store.meta("b")
    assert meta["state"] == "finished", meta.get("reason")
    assert int(meta["done"]) == 3 and len(servers[0].requests) == 3
    assert float(meta.get("cost_unknown") or 0) == 0 and abs(float(meta["cost_reserved"])) < 1e-12


@pytest.mark.parametrize("broken", ["dropped after the body was read", "stream broken half way"])
def test_a_request_that_reached_the_server_and_broke_is_counted_as_maybe_paid(store, make_batch, broken):
    from tests.hostile import HostileServer, Reply, ok, sse

    cids = make_batch(store, "b", 1, backoff_base=0.05, backoff_cap=0.2, max_cost=1.0)
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "delta": {"content": "half"}, "finish_reason": None}]}
    first, then = Reply(drop=True), ok()
    if broken.startswith("stream"):  # the job asks for a stream, which breaks after its first chunk
        done = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}
        first, then = Reply(events=sse(chunk), drop=True), Reply(events=sse(chunk, done, "[DONE]"))
        request = json.loads(store.redis.hget("batchrun:batch:b:req", cids[0]))
        request["body"]["stream"] = True
        store.redis.hset("batchrun:batch:b:req", cids[0], json.dumps(request))
    worst = _worst(store, "b", cids[0])
    with HostileServer([first, then]) as srv:
        _run_shard(store, "b", srv.base_url)
        sent = len(srv.requests)
    meta = store.meta("b")
    assert meta["state"] == "finished" and int(meta["done"]) == 1 and sent == 2
    assert float(meta["cost_unknown"]) == pytest.approx(worst)


def test_may_have_reached_server_reads_the_exception_chain():
    import asyncio

    import openai

    from batchrun.runner.sender import make_client, may_have_reached_server, send
    from batchrun.settings import WorkerSettings
    from tests.hostile import HostileServer, Reply, closed_port

    def failure(base_url: str, timeout: float = 5.0) -> BaseException:
        async def go():
            client = make_client(WorkerSettings(base_url=base_url, api_key="sk-test", request_timeout=timeout))
            try:
                await send(client, "/v1/chat/completions", {"model": "m", "messages": []})
            except Exception as exc:  # noqa: BLE001 - the exception is the result
                return exc
            finally:
                await client.close()
        return asyncio.run(go())

    refused = failure(f"http://127.0.0.1:{closed_port()}/v1")
    assert isinstance(refused, openai.APIConnectionError) and not may_have_reached_server(refused)
    unknown_host = failure("http://no-such-host.invalid/v1")
    assert isinstance(unknown_host, openai.APIConnectionError) and not may_have_reached_server(unknown_host)
    with HostileServer([Reply(drop=True)]) as srv:
        dropped = failure(srv.base_url)
    assert isinstance(dropped, openai.APIConnectionError) and may_have_reached_server(dropped)
    with HostileServer([Reply(delay=2)]) as srv:
        timed_out = failure(srv.base_url, timeout=0.3)
    assert isinstance(timed_out, openai.APITimeoutError) and may_have_reached_server(timed_out)
    assert may_have_reached_server(RuntimeError("a bug, anywhere"))  # unknown: on the safe side


def test_a_runner_cut_off_from_redis_past_its_leases_sends_nothing_twice_and_loses_nothing(store, make_batch,
                                                                                            monkeypatch):
    from batchrun.policy.pricing import PriceTable, cost_of_usage
    from tests.hostile import HostileServer, Reply, chat_body

    make_batch(store, "b", 3, max_cost=1.0)
    reclaimed = []  # Redis is away for the renewals (past the 0.6 s leases) until the jobs were reclaimed
    renew = store.renew

    def renew_unless_cut_off(*args, **kwargs):
        if not reclaimed:
            raise redis.ConnectionError("Redis is away (injected)")
        return renew(*args, **kwargs)

    monkeypatch.setattr(store, "renew", renew_unless_cut_off)
    lease, leased = store.lease, []

    def counted_lease(*args, **kwargs):
        out = lease(*args, **kwargs)
        leased.extend(job.custom_id for job in out.jobs)
        return out

    monkeypatch.setattr(store, "lease", counted_lease)

    async def another_workers_maintenance(runner):
        import asyncio

        n, deadline = 0, time.monotonic() + 20
        while n < 3 and time.monotonic() < deadline:  # once the leases lapse, the jobs go back to the queue
            n += await asyncio.to_thread(store.reclaim, "b")
            await asyncio.sleep(0.02)
        reclaimed.append(n)

    with HostileServer([Reply(200, {}, chat_body(), delay=4)]) as srv:  # answers after the outage
        _run_shard(store, "b", srv.base_url, another_workers_maintenance, lease_seconds=0.6)
        sent = [r.body["messages"][0]["content"] for r in srv.requests]
    meta = store.meta("b")
    assert reclaimed == [3] and len(leased) == 6  # the runner leased its own jobs back while they were in flight
    assert len(sent) == len(set(sent)) == 3, "a job was sent twice"
    assert meta["state"] == "finished" and int(meta["done"]) == 3 and len(store.results("b", 0, 100)) == 3
    # Each answer counts once, at its real cost: none is left as unaccounted, nothing stays set aside.
    price = PriceTable.load().price_for("gpt-4o-mini")
    assert float(meta["cost"]) == pytest.approx(3 * cost_of_usage(price, chat_body()["usage"]))
    assert abs(float(meta.get("cost_unknown") or 0)) < 1e-12 and abs(float(meta["cost_reserved"])) < 1e-12
    assert not store.redis.zcard("batchrun:batch:b:leases") and not store.redis.hlen("batchrun:batch:b:lapsed")


def test_a_job_that_gives_up_after_a_broken_attempt_stays_counted_as_maybe_paid(store, make_batch):
    from tests.hostile import HostileServer, Reply, closed_port

    cids = make_batch(store, "b", 1, max_attempts=1, max_cost=1.0)
    worst = _worst(store, "b", cids[0])
    with HostileServer([Reply(drop=True)]) as srv:  # it read the request, then dropped the connection
        _run_shard(store, "b", srv.base_url)
    meta = store.meta("b")
    assert int(meta["failed"]) == 1 and float(meta["cost_unknown"]) == pytest.approx(worst)
    assert abs(float(meta["cost_reserved"])) < 1e-12
    # One that never reached the server gives its worst case back.
    make_batch(store, "c", 1, max_attempts=1, max_cost=1.0)
    _run_shard(store, "c", f"http://127.0.0.1:{closed_port()}/v1")
    meta = store.meta("c")
    assert int(meta["failed"]) == 1 and float(meta.get("cost_unknown") or 0) == 0
    assert abs(float(meta["cost_reserved"])) < 1e-12
