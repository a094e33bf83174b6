"""Every wait is bounded, nothing runs for ever: long server hints, a server that is down, Ctrl-C, a
base URL without /v1. Against the hostile server (tests/hostile.py) and through the real command."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import types
from email.utils import formatdate

import openai
import pytest
import redis

from batchrun.settings import BatchOptions, CircuitPolicy, WorkerSettings
from batchrun.runner.shard import outage_cause, v1_suggestion
from batchrun.ops.submit import submit_file
from tests.helpers import batchrun_cmd, cli_env, read_lines, run_thread_worker, write_jobs
from tests.hostile import HostileServer, Reply, closed_port, error_body, ok, sse

TPD = ("Rate limit reached for gpt-4o-mini in organization org-x on tokens per day (TPD): Limit 2000000, "
       "Used 2000000, Requested 20.")
TPM = ("Rate limit reached for gpt-4o-mini in organization org-x on tokens per min (TPM): Limit 1000, "
       "Used 1000, Requested 20.")


def _far_future() -> str:
    return formatdate(time.time() + 10 * 365 * 86400, usegmt=True)


def _settings(url: str, **kw) -> WorkerSettings:
    return WorkerSettings(base_url=url, api_key="sk-test", concurrency=kw.pop("concurrency", 10), **kw)


# --- a server's wait hint is honoured up to the cap, no further ----------------------------------


@pytest.mark.parametrize("headers, asked", [
    ({"retry-after": "86400"}, "24 h 0 min"),
    ({"retry-after-ms": "86400000"}, "24 h 0 min"),
    ({"retry-after": "far future"}, " h "),
])
def test_a_day_long_hint_on_a_server_error_retries_within_the_cap_and_says_so(store, tmp_path, caplog, headers,
                                                                             asked):
    if headers.get("retry-after") == "far future":
        headers = {"retry-after": _far_future()}
    jobs = write_jobs(tmp_path / "jobs.jsonl", 1)
    with HostileServer([Reply(503, headers, error_body("overloaded", "server_error")), ok()]) as srv:
        rep = submit_file(store, str(jobs), options=BatchOptions(backoff_base=0.05, backoff_cap=1.0))
        with caplog.at_level(logging.INFO, logger="batchrun.worker"):
            run_thread_worker(store.redis, _settings(srv.base_url), timeout=30)
        seen = list(srv.requests)
    assert store.meta(rep.batch_id)["state"] == "finished"
    assert store.counts(rep.batch_id)["done"] == 1
    assert len(seen) == 2 and seen[1].at - seen[0].at < 3.0  # the 1 s cap (and a little scheduling), not a day
    capped = [r.getMessage() for r in caplog.records if "capped at --backoff-cap" in r.getMessage()]
    assert capped and "the server asked for" in capped[0] and asked in capped[0], capped


@pytest.mark.parametrize("headers, message, asked", [
    ({}, TPD + " Please try again in 7h12m0s.", "7 h 12 min"),
    ({"retry-after": "86400"}, TPM, "24 h 0 min"),
    ({"retry-after": "far future"}, TPM, " h "),
    ({"x-ratelimit-reset-tokens": "24h0m0s", "x-ratelimit-remaining-tokens": "0"}, TPD, "24 h 0 min"),
])
def test_a_429_asking_for_longer_than_the_cap_pauses_the_batch_and_fails_no_job(store, tmp_path, headers, message,
                                                                                asked):
    if headers.get("retry-after") == "far future":
        headers = {"retry-after": _far_future()}
    jobs = write_jobs(tmp_path / "jobs.jsonl", 20)
    body = error_body(message, "tokens", "rate_limit_exceeded")
    with HostileServer(lambda seen: Reply(429, headers, body)) as srv:
        rep = submit_file(store, str(jobs), options=BatchOptions(backoff_cap=2.0))
        started = time.monotonic()
        run_thread_worker(store.redis, _settings(srv.base_url, concurrency=5), timeout=60)  # burst: it ends
        took = time.monotonic() - started
        sent = len(srv.requests)
    meta = store.meta(rep.batch_id)
    assert meta["state"] == "paused", meta.get("reason")
    reason = meta["reason"]
    assert "the server asks to wait" in reason and asked in reason
    assert "longer than the --backoff-cap of 2 s" in reason and "no job failed" in reason
    assert "Please try again" in reason or "Rate limit reached" in reason  # what the server said
    assert f"batchrun resume {rep.batch_id}" in reason
    assert store.counts(rep.batch_id)["failed"] == 0
    assert not store.redis.hgetall(f"batchrun:batch:{rep.batch_id}:attempts"), "a pause burns no attempt"
    assert sent <= 20 and took < 30
    # The fleet holds off for the cap at most, not for the day the server asked for.
    assert all(c["seconds_left"] <= 2.0 for c in store.fleet_conditions()["cooldowns"])


# --- a server that does not come back pauses the batch -------------------------------------------


@pytest.mark.parametrize("server", ["closed port", "always 500"])
def test_a_server_that_is_down_pauses_the_batch_after_the_give_up_time(store, tmp_path, server):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 20)
    with HostileServer(lambda seen: Reply(500, {}, error_body("boom", "server_error"))) as srv:
        url = srv.base_url if server == "always 500" else f"http://127.0.0.1:{closed_port()}/v1"
        rep = submit_file(store, str(jobs), options=BatchOptions(give_up_seconds=2.0))
        started = time.monotonic()
        run_thread_worker(store.redis, _settings(url), timeout=60)  # a burst worker that ends by itself
        took = time.monotonic() - started
    meta = store.meta(rep.batch_id)
    assert meta["state"] == "paused"
    reason = meta["reason"]
    assert url in reason and "--give-up-after 2 s" in reason and f"batchrun resume {rep.batch_id}" in reason
    assert ("connection refused" if server == "closed port" else "HTTP 500") in reason
    assert store.counts(rep.batch_id)["failed"] == 0
    assert 2.0 <= took < 15


def test_a_resumed_batch_gets_a_full_give_up_period_again(store, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    # Short cooling periods: the circuit is still open from the first run, and the default 5 s
    # doubling after each failed probe would only delay the resumed run's probes.
    quick_circuit = CircuitPolicy(first_cooling_ms=500, max_cooling_ms=1_000)
    rep = submit_file(store, str(jobs), options=BatchOptions(give_up_seconds=2.0))
    run_thread_worker(store.redis, _settings(url, circuit=quick_circuit), timeout=60)
    assert store.meta(rep.batch_id)["state"] == "paused"
    store.resume(rep.batch_id)  # the endpoint is still down since the first run
    started = time.monotonic()
    run_thread_worker(store.redis, _settings(url, circuit=quick_circuit), timeout=60)
    assert store.meta(rep.batch_id)["state"] == "paused"
    assert time.monotonic() - started >= 2.0, "a resumed batch paused at once, without trying for its period"


def _jobs_and_env(tmp_path, base_url: str, n: int = 20, **extra: str):
    jobs = write_jobs(tmp_path / "jobs.jsonl", n)
    env = cli_env(OPENAI_BASE_URL=base_url, OPENAI_API_KEY="sk-test", **extra)
    env.pop("BATCHRUN_REDIS_URL", None)
    return jobs, env


def test_run_against_a_closed_port_pauses_says_why_and_exits_non_zero(tmp_path):
    port = closed_port()
    jobs, env = _jobs_and_env(tmp_path, f"http://127.0.0.1:{port}/v1")
    started = time.monotonic()
    proc = subprocess.run(batchrun_cmd("run", str(jobs), "-o", str(tmp_path / "out.jsonl"), "--give-up-after", "3",
                                       "--concurrency", "10"), env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 4, proc.stderr  # paused (batchrun.exitcodes.Exit.NOT_FINISHED)
    err = proc.stderr
    assert f"127.0.0.1:{port}" in err and "connection refused" in err and "has not answered for" in err
    assert "to finish the batch: batchrun resume" in err
    assert "Traceback" not in err
    assert took < 60
    circuit_lines = [line for line in err.splitlines() if "circuit open" in line and "WARNING" in line]
    assert all("(connection refused)" in line for line in circuit_lines)
    assert len(circuit_lines) <= took / 5 + 2, "one circuit line per period, not a flood"
    assert not read_lines(tmp_path / "out.errors.jsonl"), "no job failed"


@pytest.mark.redis
def test_worker_burst_exits_when_the_server_only_answers_500(real_redis_url, tmp_path):
    with HostileServer(lambda seen: Reply(500, {}, error_body("boom", "server_error"))) as srv:
        jobs, env = _jobs_and_env(tmp_path, srv.base_url, BATCHRUN_REDIS_URL=real_redis_url)
        env["BATCHRUN_REDIS_URL"] = real_redis_url
        sub = subprocess.run(batchrun_cmd("submit", str(jobs), "--give-up-after", "3"), env=env,
                             capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0, sub.stderr
        batch_id = sub.stdout.split()[-1]
        started = time.monotonic()
        worker = subprocess.run(batchrun_cmd("worker", "--burst", "--concurrency", "10"), env=env,
                                capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
    assert worker.returncode == 0, worker.stderr
    assert took < 60
    conn = redis.Redis.from_url(real_redis_url)
    meta = {k.decode(): v.decode() for k, v in conn.hgetall(f"batchrun:batch:{batch_id}").items()}
    assert meta["state"] == "paused" and "HTTP 500" in meta["reason"] and srv.base_url in meta["reason"]
    assert meta["failed"] == "0"
    assert "paused" in worker.stderr and "HTTP 500" in worker.stderr


# --- Ctrl-C waits only for requests on the wire ------------------------------------------------


def test_ctrl_c_while_the_circuit_is_open_does_not_wait_the_grace(spawn, tmp_path):
    jobs, env = _jobs_and_env(tmp_path, f"http://127.0.0.1:{closed_port()}/v1")
    errors = open(tmp_path / "stderr.txt", "w+")
    run = spawn(batchrun_cmd("run", str(jobs), "-o", str(tmp_path / "out.jsonl"), "--grace", "30",
                             "--concurrency", "10"), env=env, stdout=subprocess.DEVNULL, stderr=errors)
    # Once the file is in (the first progress line), the first requests fail at once and open the
    # circuit; the jobs wait for it. (A fixed sleep met a slow start-up on a loaded machine.)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and run.poll() is None:
        errors.seek(0)
        if "progress:" in errors.read():
            break
        time.sleep(0.1)
    time.sleep(1)
    assert run.poll() is None
    stopped_at = time.monotonic()
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(timeout=60) == 130
    assert time.monotonic() - stopped_at < 10, "Ctrl-C waited the grace for requests that were not sent"
    errors.seek(0)
    assert "to finish the batch: batchrun resume" in errors.read()


# `batchrun` whose main thread gets a Ctrl-C (SIGINT) in the middle of a transaction on the
# in-process Redis (after its MULTI, before its EXEC): the first one it sends a second after its
# first progress line, while the circuit is open. Under load a real Ctrl-C lands there now and then
# (the main thread reads the batch's counts in transactions every second); raised in there, it
# left the shared connection inside the transaction, every later command on it answered QUEUED or
# with another command's reply, and the run ended in a traceback, at times after 60 s and more.
_CUT_IN_A_TRANSACTION = """
import os, signal, sys, threading, time
from fakeredis._socket._base import BaseFakeSocket
from batchrun.ops import progress
from batchrun.cli.main import main

