"""Workers: they run only batchrun's own jobs, and a work horse whose worker died stops."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zlib

import fakeredis
import pytest
import redis
from rq import Callback, Queue
from rq.job import JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from batchrun.state import keys
from batchrun.mock import MockConfig, MockServerThread
from batchrun.settings import WorkerSettings
from batchrun.runner.worker import BatchJob, RefusedJob, refusal
from tests.helpers import ROOT, batchrun_cmd, check_exactly_once, cli_env, read_lines, run_thread_worker, write_jobs

sys.path.insert(0, str(ROOT / "bench"))

RQ = shutil.which("rq", path=os.path.dirname(sys.executable)) or "rq"


class _Evil:
    """Unpickling this runs a shell command: what a pickle-reading worker would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _hostile_jobs(conn, tmp_path) -> dict[str, str]:
    """Jobs enqueued by hand on batchrun's queue, each of which would create its marker file if run
    (or imported, or unpickled); returns job id -> marker path."""
    (tmp_path / "evil_module.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n"
                                             "def run():\n    pass\n")
    q = Queue(keys.QUEUE, connection=conn, serializer=JSONSerializer)
    jobs = {q.enqueue("os.system", f"touch {tmp_path / 'system'}").id: "system",
            q.enqueue("evil_module.run").id: "imported",
            # batchrun's own function, with a failure callback that would run a command
            q.enqueue("batchrun.runner.shard.run_shard", "no-such-batch", 0,
                      on_success=Callback("os.system"), on_failure=Callback("os.system")).id: "callback"}
    pickled = Queue(keys.QUEUE, connection=conn).enqueue("builtins.print", "hello")  # RQ's default: pickle
    conn.hset(f"rq:job:{pickled.id}", "data", zlib.compress(pickle.dumps(
        (_Evil(f"touch {tmp_path / 'unpickled'}"), None, (), {}))))
    jobs[pickled.id] = "unpickled"
    unreadable = q.enqueue("os.system", f"touch {tmp_path / 'unreadable'}")
    conn.hset(f"rq:job:{unreadable.id}", "timeout", "soon")  # RQ cannot read the job's fields
    jobs[unreadable.id] = "unreadable"
    return jobs


def _assert_refused(conn, jobs: dict[str, str], tmp_path, log: str) -> None:
    for name in ("system", "imported", "callback", "unpickled", "unreadable"):
        assert not (tmp_path / name).exists(), f"the {name} job ran"
    failed = FailedJobRegistry(keys.QUEUE, connection=conn)
    assert set(jobs) <= set(failed.get_job_ids()), "every refused job is in the failed registry"
    for job_id in jobs:
        assert conn.hget(f"rq:job:{job_id}", "status") == JobStatus.FAILED.value.encode()
    assert conn.llen(f"rq:queue:{keys.QUEUE}") == 0
    assert conn.llen(f"rq:queue:{keys.QUEUE}:intermediate") == 0
    for job_id in jobs:
        assert f"refused RQ job {job_id}" in log, log
    assert "'os.system', which is not one of batchrun's job functions" in log
    assert "Traceback" not in log


@pytest.mark.redis
@pytest.mark.parametrize("command", [
    pytest.param(batchrun_cmd("-q", "worker", "--burst"), id="batchrun-worker"),
    pytest.param([RQ, "worker", "-c", "batchrun.runner.rq_settings", "-S", "json", "-w",
                  "batchrun.runner.worker.BatchWorker", "--burst"], id="rq-worker-json"),
    # the README's command without `-S json` (RQ would read the jobs with pickle), with a
    # checkout's workers.settings, which re-exports batchrun.runner.rq_settings
    pytest.param([RQ, "worker", "-c", "workers.settings", "-w", "batchrun.runner.worker.BatchWorker", "--burst"],
                 id="rq-worker-default-serializer"),
])
def test_a_real_worker_process_refuses_jobs_that_are_not_batchruns_and_still_runs_batches(
        command, real_redis_url, tmp_path):
    conn = redis.Redis.from_url(real_redis_url)
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", 30)
    with MockServerThread(MockConfig()) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test",
                      PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
        hostile = _hostile_jobs(conn, tmp_path)
        sub = subprocess.run(batchrun_cmd("-q", "submit", str(jobs_file), "--shard-size", "10"), env=env,
                             capture_output=True, text=True, timeout=60)
        batch_id = sub.stdout.split()[-1]
        worker = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert worker.returncode == 0, worker.stderr
    _assert_refused(conn, hostile, tmp_path, worker.stderr + worker.stdout)
    out, err = tmp_path / "r.jsonl", tmp_path / "e.jsonl"
    subprocess.run(batchrun_cmd("collect", batch_id, "-o", str(out), "--errors", str(err)), env=env, check=True,
                   capture_output=True, timeout=60)
    assert not check_exactly_once(jobs_file, out, err)[1]


