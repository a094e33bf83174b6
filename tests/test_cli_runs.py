"""`run`, `resume` and `collect` as a user types them: the real command in a subprocess, on the
in-process Redis and on the real one (named by --redis-url or by BATCHRUN_REDIS_URL). Each test
checks the exit code, the words, the files, and what the server was sent (nothing paid twice)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time

import pytest

from batchrun.mock import MockConfig, MockServerThread
from tests.helpers import batchrun_cmd, check_exactly_once, cli_env, read_lines, write_jobs
from tests.hostile import HostileServer, Reply, error_body, ok, rate_limit_body


def _lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.fixture(params=["memory", "url", "env"])
def redis_kind(request):
    """How the command reaches Redis: (extra command-line args, extra environment)."""
    if request.param == "memory":
        return request.param, [], {}
    url = request.getfixturevalue("real_redis_url")
    if request.param == "url":
        return request.param, ["--redis-url", url], {}
    return request.param, [], {"BATCHRUN_REDIS_URL": url}


def _env(server, extra: dict | None = None) -> dict:
    env = cli_env(OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY="sk-test", **(extra or {}))
    if "BATCHRUN_REDIS_URL" not in (extra or {}):
        env.pop("BATCHRUN_REDIS_URL", None)
    return env


def _cli(args, env, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(batchrun_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


def _printed_command(stderr: str) -> list[str]:
    [line] = [line for line in stderr.splitlines() if line.startswith("to finish the batch: ")]
    words = shlex.split(line.split(": ", 1)[1])
    assert words[0] == "batchrun"
    return words[1:]


# --- 12.1: a rerun never pays twice ---------------------------------------------------------

@pytest.mark.parametrize("same_batch_id", [False, True])
def test_run_onto_a_complete_output_sends_nothing_and_keeps_the_answers(redis_kind, same_batch_id, tmp_path):
    kind, args, extra = redis_kind
    jobs = write_jobs(tmp_path / "jobs.jsonl", 12)
    out = tmp_path / "dd.jsonl"
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv, extra)
        first = _cli(["run", str(jobs), "-o", str(out), "--batch-id", "dd1", *args], env)
        assert first.returncode == 0, first.stderr
        before = out.read_bytes()
        assert srv.stats()["requests"] == 12
        again = _cli(["run", str(jobs), "-o", str(out), "--batch-id", "dd1" if same_batch_id else "dd2", *args], env)
        assert again.returncode == 0, again.stderr
        assert srv.stats()["requests"] == 12, "the second run sent jobs the output already held"
    assert out.read_bytes() == before
    assert "12 job(s) already in" in again.stderr and "are not sent again" in again.stderr
    assert "0 result(s) written to" in again.stdout
    check_exactly_once(jobs, out, tmp_path / "dd.errors.jsonl")


def test_run_completes_a_partial_output_sending_only_what_it_lacks(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 20)
    out = tmp_path / "r.jsonl"
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv)
        assert _cli(["run", str(jobs), "-o", str(out)], env).returncode == 0
        kept = out.read_text().splitlines()[:7]
        out.write_text("".join(line + "\n" for line in kept))
        again = _cli(["run", str(jobs), "-o", str(out), "--no-cache"], env)  # (else the cache serves all 13)
        assert again.returncode == 0, again.stderr
        assert srv.stats()["requests"] == 20 + 13
    assert "13 result(s) written to" in again.stdout
    check_exactly_once(jobs, out, tmp_path / "r.errors.jsonl")


@pytest.mark.parametrize("which", ["-o", "--errors"])
def test_run_refuses_to_write_into_its_jobs_file(which, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    before = jobs.read_bytes()
    paths = ["-o", str(jobs)] if which == "-o" else ["-o", str(tmp_path / "r.jsonl"), "--errors", str(jobs)]
    with MockServerThread(MockConfig()) as srv:
        proc = _cli(["run", str(jobs), *paths], _env(srv))
        assert srv.stats()["requests"] == 0
    assert proc.returncode == 1
    assert f"{which} {jobs} is the jobs file itself" in proc.stderr and "Traceback" not in proc.stderr
    assert jobs.read_bytes() == before


def test_run_on_a_batch_whose_pending_jobs_the_output_already_holds_is_refused(real_redis_url, tmp_path):
    """Those jobs would be paid for and their answers dropped: refuse, with what to do instead."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", 10)
    out = tmp_path / "other.jsonl"
    out.write_text("".join(json.dumps({"custom_id": f"req-{i}", "response": {"status_code": 200}}) + "\n"
                           for i in range(3)))
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv, {"BATCHRUN_REDIS_URL": real_redis_url})
        assert _cli(["submit", str(jobs), "--batch-id", "held"], env).returncode == 0
        proc = _cli(["run", str(jobs), "-o", str(out), "--batch-id", "held"], env)
        assert srv.stats()["requests"] == 0
    assert proc.returncode == 1, proc.stderr
    assert "batch held still has 3 job(s) to send whose custom_id" in proc.stderr
    assert "collect batch held into another file" in proc.stderr