armed_at = []
update = progress.Progress.update
def update_then_arm(self, force=False):
    update(self, force)
    if self._last_plain and not armed_at:
        armed_at.append(time.monotonic() + 1)
progress.Progress.update = update_then_arm
process = BaseFakeSocket._process_command
def process_or_cut(sock, fields):
    if armed_at and time.monotonic() >= armed_at[0] and getattr(sock, "_queueing", False) \\
            and threading.current_thread() is threading.main_thread():
        armed_at[0] = float("inf")
        print("cut: between MULTI and EXEC", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGINT)  # its handler runs at the next bytecode: in the fake server
    return process(sock, fields)
BaseFakeSocket._process_command = process_or_cut
main(sys.argv[1:], prog_name="batchrun")
"""


def test_ctrl_c_in_the_middle_of_an_in_process_redis_transaction_still_ends_the_run_within_seconds(spawn,
                                                                                                    tmp_path):
    jobs, env = _jobs_and_env(tmp_path, f"http://127.0.0.1:{closed_port()}/v1")
    errors = open(tmp_path / "stderr.txt", "w+")
    run = spawn([sys.executable, "-c", _CUT_IN_A_TRANSACTION, "run", str(jobs), "-o", str(tmp_path / "out.jsonl"), "--grace", "30",
                 "--concurrency", "10"], env=env, stdout=subprocess.DEVNULL, stderr=errors)
    cut_at = None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and run.poll() is None and cut_at is None:
        errors.seek(0)
        if "cut: between MULTI and EXEC" in errors.read():
            cut_at = time.monotonic()
        time.sleep(0.1)
    errors.seek(0)
    assert cut_at is not None, errors.read()
    code = run.wait(timeout=60)
    errors.seek(0)
    err = errors.read()
    assert code == 130, err
    assert time.monotonic() - cut_at < 10, "the run's runners went on after the Ctrl-C"
    assert "to finish the batch: batchrun resume" in err and "Traceback" not in err, err


# Where a Ctrl-C can land in a transaction (MULTI, GET, GET, EXEC) on the in-process Redis, whose
# server side runs in the interrupted thread: ("send", n) before the n-th command is carried out,
# ("read", n) as the n-th reply is read (taken from the socket, n > 0), or before any (n = 0).
@pytest.mark.parametrize("where, n", [("send", 2), ("send", 3), ("send", 4), ("read", 0), ("read", 1),
                                      ("read", 3)])
def test_a_ctrl_c_inside_a_transaction_leaves_the_in_process_redis_answering_each_command_its_own_reply(
        monkeypatch, where, n):
    from fakeredis._socket._base import BaseFakeSocket

    from batchrun.state.connections import _direct_connection_class, connect

    client = connect(f"memory://ctrl-c-in-a-transaction-{where}-{n}")
    client.hset("h", "f", "v")
    direct = _direct_connection_class()
    process, read, seen = BaseFakeSocket._process_command, direct.read_response, []

    def process_or_cut(sock, fields):
        seen.append(fields[0].upper())
        if len(seen) == n:
            raise KeyboardInterrupt  # as a Ctrl-C landing here, in the main thread, would
        return process(sock, fields)

    def read_or_cut(conn, *args, **kwargs):
        seen.append("read")
        if len(seen) == max(n, 1):
            if n:
                conn._sock.responses.get()  # the reply is taken, the Ctrl-C lands before it is returned
            raise KeyboardInterrupt
        return read(conn, *args, **kwargs)

    if where == "send":
        monkeypatch.setattr(BaseFakeSocket, "_process_command", process_or_cut)
    else:
        monkeypatch.setattr(direct, "read_response", read_or_cut)
    with pytest.raises(KeyboardInterrupt):
        client.pipeline().get("a").get("a").execute()
    monkeypatch.undo()
    # (the pool hands out first the connection used last: the one the cut left behind, if kept)
    assert client.hgetall("h") == {b"f": b"v"}
    assert client.get("a") is None
    assert client.pipeline().hget("h", "f").get("a").execute() == [b"v", None]


def test_a_ctrl_c_at_the_entry_of_a_lock_release_in_the_in_process_redis_leaves_no_lock_held():
    """The fake server runs in the calling thread, under Python-level locks (the Conditions of its
    queues and events). A KeyboardInterrupt raised as one's ``__exit__`` begins (where the
    interpreter may run a signal handler) left the lock held for good: the next command waited on
    it for ever (in the fuzzing of `run`, 457 s until another signal). In `run`, whose handler this
    is, the interrupt waits for the call to the in-process Redis to end."""
    from batchrun.state.connections import connect, interrupt_unless_in_redis

    client = connect(f"memory://ctrl-c-at-a-lock-release-{os.getpid()}")
    client.set("a", "1")
    release, held = threading.Condition.__exit__.__code__, []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is release and not held and frame.f_back.f_code.co_name == "set":
            held.append(frame.f_locals["self"])  # the Condition of the socket's response_ready Event
            sys.settrace(None)
            signal.getsignal(signal.SIGINT)(signal.SIGINT, frame)  # the handler, run where the interpreter may
        return tracer

    def hung(signum, frame):
        raise TimeoutError("the call waits for a lock the interrupt left held")

    before, alarm = signal.signal(signal.SIGINT, interrupt_unless_in_redis), signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 5)
    try:
        sys.settrace(tracer)
        with pytest.raises(KeyboardInterrupt):
            client.get("a")
    finally:
        sys.settrace(None)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGINT, before)
        signal.signal(signal.SIGALRM, alarm)
    assert held and not held[0]._lock.locked()
    assert client.get("a") == b"1"


# `batchrun` on a real Redis whose main thread gets a real Ctrl-C (SIGINT) just after it sent a
# command, before it reads the reply (the first one it sends a moment after its first progress
# line). redis-py gave the connection back to the pool with the reply unread and, its maintenance
# notifications "auto", handed it out again unchecked: every later command read the reply of the one
# before, and the run ended in a traceback (an HGETALL answered with an LRANGE's list), exit 1.
_CUT_BEFORE_A_READ = """
import os, signal, sys, threading, time
import redis.connection
from batchrun.ops import progress
from batchrun.cli.main import main