def test_the_in_process_thread_worker_refuses_them_too(tmp_path, caplog, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    hostile = _hostile_jobs(conn, tmp_path)
    with caplog.at_level("WARNING", logger="batchrun.worker"):
        run_thread_worker(conn, WorkerSettings(base_url="http://127.0.0.1:9/v1", api_key="sk-test"), timeout=60)
    _assert_refused(conn, hostile, tmp_path, caplog.text)


def test_the_job_class_resolves_no_foreign_function_and_no_callback(tmp_path):
    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    q = Queue(keys.QUEUE, connection=conn, serializer=JSONSerializer)
    foreign = BatchJob.fetch(q.enqueue("os.system", "true").id, connection=conn, serializer=JSONSerializer)
    with pytest.raises(RefusedJob, match="os.system"):
        foreign.func
    own = q.enqueue("batchrun.runner.shard.run_shard", "b-1", 3, on_failure=Callback("os.system"))
    own = BatchJob.fetch(own.id, connection=conn, serializer=JSONSerializer)
    assert own.failure_callback is None and own.success_callback is None and own.stopped_callback is None
    assert "callbacks" in refusal(own)
    plain = BatchJob.fetch(q.enqueue("batchrun.runner.shard.run_shard", "b-1", 3).id, connection=conn,
                           serializer=JSONSerializer)
    assert refusal(plain) is None and plain.func.__name__ == "run_shard"
    for args in [("b-1",), ("b-1", "3"), ("b-1", 3, 4), (["b"], 3)]:
        job = BatchJob.fetch(q.enqueue("batchrun.runner.shard.run_shard", *args).id, connection=conn,
                             serializer=JSONSerializer)
        assert "arguments" in refusal(job), args


# --- a work horse whose worker died ---------------------------------------------------------------


@pytest.mark.redis
def test_a_horse_whose_worker_is_killed_stops_soon_and_the_batch_still_ends_exactly_once(
        spawn, real_redis_url, tmp_path):
    import chaos

    jobs = write_jobs(tmp_path / "jobs.jsonl", 400)
    conn = redis.Redis.from_url(real_redis_url)
    with MockServerThread(MockConfig(latency_ms=200)) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test",
                      BATCHRUN_LEASE_SECONDS="3")
        sub = subprocess.run(batchrun_cmd("-q", "submit", str(jobs), "--shard-size", "400"), env=env,
                             capture_output=True, text=True, timeout=60)
        batch_id = sub.stdout.split()[-1]
        worker = spawn(batchrun_cmd("-q", "worker", "--concurrency", "5", "--grace", "2"), env=env,
                       stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while int(conn.hget(f"batchrun:batch:{batch_id}", "done") or 0) < 20:
            assert time.monotonic() < deadline and worker.poll() is None
            time.sleep(0.05)
        [horse] = chaos.descendants(worker.pid)
        os.kill(worker.pid, signal.SIGKILL)  # the RQ worker alone: its horse is in a group of its own
        worker.wait()
        killed_at = time.monotonic()
        while chaos.alive(horse):
            # At 25 jobs/s the shard has ~15 s of work left: a horse that runs on is still here.
            assert time.monotonic() - killed_at < 6, "the orphaned horse is still running"
            time.sleep(0.1)
        stopped_in = time.monotonic() - killed_at
        done_when_stopped = int(conn.hget(f"batchrun:batch:{batch_id}", "done"))
        assert done_when_stopped < 400
        _, log = worker.communicate(timeout=10)
        subprocess.run(batchrun_cmd("-q", "worker", "--burst", "--concurrency", "20"), env=env, timeout=120,
                       check=True)
        sent = srv.stats()["requests"]
    assert "is gone: its work horse stops as on SIGTERM" in log, log
    out, err = tmp_path / "r.jsonl", tmp_path / "e.jsonl"
    subprocess.run(batchrun_cmd("collect", batch_id, "-o", str(out), "--errors", str(err)), env=env, check=True,
                   capture_output=True, timeout=60)
    assert not check_exactly_once(jobs, out, err)[1]
    assert sent <= 400 + 5, "at most the requests in flight went twice"
    assert stopped_in < 6


# --- credentials in the base URL, and the API key ---------------------------------------------------


def _redis_dump(conn) -> bytes:
    """Every key and value of the DB as bytes (RQ's zlib-compressed job data decompressed too)."""
    parts: list[bytes] = []
    for key in conn.scan_iter(count=500):
        parts.append(key)
        kind = conn.type(key)
        if kind == b"string":
            values = [conn.get(key)]
        elif kind == b"hash":
            values = [x for kv in conn.hgetall(key).items() for x in kv]
        elif kind == b"list":
            values = conn.lrange(key, 0, -1)
        elif kind == b"set":
            values = list(conn.smembers(key))
        elif kind == b"zset":
            values = [m for m, _ in conn.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            values = [x for _, fields in conn.xrange(key) for kv in fields.items() for x in kv]
        else:
            raise AssertionError(f"unexpected type {kind!r} of {key!r}")
        for value in values:
            parts.append(value or b"")
            try:
                parts.append(zlib.decompress(value))
            except (zlib.error, TypeError):
                pass
    return b"\n".join(parts)


@pytest.mark.redis
def test_credentials_in_the_base_url_reach_the_server_and_nothing_else(spawn, real_redis_url, tmp_path):
    import base64
    import itertools
    import threading

    from tests.hostile import HostileServer, Reply, error_body, ok

    token, api_key = "s3cretTok-9f2e", "sk-apikey-7d1e40"
    basic = "Basic " + base64.b64encode(f"gwuser:{token}".encode()).decode()
    count, lock = itertools.count(1), threading.Lock()

    def script(seen):
        if seen.headers.get("Authorization") != basic:
            return Reply(401, body=error_body("no such user", "invalid_request_error", "invalid_api_key"))
        with lock:
            n = next(count)
        # An outage first (dropped connections, then 500s: their messages go to Redis), so that the
        # circuit opens and `status` shows the endpoint.
        if n <= 6:
            return Reply(drop=True)
        return Reply(500, body=error_body("down", "server_error")) if n <= 14 else ok("fine")

    jobs = write_jobs(tmp_path / "jobs.jsonl", 40)
    conn = redis.Redis.from_url(real_redis_url)
    with HostileServer(script) as srv:
        base_url = srv.base_url.replace("http://", f"http://gwuser:{token}@")
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url, OPENAI_BASE_URL=base_url, OPENAI_API_KEY=api_key)
        sub = subprocess.run(batchrun_cmd("-v", "submit", str(jobs), "--backoff-base", "0.1", "--backoff-cap", "1"),
                             env=env, capture_output=True, text=True, timeout=60)
        batch_id = sub.stdout.split()[-1]
        log_path = tmp_path / "worker.log"
        with open(log_path, "w") as log_file:
            worker = spawn(batchrun_cmd("-v", "worker", "--burst", "--concurrency", "4"), env=env,
                           stdout=log_file, stderr=subprocess.STDOUT)
            shown = []
            deadline = time.monotonic() + 90
            while worker.poll() is None:
                assert time.monotonic() < deadline, "the worker did not finish the batch"
                for extra in ([], ["--json"]):
                    shown.append(subprocess.run(batchrun_cmd("status", batch_id, *extra), env=env,
                                                capture_output=True, text=True, timeout=60).stdout)
        assert worker.returncode == 0
        status = "\n".join(shown)
        requests = list(srv.requests)
    out, err = tmp_path / "r.jsonl", tmp_path / "e.jsonl"
    collected = subprocess.run(batchrun_cmd("-v", "collect", batch_id, "-o", str(out), "--errors", str(err)),
                               env=env, capture_output=True, text=True, timeout=60)
    assert len(read_lines(out)) == 40 and not read_lines(err)
    assert requests and all(r.headers.get("Authorization") == basic for r in requests), "the server got them"
    log = log_path.read_text()
    assert f"sending to http://gwuser:***@127.0.0.1:{srv.port}/v1" in log, log
    assert f"circuit open for http://gwuser:***@127.0.0.1:{srv.port}/v1" in status, status
    secrets = [token, api_key, basic.split()[1]]
    dump = _redis_dump(conn)
    for secret in secrets:
        assert secret.encode() not in dump, f"{secret} is in Redis"
        for name, text in [("worker log", log), ("status", status), ("submit/collect output",
                                                                       sub.stdout + sub.stderr + collected.stdout
                                                                       + collected.stderr),
                           ("results", out.read_text())]:
            assert secret not in text, f"{secret} is in the {name}"


def test_redis_going_away_as_a_work_horse_ends_does_not_kill_the_worker(caplog):
    """RQ reads the job's status once the horse exits; with Redis down that raised out of
    Worker.work and the worker process died (seen in a Redis-restart test under load)."""
    from batchrun.runner.worker import BatchWorkerMixin

    class RedisGoneBase:
        def execute_job(self, job, queue):
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6399. Connection refused.")

    class Worker(BatchWorkerMixin, RedisGoneBase):
        name = "w1"

    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    q = Queue(keys.QUEUE, connection=conn, serializer=JSONSerializer)
    job = BatchJob.fetch(q.enqueue("batchrun.runner.shard.run_shard", "b-1", 0).id, connection=conn,
                         serializer=JSONSerializer)
    with caplog.at_level("WARNING", logger="batchrun.worker"):
        Worker.__new__(Worker).execute_job(job, q)  # returns instead of raising
    assert "Redis unreachable as shard job" in caplog.text and "runs again once Redis is back" in caplog.text