# --- 12.2: every printed command works as pasted ----------------------------------------------

def test_the_command_printed_after_ctrl_c_completes_the_batch_when_pasted(redis_kind, spawn, tmp_path):
    kind, args, extra = redis_kind
    n = 300
    jobs = write_jobs(tmp_path / "jobs.jsonl", n)
    out = tmp_path / "results.jsonl"
    with MockServerThread(MockConfig(latency_ms=100)) as srv:
        env = _env(srv, extra)
        run = spawn(batchrun_cmd("run", str(jobs), "-o", str(out), "--concurrency", "10", *args), env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while _lines(out) < 60:
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
        assert run.returncode == 130, stderr
        command = _printed_command(stderr)
        if kind == "memory":
            assert command[:4] == ["resume", str(jobs), "-o", str(out)]
        else:
            assert command[:2] == ["run", str(jobs)] and "--batch-id" in command
            assert ("--redis-url" in command) == (kind == "url")
            if kind == "env":
                assert "BATCHRUN_REDIS_URL set as it is now" in stderr
        partial = _lines(out)
        assert 60 <= partial < n
        # A fresh shell: only what the user had (the Redis URL only if it was in the environment).
        pasted = _cli(command, _env(srv, extra))
        assert pasted.returncode == 0, pasted.stderr
        sent = srv.stats()["requests"]
    check_exactly_once(jobs, out, tmp_path / "results.errors.jsonl")
    assert sent == n, f"{sent - n} request(s) sent again for jobs that had an answer"


def test_a_redis_password_is_masked_in_the_printed_command_and_the_user_told(tmp_path):
    from batchrun.ops.hints import RedisRef, RedisSource, command, rerun

    ref = RedisRef.of("redis://:s3cret@127.0.0.1:6379/6", RedisSource.COMMAND_LINE)
    printed = command(rerun("jobs.jsonl", "out.jsonl", None, "b-1", ref, mock=False))
    assert "s3cret" not in printed and "redis://:***@127.0.0.1:6379/6" in printed
    assert "in place of ***" in ref.note()
    assert RedisRef.of("redis://:s3cret@h/0", RedisSource.ENVIRONMENT).args() == []
    assert RedisRef.of("memory://", RedisSource.COMMAND_LINE).memory


def test_a_pause_on_the_in_process_redis_prints_only_commands_that_work_there(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 6)
    out = tmp_path / "r.jsonl"
    quota = Reply(429, {}, error_body("You exceeded your current quota.", "insufficient_quota",
                                      "insufficient_quota"))
    with HostileServer([quota]) as srv:
        proc = _cli(["run", str(jobs), "-o", str(out)], _env(srv))
    assert proc.returncode == 4, proc.stderr
    assert "is paused" in proc.stderr
    # No `batchrun resume BATCH_ID` anywhere: that batch is gone with the process.
    assert "batchrun resume batch-" not in proc.stderr, proc.stderr
    assert f"then run `batchrun resume {jobs} -o {out}`" in proc.stderr
    assert _printed_command(proc.stderr) == ["resume", str(jobs), "-o", str(out)]


# --- 12.3 / 11.14: resume repeats the first run --------------------------------------------

def _embedding_server():
    """Answers embeddings; a request anywhere else is a 400, as a real server would say."""
    def reply(seen):
        if seen.path.endswith("/embeddings"):
            return Reply(200, {}, {"object": "list", "model": "text-embedding-3-small",
                                   "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                                   "usage": {"prompt_tokens": 3, "total_tokens": 3}})
        return Reply(400, {}, error_body("wrong endpoint", "invalid_request_error"))
    return HostileServer(reply)


def test_resume_from_the_files_repeats_the_first_runs_endpoint_and_skip_invalid(tmp_path):
    jobs = tmp_path / "emb.jsonl"
    lines = [json.dumps({"model": "text-embedding-3-small", "input": f"text {i}",
                         "metadata": {"custom_id": f"e-{i}"}}) for i in range(8)]
    lines.insert(3, "{not json")
    jobs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "emb.out.jsonl"
    with _embedding_server() as srv:
        env = _env(srv)
        first = _cli(["run", str(jobs), "-o", str(out), "--endpoint", "/v1/embeddings", "--skip-invalid",
                      "--max-attempts", "3", "--no-cache"], env)  # (resume repeats it: else the cache serves all)
        assert first.returncode == 0, first.stderr
        kept = out.read_text().splitlines()[:3]
        out.write_text("".join(line + "\n" for line in kept))  # as if it had stopped there
        resumed = _cli(["resume", str(jobs), "-o", str(out)], env)
        assert resumed.returncode == 0, resumed.stderr
        paths = [seen.path for seen in srv.requests]
    assert paths == ["/v1/embeddings"] * (8 + 5), paths
    assert "resuming with the first run's settings:" in resumed.stderr
    for said in ("--endpoint /v1/embeddings", "--skip-invalid", "--max-attempts 3"):
        assert said in resumed.stderr
    assert not read_lines(tmp_path / "emb.out.errors.jsonl")
    assert sorted(r["custom_id"] for r in read_lines(out)) == sorted(f"e-{i}" for i in range(8))


def test_resume_from_the_files_accepts_the_run_options(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    out = tmp_path / "r.jsonl"
    with MockServerThread(MockConfig()) as srv:
        proc = _cli(["resume", str(jobs), "-o", str(out), "--skip-invalid", "--endpoint", "/v1/chat/completions",
                     "--tpm", "gpt-4o-mini=1000000", "--rpm", "10000", "--max-attempts", "2", "--processes", "1"],
                    _env(srv))
        assert srv.stats()["requests"] == 5
    assert proc.returncode == 0, proc.stderr
    check_exactly_once(jobs, out, tmp_path / "r.errors.jsonl")


def test_resume_of_a_batch_id_refuses_options_that_only_a_file_can_take(real_redis_url, tmp_path):
    proc = _cli(["resume", "some-batch", "--tpm", "1000"], cli_env(BATCHRUN_REDIS_URL=real_redis_url))
    assert proc.returncode == 1 and "apply to `resume JOBS -o OUT` only" in proc.stderr


def test_resume_keeps_the_first_runs_spending_cap_over_the_whole_file(tmp_path):
    """A cap is a ceiling for the file: a resume may spend only what the first run left of it."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", 200, max_tokens=50)
    out = tmp_path / "out.jsonl"
    env = cli_env()
    env.pop("BATCHRUN_REDIS_URL", None)
    first = _cli(["run", str(jobs), "-o", str(out), "--mock", "--max-cost", "0.0004", "-c", "20"], env)
    assert first.returncode == 4, first.stderr
    saved = json.loads((tmp_path / "out.batchrun.json").read_text())
    spent = sum(saved["spent_usd"].values())
    assert 0 < spent <= 0.0004
    again = _cli(["resume", str(jobs), "-o", str(out)], env)
    assert again.returncode in (1, 4), again.stderr
    if again.returncode == 1:
        assert "is spent" in again.stderr and "--max-cost USD" in again.stderr
    else:
        assert "what is left of the first run's $0.0004" in again.stderr
        saved = json.loads((tmp_path / "out.batchrun.json").read_text())
        assert sum(saved["spent_usd"].values()) <= 0.0004 + 1e-9


# --- 12.4: paths are checked before anything is submitted -----------------------------------

@pytest.mark.parametrize("where", ["missing-dir", "errors-under-proc", "a-directory"])
def test_an_unwritable_path_is_refused_before_anything_is_submitted(real_redis_url, where, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 20)
    paths = {"missing-dir": ["-o", str(tmp_path / "no" / "such" / "r.jsonl")],
             "errors-under-proc": ["-o", str(tmp_path / "r.jsonl"), "--errors", "/proc/r.errors.jsonl"],
             "a-directory": ["-o", str(tmp_path)]}[where]
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv, {"BATCHRUN_REDIS_URL": real_redis_url})
        proc = _cli(["run", str(jobs), *paths], env)
        assert srv.stats()["requests"] == 0
        listing = _cli(["list"], env)
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr
    if where != "a-directory":  # click itself refuses a directory for -o (a usage error)
        assert "cannot write" in proc.stderr and "nothing was submitted" in proc.stderr
    if where == "missing-dir":
        assert "does not exist" in proc.stderr
    assert listing.stdout.strip() == "no batch on this Redis"


def test_collect_into_a_missing_directory_is_one_sentence(real_redis_url, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    assert _cli(["submit", str(jobs), "--batch-id", "c1"], env).returncode == 0
    proc = _cli(["collect", "c1", "-o", str(tmp_path / "nope" / "r.jsonl")], env)
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# --- 12.10: exit codes ------------------------------------------------------------------------

def test_exit_codes_of_run_resume_and_collect(real_redis_url, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    with HostileServer([Reply(400, {}, error_body("bad", "invalid_request_error"))]) as srv:
        failed = _cli(["run", str(jobs), "-o", str(tmp_path / "f.jsonl")], _env(srv))
    assert failed.returncode == 3, failed.stderr  # finished, every job in the errors file
    assert "5 error(s) to" in failed.stdout
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv, {"BATCHRUN_REDIS_URL": real_redis_url})
        assert _cli(["run", str(jobs), "-o", str(tmp_path / "ok.jsonl"), "--batch-id", "ok"], env).returncode == 0
        assert _cli(["collect", "ok", "-o", str(tmp_path / "c.jsonl")], env).returncode == 0
        assert _cli(["resume", str(jobs), "-o", str(tmp_path / "ok.jsonl")], env).returncode == 0
        assert _cli(["submit", str(jobs), "--batch-id", "waiting"], env).returncode == 0
        assert _cli(["collect", "waiting", "-o", str(tmp_path / "w.jsonl")], env).returncode == 4
    assert _cli(["run", str(jobs)], _env(srv)).returncode == 2  # click's usage error: -o missing


# --- 12.13: a batch nobody serves -------------------------------------------------------------

def test_unserved_watch_says_it_once_per_stretch():
    from batchrun.ops.collect import UnservedWatch

    now = [0.0]
    watch = UnservedWatch(after=10, clock=lambda: now[0])
    idle = {"done": 0, "failed": 0, "in_flight": 0, "queued": 5}
    said = []
    for t in range(0, 40):
        now[0] = float(t)
        said.append(watch.update(idle))
    assert [t for t, s in enumerate(said) if s is not None] == [10]
    now[0] = 41.0
    assert watch.update({**idle, "done": 1}) is None  # a job ended: served again
    for t in range(42, 60):
        now[0] = float(t)
        if watch.update({**idle, "done": 1}) is not None:
            assert t == 52
            break
    else:
        pytest.fail("the second stretch was not told")
    waiting = UnservedWatch(after=0, clock=lambda: now[0])
    assert waiting.update({**idle, "queued": 0}) is None  # retries waiting: not unserved


def test_collect_follow_says_no_worker_serves_the_batch_and_the_printed_worker_command_finishes_it(
        real_redis_url, spawn, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 30)
    out = tmp_path / "r.jsonl"
    with MockServerThread(MockConfig()) as srv:
        env = _env(srv, {"BATCHRUN_REDIS_URL": real_redis_url, "BATCHRUN_UNSERVED_SECONDS": "2"})
        assert _cli(["submit", str(jobs), "--batch-id", "lonely"], env).returncode == 0
        follow = spawn(batchrun_cmd("collect", "lonely", "-o", str(out), "--follow"), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        said = ""
        deadline = time.monotonic() + 30
        while "no worker has taken" not in said:
            assert time.monotonic() < deadline, said
            said += follow.stderr.readline()
        line = [x for x in said.splitlines() if "no worker has taken" in x][0]
        assert "batch lonely's work for" in line
        command = shlex.split(line.split("start one with: ", 1)[1].split(" (", 1)[0])
        assert command[:2] == ["batchrun", "worker"]
        worker = spawn(batchrun_cmd(*command[1:], "--burst"), env=env)
        assert worker.wait(timeout=60) == 0
        stdout, _ = follow.communicate(timeout=60)
        assert follow.returncode == 0, stdout
    check_exactly_once(jobs, out, tmp_path / "r.errors.jsonl")


def test_status_says_no_worker_serves_a_batch(real_redis_url, tmp_path):
    import redis

    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    assert _cli(["submit", str(jobs), "--batch-id", "idle"], env).returncode == 0
    conn = redis.Redis.from_url(real_redis_url)
    conn.hset("batchrun:batch:idle", "created", int(conn.time()[0]) - 120)  # submitted two minutes ago
    proc = _cli(["status", "idle"], env)
    assert proc.returncode == 0
    assert "no worker has taken batch idle's work for" in proc.stdout and "batchrun worker" in proc.stdout


# --- 12.14: retry summaries without -v --------------------------------------------------------

@pytest.mark.parametrize("kind", ["memory", "url"])
def test_run_shows_the_retry_summaries_by_default(kind, real_redis_url, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 4)
    throttled = Reply(429, {"retry-after-ms": "200"}, rate_limit_body("200ms"))
    args = ["--redis-url", real_redis_url] if kind == "url" else []
    with HostileServer([throttled, throttled, throttled, ok()]) as srv:
        proc = _cli(["run", str(jobs), "-o", str(tmp_path / "r.jsonl"), "--backoff-base", "0.1", *args], _env(srv))
    assert proc.returncode == 0, proc.stderr
    assert "rate limited (TPM): " in proc.stderr and "job(s) requeued, next retry in" in proc.stderr, proc.stderr
    assert "started (concurrency" not in proc.stderr  # the other worker lines stay quiet
    assert "Listening on" not in proc.stderr  # and RQ's


@pytest.mark.parametrize("kind", ["url", "env"])
def test_a_pause_on_a_real_redis_prints_a_command_that_continues_it_when_pasted(kind, real_redis_url, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 6)
    out = tmp_path / "r.jsonl"
    quota = Reply(429, {}, error_body("You exceeded your current quota.", "insufficient_quota",
                                      "insufficient_quota"))
    billing_fixed = []
    with HostileServer(lambda seen: ok() if billing_fixed else quota) as srv:
        extra = {"BATCHRUN_REDIS_URL": real_redis_url} if kind == "env" else {}
        args = ["--redis-url", real_redis_url] if kind == "url" else []
        proc = _cli(["run", str(jobs), "-o", str(out), *args], _env(srv, extra))
        assert proc.returncode == 4, proc.stderr
        assert "batchrun resume batch-" not in proc.stderr, proc.stderr  # no worker would serve it
        command = _printed_command(proc.stderr)
        assert command[0] == "run" and ("--redis-url" in command) == (kind == "url")
        billing_fixed.append(True)
        pasted = _cli(command, _env(srv, extra))
        assert pasted.returncode == 0, pasted.stderr
    assert sorted(r["custom_id"] for r in read_lines(out)) == sorted(f"req-{i}" for i in range(6))
    assert not read_lines(tmp_path / "r.errors.jsonl")


def test_collect_says_which_paid_answers_it_could_not_write(real_redis_url, tmp_path):
    import redis

    from batchrun.files.outputs import result_line
    from batchrun.state.store import BatchStore

    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    store = BatchStore(redis.Redis.from_url(real_redis_url))
    out = tmp_path / "r.jsonl"
    for bid in ("first", "second"):
        assert _cli(["submit", str(jobs), "--batch-id", bid], env).returncode == 0
        store.complete(bid, [("R", f"req-{i}", json.dumps(result_line(f"req-{i}", status_code=200, request_id=None,
                                                                      body={"batch": bid})))
                             for i in range(3)])
        proc = _cli(["collect", bid, "-o", str(out)], env)
        assert proc.returncode == 0, proc.stderr
    assert "3 outcome(s) of batch second were not written" in proc.stderr
    assert [r["response"]["body"]["batch"] for r in read_lines(out)] == ["first"] * 3


# --- first-hour review: a killed `run` ----------------------------------------------------------

def _settle(srv, quiet: float = 2.0, limit: float = 60) -> int:
    """The server's request count once it has stopped growing for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    last, since = srv.stats()["requests"], time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "requests still arrive: a worker goes on sending"
        time.sleep(0.2)
        now = srv.stats()["requests"]
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_a_killed_run_on_a_real_redis_stops_its_workers_and_the_same_command_continues_its_batch(
        real_redis_url, spawn, tmp_path):
    n = 300
    jobs = write_jobs(tmp_path / "jobs.jsonl", n)
    out = tmp_path / "results.jsonl"
    command = ["run", str(jobs), "-o", str(out), "--concurrency", "5", "--grace", "5", "--redis-url", real_redis_url]
    with MockServerThread(MockConfig(latency_ms=100)) as srv:
        env = _env(srv)
        run = spawn(batchrun_cmd(*command), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while _lines(out) < 30:
            assert time.monotonic() < deadline and run.poll() is None
            time.sleep(0.05)
        os.kill(run.pid, signal.SIGKILL)  # `run` only: its workers are in sessions of their own
        run.wait(timeout=10)
        stopped = _settle(srv)
        assert stopped < n, "the killed run's workers went on sending its whole batch"
        settings = json.loads((tmp_path / "results.batchrun.json").read_text())
        again = _cli(command, env)
        assert again.returncode == 0, again.stderr
        assert f"continuing batch {settings['batch_id']}" in again.stderr
        sent = srv.stats()["requests"]
    check_exactly_once(jobs, out, tmp_path / "results.errors.jsonl")
    assert sent == n, f"{sent - n} request(s) paid twice after the kill"


def test_a_refused_run_leaves_no_settings_file_for_a_resume_to_take(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 3)
    out = tmp_path / "o.jsonl"
    with MockServerThread(MockConfig()) as srv:
        proc = _cli(["run", str(jobs), "-o", str(out), "--tpm", "gpt-9=1000"], _env(srv))
        assert proc.returncode == 1 and "nothing was submitted" in proc.stderr, proc.stderr
        assert srv.stats()["requests"] == 0
    assert not (tmp_path / "o.batchrun.json").exists(), "a run that submitted nothing saved its settings"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_run_writes_every_paid_answer_counts_them_and_prints_the_continue_command(sig, tmp_path):
    """SIGTERM (timeout, CI, docker stop) stops `run` as the first Ctrl-C does, and the summary
    counts every line written, also those of the collect the signal cut short."""
    n = 400
    jobs = write_jobs(tmp_path / "jobs.jsonl", n)
    out = tmp_path / "results.jsonl"
    with MockServerThread(MockConfig(latency_ms=100)) as srv:
        run = subprocess.Popen(batchrun_cmd("run", str(jobs), "-o", str(out), "--concurrency", "5"),
                               env=_env(srv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while _lines(out) < 40:
                assert time.monotonic() < deadline and run.poll() is None
                time.sleep(0.05)
            run.send_signal(sig)
            stdout, stderr = run.communicate(timeout=60)
        finally:
            run.kill()
        sent = srv.stats()["requests"]
    assert run.returncode == 130, stderr
    assert "to finish the batch: batchrun resume" in stderr
    results, errors = _lines(out), _lines(tmp_path / "results.errors.jsonl")
    assert 40 <= results < n
    assert f"{results} result(s) written to {out}, {errors} error(s)" in stderr, stderr
    assert sent == results + errors, f"{sent - results - errors} paid answer(s) not written"


@pytest.mark.parametrize("verbosity", ["-q", "-v"])
def test_under_q_or_v_a_pause_on_the_in_process_redis_prints_only_commands_that_work_there(verbosity, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 6)
    out = tmp_path / "r.jsonl"
    quota = Reply(429, {}, error_body("You exceeded your current quota.", "insufficient_quota",
                                      "insufficient_quota"))
    with HostileServer([quota]) as srv:
        proc = _cli(["run", str(jobs), "-o", str(out), verbosity], _env(srv))
    assert proc.returncode == 4, proc.stderr
    assert "batchrun resume batch-" not in proc.stderr, proc.stderr
    assert f"then run `batchrun resume {jobs} -o {out}`" in proc.stderr, proc.stderr


@pytest.mark.parametrize("how", ["hard link", "copy"])
def test_run_onto_a_hard_link_or_a_copy_of_its_jobs_file_is_refused(how, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    out = tmp_path / "out.jsonl"
    os.link(jobs, out) if how == "hard link" else out.write_bytes(jobs.read_bytes())
    with MockServerThread(MockConfig()) as srv:
        proc = _cli(["run", str(jobs), "-o", str(out)], _env(srv))
        assert srv.stats()["requests"] == 0
    assert proc.returncode == 1, proc.stderr
    assert "were there already" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    if how == "hard link":
        assert f"-o {out} is the jobs file itself" in proc.stderr
    else:
        assert f"{out}, line 1: not a result line (no response or error; it is a job line" in proc.stderr
    assert out.read_bytes() == jobs.read_bytes()


def test_under_q_a_rerun_onto_a_complete_output_says_nothing_but_its_summary(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 4)
    out = tmp_path / "q.jsonl"
    with MockServerThread(MockConfig()) as srv:
        first = _cli(["run", str(jobs), "-o", str(out)], _env(srv))
        assert first.returncode == 0, first.stderr
        again = _cli(["run", str(jobs), "-o", str(out), "-q"], _env(srv))
        assert srv.stats()["requests"] == 4
    assert again.returncode == 0, again.stderr
    assert "are not sent again" not in again.stderr, again.stderr
    assert "4 job(s) were there already" in again.stdout