armed_at = []
update = progress.Progress.update
def update_then_arm(self, force=False):
    update(self, force)
    if self._last_plain and not armed_at:
        armed_at.append(time.monotonic() + 0.2)
progress.Progress.update = update_then_arm
send = redis.connection.AbstractConnection.send_command
def send_then_cut(conn, *args, **kwargs):
    send(conn, *args, **kwargs)
    if armed_at and time.monotonic() >= armed_at[0] and threading.current_thread() is threading.main_thread():
        armed_at[0] = float("inf")
        print("cut: between a send and its read", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGINT)  # its handler runs at the next bytecode: before the read
redis.connection.AbstractConnection.send_command = send_then_cut
main(sys.argv[1:], prog_name="batchrun")
"""


@pytest.mark.redis
def test_a_ctrl_c_between_a_send_and_its_read_on_a_real_redis_still_ends_run_saying_how_to_continue(
        real_redis_url, tmp_path):
    jobs, env = _jobs_and_env(tmp_path, f"http://127.0.0.1:{closed_port()}/v1")
    proc = subprocess.run([sys.executable, "-c", _CUT_BEFORE_A_READ, "run", str(jobs), "-o", str(tmp_path / "out.jsonl"),
                           "--redis-url", real_redis_url, "--grace", "5", "--concurrency", "10"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert "cut: between a send and its read" in proc.stderr, proc.stderr
    assert proc.returncode == 130, proc.stderr
    assert "to finish the batch: batchrun run" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.redis
def test_after_an_interrupt_a_real_redis_client_reads_each_commands_own_reply(real_redis_url, monkeypatch):
    from batchrun.state.connections import after_interrupt, connect

    client = connect(real_redis_url)
    client.hset("h", "f", "v")
    send = redis.connection.AbstractConnection.send_command

    def send_then_cut(conn, *args, **kwargs):
        send(conn, *args, **kwargs)
        raise KeyboardInterrupt  # as a Ctrl-C landing before the read would

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_command", send_then_cut)
    with pytest.raises(KeyboardInterrupt):
        client.lrange("l", 0, -1)
    monkeypatch.undo()
    after_interrupt(client)
    assert client.hgetall("h") == {b"f": b"v"}
    assert client.lrange("l", 0, -1) == []
    client.close()


def test_a_ctrl_c_while_a_paused_run_waits_for_its_requests_in_flight_stops_as_any_other(tmp_path, monkeypatch):
    """A pause (quota, the cap) waits for the requests on the wire, up to the request timeout. A Ctrl-C
    then escaped `run` with no summary and no command to continue ('batchrun: interrupted' alone)."""
    from batchrun.api.batch import RunConfig, run_batch
    from batchrun.ops.local_workers import LocalWorkers

    def script(seen):
        if seen.body["messages"][-1]["content"].endswith(" 0."):
            return Reply(429, {}, error_body("You exceeded your current quota.", "insufficient_quota",
                                             "insufficient_quota"))
        return Reply(200, {}, ok().body, delay=30)  # on the wire as the batch pauses

    stop, stops = LocalWorkers.stop, []

    def stop_then_ctrl_c(workers):
        if not stops:  # the pause's wait, not the halt's
            stops.append(time.monotonic())
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        stop(workers)

    monkeypatch.setattr(LocalWorkers, "stop", stop_then_ctrl_c)
    lines = []
    out = type("Out", (), {"result": lambda self, line: lines.append(line),
                           "warn": lambda self, line: lines.append(line), "note": lambda self, line: None,
                           "progress": lambda self, *a: types.SimpleNamespace(update=lambda: None,
                                                                             close=lambda: None)})()
    with HostileServer(script) as server:
        cfg = RunConfig(jobs=str(write_jobs(tmp_path / "jobs.jsonl", 5)), output=str(tmp_path / "out.jsonl"),
                        errors=None, redis_url=f"memory://paused-then-ctrl-c-{os.getpid()}-{time.monotonic_ns()}",
                        batch_id=None, endpoint="/v1/chat/completions", skip_invalid=False,
                        options=BatchOptions(), concurrency=10, processes=1, mock=False, grace=0.5,
                        base_url=server.base_url, api_key="sk-test")
        try:
            end = run_batch(cfg, out)
        except KeyboardInterrupt:
            pytest.fail("the Ctrl-C escaped run: no summary, no command to continue")
    assert stops, "the batch did not pause"
    assert end.interrupted and end.exit_code == 130
    assert time.monotonic() - stops[0] < 10
    text = "\n".join(lines)
    assert "interrupted: requests in flight" in text and "to finish the batch: batchrun resume" in text, text


def test_a_ctrl_c_as_the_wait_for_a_worker_thread_returns_leaves_the_halt_after_it_bounded():
    """`run` waits for its worker thread's end (a pause's wind-down, the grace after a Ctrl-C). A Ctrl-C
    landing as Event.wait returned (at the entry of its Condition's ``__exit__``, where the interpreter
    may run a signal handler) left the Event's lock held by the main thread: the halt that follows
    the interrupt waited on it for ever, and so did the thread's own end."""
    from batchrun.ops.local_workers import LocalWorkers

    workers = LocalWorkers(grace=0.2)
    ended, thread_done = threading.Event(), threading.Event()
    workers.ended.append(ended)
    release, cut = threading.Condition.__exit__.__code__, []

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is release and not cut and frame.f_back.f_code.co_name == "wait":
            cut.append(frame.f_locals["self"])
            sys.settrace(None)
            signal.default_int_handler(signal.SIGINT, frame)  # a Ctrl-C, where the interpreter may take it
        return tracer

    def hung(signum, frame):
        raise TimeoutError("the halt waits for a lock the interrupt left held")

    def worker_thread():
        time.sleep(0.5)
        ended.set()
        thread_done.set()

    threading.Thread(target=worker_thread, daemon=True).start()
    alarm = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, 4)
    try:
        sys.settrace(tracer)
        try:
            workers.stop()  # the wait times out (grace + 30 s cut short by the Ctrl-C) or sees the end
        except KeyboardInterrupt:
            pass
        sys.settrace(None)
        workers.halt()  # as _interrupted does after the Ctrl-C
        assert thread_done.wait(2), "the worker thread's end waits for a lock the interrupt left held"
    finally:
        sys.settrace(None)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm)


def test_a_double_tap_of_ctrl_c_stops_run_at_once_even_as_the_display_closes(tmp_path):
    """The second Ctrl-C of a quick double tap lands as the progress display writes its last line
    (it reads the batch's counts). It escaped `run` there: no summary, no command to continue, and
    the halt on the way out waited the grace for the requests on the wire instead of stopping at once."""
    from batchrun.api.batch import RunConfig, run_batch

    class Display:
        def __init__(self, store, batch_id, total):
            self.store, self.batch_id, self.closes = store, batch_id, 0

        def update(self):
            if self.store.counts(self.batch_id)["in_flight"] and not hasattr(self, "first_at"):
                self.first_at = time.monotonic()
                raise KeyboardInterrupt  # the first Ctrl-C

        def close(self):
            self.closes += 1
            if self.closes == 1 and hasattr(self, "first_at"):
                raise KeyboardInterrupt  # the second, as the last line is written

    displays, lines = [], []
    out = type("Out", (), {"result": lambda self, line: lines.append(line),
                           "warn": lambda self, line: lines.append(line), "note": lambda self, line: None,
                           "progress": lambda self, *a: displays.append(Display(*a)) or displays[-1]})()
    with HostileServer(lambda seen: Reply(200, {}, ok().body, delay=30)) as server:
        cfg = RunConfig(jobs=str(write_jobs(tmp_path / "jobs.jsonl", 5)), output=str(tmp_path / "out.jsonl"),
                        errors=None, redis_url=f"memory://double-tap-{os.getpid()}-{time.monotonic_ns()}",
                        batch_id=None, endpoint="/v1/chat/completions", skip_invalid=False,
                        options=BatchOptions(), concurrency=10, processes=1, mock=False, grace=3,
                        base_url=server.base_url, api_key="sk-test")
        try:
            end = run_batch(cfg, out)
        except KeyboardInterrupt:
            pytest.fail("the second Ctrl-C escaped run: no summary, no command to continue")
    assert end.interrupted and end.exit_code == 130
    assert time.monotonic() - displays[0].first_at < 2.5, "the second Ctrl-C waited the grace"
    text = "\n".join(lines)
    assert "stopped at once" in text and "to finish the batch: batchrun" in text, text


@pytest.mark.redis
def test_a_ctrl_c_once_worker_processes_started_does_not_say_no_job_was_sent(real_redis_url, tmp_path, monkeypatch):
    from batchrun.api.batch import RunConfig, run_batch
    from batchrun.ops import local_workers

    def start_then_ctrl_c(workers, *args, **kwargs):
        # a worker process that sends (here: one that just runs until stopped), then the Ctrl-C
        workers.procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                              start_new_session=True))
        raise KeyboardInterrupt

    monkeypatch.setattr(local_workers, "start_processes", start_then_ctrl_c)
    lines = []
    out = type("Out", (), {"result": lambda self, line: lines.append(line),
                           "warn": lambda self, line: lines.append(line), "note": lambda self, line: None,
                           "progress": lambda self, *a: None})()
    cfg = RunConfig(jobs=str(write_jobs(tmp_path / "jobs.jsonl", 3)), output=str(tmp_path / "out.jsonl"), errors=None,
                    redis_url=real_redis_url, batch_id=None, endpoint="/v1/chat/completions", skip_invalid=False,
                    options=BatchOptions(), concurrency=10, processes=1, mock=False, grace=1,
                    base_url=f"http://127.0.0.1:{closed_port()}/v1", api_key="sk-test")
    end = run_batch(cfg, out)
    text = "\n".join(lines)
    assert end.interrupted and end.exit_code == 130 and end.batch_id
    assert "no job was sent" not in text and "to finish the batch: batchrun" in text, text


def test_a_run_that_ends_on_an_error_stops_its_runners_at_once(tmp_path):
    """Not only Ctrl-C: however the run ends, its runners stop taking jobs (here they wait for an
    open circuit, which they would do for --give-up-after) rather than being waited for."""
    from batchrun.api.batch import RunConfig, run_batch

    class Broken(RuntimeError):
        pass

    class Display:
        def __init__(self, store, batch_id, total):
            self.store, self.batch_id = store, batch_id

        def update(self):
            if self.store.counts(self.batch_id)["in_flight"]:  # leased: sent, or waiting for the circuit
                self.broke_at = time.monotonic()
                raise Broken("the display broke")

        def close(self):
            pass

    displays = []
    out = type("Out", (), {"result": lambda self, line: None, "warn": lambda self, line: None,
                           "note": lambda self, line: None,
                           "progress": lambda self, *a: displays.append(Display(*a)) or displays[-1]})()
    jobs = write_jobs(tmp_path / "jobs.jsonl", 20)
    cfg = RunConfig(jobs=str(jobs), output=str(tmp_path / "out.jsonl"), errors=None,
                    redis_url=f"memory://ends-on-an-error-{os.getpid()}-{time.monotonic_ns()}", batch_id=None,
                    endpoint="/v1/chat/completions", skip_invalid=False, options=BatchOptions(), concurrency=10,
                    processes=1, mock=False, grace=30, base_url=f"http://127.0.0.1:{closed_port()}/v1",
                    api_key="sk-test")
    with pytest.raises(Broken):
        run_batch(cfg, out)
    assert time.monotonic() - displays[0].broke_at < 10, "the run waited grace + 30 s for runners that went on"


def test_a_yield_letting_granted_jobs_go_ends_on_its_runs_stop_not_only_the_processes():
    from batchrun.runner.shard import ShardRunner

    async def scenario():
        stop = threading.Event()
        waiting = asyncio.create_task(asyncio.sleep(60))  # a job whose budget is taken, waiting its turn
        runner = types.SimpleNamespace(stop=stop, inflight={"req-1": waiting}, _on_the_wire=set())
        asyncio.get_running_loop().call_later(0.2, stop.set)
        started = time.monotonic()
        await ShardRunner._let_granted_go(runner, 10)
        took = time.monotonic() - started
        await asyncio.gather(waiting, return_exceptions=True)
        return took, waiting.cancelled()

    took, cancelled = asyncio.run(scenario())
    assert took < 5 and cancelled


def test_a_stop_while_a_pause_winds_down_cuts_the_wait_for_the_wire_to_the_grace():
    from batchrun.runner.shard import ShardRunner

    async def scenario():
        stop = threading.Event()
        on_the_wire = asyncio.create_task(asyncio.sleep(60))
        runner = types.SimpleNamespace(stop=stop, inflight={"req-1": on_the_wire},
                                       settings=types.SimpleNamespace(grace_seconds=0.5))
        asyncio.get_running_loop().call_later(0.2, stop.set)
        started = time.monotonic()
        late = await ShardRunner._wait_in_flight(runner, 605)  # a pause's wait: the request timeout + 5
        took = time.monotonic() - started
        on_the_wire.cancel()
        return took, late == {on_the_wire}

    took, late = asyncio.run(scenario())
    assert took < 5 and late


# --- a base URL without /v1 ---------------------------------------------------------------------


def test_404s_from_a_base_url_without_v1_say_did_you_mean_v1_once(tmp_path):
    with HostileServer(lambda seen: Reply(404, {"content-type": "text/plain"}, "404: Not Found")) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        jobs, env = _jobs_and_env(tmp_path, base, n=8)
        proc = subprocess.run(batchrun_cmd("run", str(jobs), "-o", str(tmp_path / "out.jsonl")), env=env,
                              capture_output=True, text=True, timeout=120)
    sentence = f"did you mean OPENAI_BASE_URL={base}/v1?"
    assert proc.stderr.count(sentence) == 1, proc.stderr
    assert f"the base URL {base} has no /v1" in proc.stderr
    errors = read_lines(tmp_path / "out.errors.jsonl")
    assert len(errors) == 8 and all(sentence in e["error"]["message"] for e in errors)


def test_v1_suggestion():
    assert v1_suggestion("http://127.0.0.1:8000") == \
        "the base URL http://127.0.0.1:8000 has no /v1: did you mean OPENAI_BASE_URL=http://127.0.0.1:8000/v1?"
    assert v1_suggestion("http://127.0.0.1:8000/") is not None
    assert v1_suggestion("https://api.openai.com/v1") is None
    assert v1_suggestion("https://api.openai.com/v1/") is None
    assert v1_suggestion("https://x.openai.azure.com/openai/v1") is None
    assert v1_suggestion("https://x.openai.azure.com/openai/deployments/gpt4o/") is None
    masked = v1_suggestion("https://user:secret@gateway.example/openai")
    assert "secret" not in masked and "gateway.example/openai/v1?" in masked


# --- what the failure is, in a few words -------------------------------------------------------


def _chained(*excs: BaseException) -> BaseException:
    for outer, inner in zip(excs, excs[1:]):
        outer.__cause__ = inner
    return excs[0]


def test_outage_cause_names_the_failure():
    import aiohttp

    assert outage_cause("server_error", 503, None) == "HTTP 503"
    assert outage_cause("connection", None, _chained(RuntimeError("x"), ConnectionRefusedError(111, "no"))) \
        == "connection refused"
    assert outage_cause("connection", None, _chained(RuntimeError("x"), socket.gaierror(-2, "Name unknown"))) \
        == "DNS lookup failed"
    key = aiohttp.client_reqrep.ConnectionKey("h", 443, True, True, None, None, None)
    dns = aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name or service not known"))
    assert outage_cause("connection", None, _chained(RuntimeError("x"), dns)) == "DNS lookup failed"
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connect call failed"))
    assert outage_cause("connection", None, _chained(RuntimeError("x"), refused)) == "connection refused"
    assert outage_cause("connection", None, _chained(RuntimeError("x"), ssl.SSLError(1, "wrong version"))) \
        == "TLS failed"
    assert outage_cause("timeout", None, openai.APITimeoutError(request=None)) == "timed out"
    assert outage_cause("stream_broken", None, None) == "streams broke off"
    loop = RuntimeError("loop")
    loop.__cause__ = loop  # a cycle in the chain ends the walk
    assert outage_cause("connection", None, loop) == "connection failed"


def test_a_tls_failure_is_named_in_the_pause(store, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    with HostileServer([ok()]) as srv:  # plain HTTP: an https:// client's handshake fails
        url = f"https://127.0.0.1:{srv.port}/v1"
        rep = submit_file(store, str(jobs), options=BatchOptions(give_up_seconds=1.0))
        run_thread_worker(store.redis, _settings(url), timeout=60)
    reason = store.meta(rep.batch_id)["reason"]
    assert "TLS failed" in reason and url in reason


def test_a_cancel_stops_jobs_waiting_for_the_budget_before_they_are_sent(store, tmp_path):
    import threading

    jobs = write_jobs(tmp_path / "jobs.jsonl", 20)
    body = error_body(TPM + " Please try again in 20s.", "tokens", "rate_limit_exceeded")
    with HostileServer(lambda seen: Reply(429, {}, body)) as srv:
        rep = submit_file(store, str(jobs), options=BatchOptions())
        worker = threading.Thread(target=run_thread_worker, args=(store.redis, _settings(srv.base_url, concurrency=5)),
                                  kwargs={"timeout": 60})
        worker.start()
        deadline = time.monotonic() + 10
        while not store.fleet_conditions()["cooldowns"]:  # the fleet now waits 20 s on the budget
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # new jobs have taken every slot, waiting for the cooldown
        store.set_state(rep.batch_id, "cancelled", "cancelled by the user")
        cancelled_at = time.time()
        worker.join(30)
        assert not worker.is_alive()
        late = [r for r in srv.requests if r.at > cancelled_at + 0.5]
    assert not late, f"{len(late)} request(s) sent after the batch was cancelled"
    assert time.time() - cancelled_at < 10, "the runner waited out the cooldown"


def test_the_circuit_keeps_when_the_endpoint_went_down_and_cools_no_longer_than_the_give_up(store):
    import asyncio

    from batchrun.state.limiter import SharedLimiter
    from batchrun.settings import CircuitPolicy

    settings = WorkerSettings(base_url="http://user:s3cret@127.0.0.1:9/v1", api_key="sk-test",
                              circuit=CircuitPolicy(min_outcomes=3, first_cooling_ms=60_000, max_cooling_ms=60_000))
    # (a give-up time long enough that a loaded machine cannot pass it between the calls below)
    limiter = SharedLimiter(store, settings, BatchOptions(give_up_seconds=20.0))

    async def record(*outcomes):
        return [await limiter.record(failed) for failed in outcomes]

    [first] = asyncio.run(record(True))
    assert first.down_since_ms and not first.open
    assert asyncio.run(record(False))[0].down_since_ms == 0  # an answer: the endpoint is up
    states = asyncio.run(record(True, True, True))
    down = states[0].down_since_ms
    assert down and all(s.down_since_ms == down for s in states)  # counted from the first failure
    assert states[-1].open and states[-1].open_until_ms <= down + 20_001  # not the 60 s cooling (1 ms: rounding)
    stored = store.redis.hget(limiter.circuit_key, "url")
    assert b"s3cret" not in stored and b"127.0.0.1:9/v1" in stored  # no credentials in Redis


def test_the_give_up_sentence_names_the_url_without_credentials(store):
    from batchrun.state.limiter import CircuitState
    from batchrun.runner.shard import ShardRunner

    runner = ShardRunner(store, "b-1", 0, WorkerSettings(base_url="http://user:s3cret@10.0.0.1:8000/v1"))
    runner.give_up_seconds, runner.running_since_ms = 5.0, 0.0
    runner._outage = ("connection refused", 1_000, 7_000)
    message = runner._gave_up_message(CircuitState("open", 0, 7_000, 1_000))
    assert "s3cret" not in message
    assert message.startswith("the API at http://user:***@10.0.0.1:8000/v1 has not answered for 6 s "
                              "(connection refused), past --give-up-after 5 s")
    runner._outage = ("HTTP 502", 1_000, 7_000)
    assert "has answered only with server errors (HTTP 502) for 6 s" in \
        runner._gave_up_message(CircuitState("open", 0, 7_000, 1_000))


@pytest.mark.redis
def test_sigterm_to_a_worker_whose_jobs_wait_for_the_circuit_stops_at_once(spawn, real_redis_url, tmp_path):
    jobs, env = _jobs_and_env(tmp_path, f"http://127.0.0.1:{closed_port()}/v1")
    env["BATCHRUN_REDIS_URL"] = real_redis_url
    sub = subprocess.run(batchrun_cmd("submit", str(jobs)), env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    batch_id = sub.stdout.split()[-1]
    worker = spawn(batchrun_cmd("-q", "worker", "--concurrency", "10", "--grace", "30"), env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn = redis.Redis.from_url(real_redis_url)
    deadline = time.monotonic() + 30
    while not any(conn.hget(k, "state") == b"open" for k in conn.scan_iter("batchrun:circuit:*")):
        assert time.monotonic() < deadline, "the circuit never opened"
        time.sleep(0.1)
    time.sleep(1.0)
    stopped_at = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    assert time.monotonic() - stopped_at < 10, "SIGTERM waited the grace for requests that were not sent"
    assert conn.zcard(f"batchrun:batch:{batch_id}:leases") == 0, "every job went back to the queue"


# --- a server that accepts requests and never answers ----------------------------------------------


def test_run_against_a_server_that_never_answers_pauses_after_the_give_up_time(tmp_path):
    """No attempt fails before the request timeout (600 s here): the give-up time is judged on the wire."""
    with HostileServer([Reply(200, {}, {}, delay=3000)]) as srv:
        jobs, env = _jobs_and_env(tmp_path, srv.base_url, n=3)
        started = time.monotonic()
        proc = subprocess.run(batchrun_cmd("run", str(jobs), "-o", str(tmp_path / "out.jsonl"), "--give-up-after", "3",
                                           "--concurrency", "10"), env=env, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        sent = len(srv.requests)
    assert proc.returncode == 4, proc.stderr  # paused
    err = proc.stderr
    assert srv.base_url in err and re.search(r"has not answered for [34] s", err) and "--give-up-after 3 s" in err, err
    assert "got no answer at all" in err and "to finish the batch: batchrun resume" in err
    assert "Traceback" not in err
    assert 1 <= sent <= 3 and took < 30, took  # (the budget may hold the others back until a first answer)
    assert not read_lines(tmp_path / "out.errors.jsonl"), "no job failed"


def test_a_burst_worker_leaves_a_server_that_never_answers(store, tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", 2)
    with HostileServer([Reply(200, {}, {}, delay=3000)]) as srv:
        rep = submit_file(store, str(jobs), options=BatchOptions(give_up_seconds=2.0))
        started = time.monotonic()
        run_thread_worker(store.redis, _settings(srv.base_url), timeout=60)  # a burst worker that ends by itself
        took = time.monotonic() - started
    meta = store.meta(rep.batch_id)
    assert meta["state"] == "paused" and "got no answer at all" in meta["reason"], meta
    assert store.counts(rep.batch_id)["failed"] == 0
    assert not store.redis.hgetall(f"batchrun:batch:{rep.batch_id}:attempts"), "a pause burns no attempt"
    assert 2.0 <= took < 20, took


def test_a_slow_stream_that_keeps_sending_is_not_a_server_that_never_answers(store, tmp_path):
    """Only silence pauses: a stream whose bytes keep coming past --give-up-after ends as a result."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    last = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    events = [(e, 0.5) for e in sse(*[chunk] * 8)] + sse(last, "[DONE]")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"custom_id": "s", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "gpt-4o-mini", "stream": True,
                                         "messages": [{"role": "user", "content": "hi"}]}}) + "\n")
    with HostileServer([Reply(events=events)]) as srv:
        rep = submit_file(store, str(jobs), options=BatchOptions(give_up_seconds=2.0))
        run_thread_worker(store.redis, _settings(srv.base_url), timeout=60)
    assert store.meta(rep.batch_id)["state"] == "finished", store.meta(rep.batch_id).get("reason")
    assert store.counts(rep.batch_id)["done"] == 1


def test_a_request_timeout_is_an_outage_for_the_circuit(store, tmp_path):
    """A server that trickles keep-alives holds every request to the request timeout; the timeouts open
    the circuit and the batch pauses at the give-up time, failing no job."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", 12)
    with HostileServer(lambda seen: Reply(events=[(b": ping\n\n", 0.2)] * 1000)) as srv:
        rep = submit_file(store, str(jobs), options=BatchOptions(give_up_seconds=3.0, backoff_base=0.05,
                                                                 backoff_cap=0.2, max_attempts=50))
        started = time.monotonic()
        run_thread_worker(store.redis, _settings(srv.base_url, concurrency=12, request_timeout=0.5), timeout=60)
        took = time.monotonic() - started
    meta = store.meta(rep.batch_id)
    assert meta["state"] == "paused", meta
    assert "(timed out)" in meta["reason"] and "--give-up-after 3 s" in meta["reason"], meta["reason"]
    assert store.counts(rep.batch_id)["failed"] == 0
    assert took < 30


def test_run_request_timeout_bounds_a_request_that_trickles(tmp_path):
    with HostileServer(lambda seen: Reply(events=[(b": ping\n\n", 0.2)] * 1000)) as srv:
        jobs, env = _jobs_and_env(tmp_path, srv.base_url, n=1)
        started = time.monotonic()
        proc = subprocess.run(batchrun_cmd("run", str(jobs), "-o", str(tmp_path / "out.jsonl"), "--request-timeout", "1",
                                           "--max-attempts", "1"), env=env, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
    assert proc.returncode == 3, proc.stderr  # finished with errors
    [error] = read_lines(tmp_path / "out.errors.jsonl")
    assert "timed out" in error["error"]["message"], error
    assert took < 30
