"""Edges of the per-day limits (review of issue 16): a tokens-per-day refusal of one request too
large for what is left of the day is not a spent day; the rpd ceiling holds across racing callers
on the real Redis, give-backs included; a day's counts and record from yesterday say nothing today."""

from __future__ import annotations

import json
import re
import subprocess
import threading

import pytest
import redis as redis_lib

from batchrun.mock import MockConfig, MockServerThread
from batchrun.policy.days import DAY_MS, day_spent
from batchrun.state import keys
from batchrun.state.store import BatchStore
from batchrun.text import decoded as _s
from tests.helpers import batchrun_cmd, cli_env
from tests.test_endpoints_fleet import _config, _endpoint, _run

KEY = keys.day_counts(keys.budget(keys.budget_id("http://d/v1", "fp", "m")))


def _fields(client) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in client.hgetall(KEY).items()}


def _take(store: BatchStore, rpd: int, tpd: int, tokens: int) -> tuple[int, int, str, int]:
    refused, ms, which, left = store.scripts.day_take(keys=[KEY], args=[rpd, tpd, tokens, "d"])
    return int(refused), int(ms), _s(which), int(left)


def test_a_request_too_large_for_what_is_left_of_the_day_is_refused_alone_without_a_spent_record(redis_client):
    store = BatchStore(redis_client)
    for _ in range(4):
        assert _take(store, 0, 4000, 300)[0] == 0  # 1,200 of 4,000 counted
    refused, ms, which, left = _take(store, 0, 4000, 3000)
    assert (refused, which, left) == (1, "tpd", 2800) and 0 < ms <= DAY_MS
    assert "spent_until" not in _fields(redis_client)  # not spent: smaller requests still fit
    assert _take(store, 0, 4000, 300)[0] == 0
    # once what is left is less than today's average request, the day is spent: recorded for the fleet
    for _ in range(8):
        _take(store, 0, 4000, 300)
    assert int(_fields(redis_client)["tok"]) == 3900
    assert _take(store, 0, 4000, 300)[2:] == ("tpd", -1)
    f = _fields(redis_client)
    assert (f["spent_limit"], f["spent_by"], f["spent_of"]) == ("tpd", "count", "4000")
    assert day_spent(f, endpoint="d", model="m", now_ms=store.server_time_ms()) is not None


def test_rpd_refusals_are_a_spent_day_at_once(redis_client):
    store = BatchStore(redis_client)
    assert _take(store, 1, 0, 5)[0] == 0
    assert _take(store, 1, 0, 5)[2:] == ("rpd", -1)
    assert _fields(redis_client)["spent_limit"] == "rpd"


def test_yesterdays_counts_and_record_say_nothing_today_and_give_back_leaves_the_new_day_alone(redis_client):
    store = BatchStore(redis_client)
    today = store.server_time_ms() // DAY_MS
    redis_client.hset(KEY, mapping={"day": today - 1, "req": 5, "tok": 900, "spent_until": today * DAY_MS,
                                    "spent_limit": "rpd", "spent_of": 5, "spent_by": "count", "endpoint": "d"})
    f = _fields(redis_client)
    assert day_spent(f, endpoint="d", model="m", now_ms=store.server_time_ms(), rpd=5, tpd=1000) is None
    refused, day, _, _ = _take(store, 5, 1000, 10)
    assert (refused, day) == (0, today)
    f = _fields(redis_client)
    assert (f["day"], f["req"], f["tok"]) == (str(today), "1", "10") and "spent_until" not in f
    # a count of yesterday's given back after midnight does not touch today's counts
    assert int(store.scripts.day_give_back(keys=[KEY], args=[today - 1, 10])) == 0
    assert _fields(redis_client)["req"] == "1"


@pytest.mark.redis
def test_racing_callers_never_count_more_than_rpd_in_a_day_give_backs_included(real_redis_url):
    """Eight threads, each with its own connection, take and (for one in three) give back: the requests
    kept (the 'sent' ones) never pass rpd, and the day ends exactly full."""
    rpd, sent, lock = 25, [], threading.Lock()
    first = redis_lib.Redis.from_url(real_redis_url)
    first.delete(KEY)
    start = threading.Barrier(8)

    def caller(n: int) -> None:
        store = BatchStore(redis_lib.Redis.from_url(real_redis_url))
        start.wait()
        for i in range(40):
            refused, day, _, _ = _take(store, rpd, 0, 1)
            if refused:
                continue
            if (n + i) % 3 == 0:  # counted, then not sent: given back
                store.scripts.day_give_back(keys=[KEY], args=[day, 1])
            else:
                with lock:
                    sent.append(1)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(sent) == rpd == int(_s(first.hget(KEY, "req")))
    first.delete(KEY)


def _job(i: int, max_tokens: int) -> str:
    return json.dumps({"custom_id": f"j{i}", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "gpt-4o-mini", "max_tokens": max_tokens,
                                "messages": [{"role": "user", "content": f"q {i}"}]}})


@pytest.mark.redis
def test_one_job_too_large_for_the_rest_of_the_day_lets_the_others_go_then_pauses_saying_why(real_redis_url,
                                                                                              tmp_path):
    """tpd 4,000: two small jobs, one of ~3,000 tokens that no longer fits, two small after it. The small
    ones are all sent (the endpoint's day is not spent), the large one waits, and with nothing else
    left the batch pauses with a sentence that names it; `status` does not say the day is spent."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join([_job(0, 300), _job(1, 300), _job(2, 3700), _job(3, 300), _job(4, 300)]) + "\n")
    with MockServerThread(MockConfig()) as srv:
        config = _config(tmp_path, _endpoint("d", srv.base_url, 'tpd = ["gpt-4o-mini=4000"]'))
        proc = _run(config, jobs, tmp_path / "out.jsonl", real_redis_url, "--batch-id", "short", "--concurrency",
                    "1", "--backoff-cap", "1", "--no-cache", timeout=60)
        assert srv.stats()["requests"] == 4, proc.stderr[-3000:]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"job j2 needs up to [\d,]+ tokens, more than what is left today of the tokens-per-day limit "
                     r"of gpt-4o-mini on every endpoint serving it that has not spent its day \(tokens left: d "
                     r"[\d,]+\), and no other job of the batch is ready to go; .* so the batch is paused; no job "
                     r"failed", proc.stderr), proc.stderr[-3000:]
    # the printed command names the config file: pasted without it, the batch would go to OPENAI_BASE_URL
    assert f"to finish the batch: batchrun --config {config} run " in proc.stderr, proc.stderr[-3000:]
    status = subprocess.run(batchrun_cmd("--config", config, "status", "short"), capture_output=True, text=True,
                            env=cli_env(BATCHRUN_REDIS_URL=real_redis_url), timeout=60).stdout
    assert "4 done" in status and "is spent" not in status, status
    assert f"Run `batchrun --config {config} resume short` after " in status, status


def test_printed_commands_name_a_config_given_on_the_command_line_not_one_from_the_environment(tmp_path,
                                                                                              monkeypatch):
    from click.testing import CliRunner

    from batchrun.cli.main import main
    from batchrun.ops import hints

    config = tmp_path / "my config.toml"
    config.write_text("")
    real, calls = hints.given_config, []
    monkeypatch.setattr(hints, "given_config", lambda path: calls.append(path) or real(path))
    monkeypatch.delenv("BATCHRUN_CONFIG", raising=False)
    CliRunner().invoke(main, ["--config", str(config), "endpoints"])
    assert calls == [str(config), None]  # named while the command runs, forgotten when it ends
    assert hints.command(["resume", "b"]) == "batchrun resume b"  # (reset when the command ends)
    hints.given_config(str(config))
    assert hints.command(["resume", "b"]) == f"batchrun --config '{config}' resume b"
    assert hints.complete("Run `batchrun resume b` after 00:00", lambda i, extra: ["resume", i]) == (
        f"Run `batchrun --config '{config}' resume b` after 00:00")
    hints.given_config(None)
    monkeypatch.setenv("BATCHRUN_CONFIG", str(config))
    calls.clear()
    result = CliRunner().invoke(main, ["endpoints"])
    assert result.exit_code == 0 and calls == [] and hints.command(["resume", "b"]) == "batchrun resume b"


def test_a_runner_keeps_an_endpoint_whose_day_refused_one_large_request_for_the_smaller_ones(redis_client):
    from batchrun.endpoints import parse_endpoints
    from batchrun.runner.routes import Routes
    from batchrun.settings import BatchOptions, WorkerSettings

    store = BatchStore(redis_client)
    ep = parse_endpoints("f.toml", [{"name": "d", "base_url": "http://d/v1", "tpd": ["m=4000"]}])[0]
    routes = Routes(store, WorkerSettings(), BatchOptions(), "t", endpoints=(ep,))
    d = routes.all[0]
    for _ in range(4):
        assert d.day_spent(store, "m", 300)[0] == 0
    left, day = d.day_spent(store, "m", 3000)
    assert left > 0 and day is None and d.day_short["m"] == 2800
    assert d.day_until("m") == 0 and routes.choose("m", 300) is d and routes.days_spent("m") == []
    assert d.day_spent(store, "m", 300)[0] == 0
    # a day that cannot take today's average request any more is spent, for this runner too
    for _ in range(8):
        d.day_spent(store, "m", 300)
    assert d.day_spent(store, "m", 300)[0] > 0 and d.day_until("m") > 0 and routes.choose("m", 10) is None


def test_a_runner_of_a_single_endpoint_reads_the_servers_spent_day_before_its_first_request(redis_client):
    """The server's per-day 429 recorded by another worker: a runner whose config has that one endpoint
    (no rpd/tpd of its own) sends nothing there until then, and knows why (the pause names it)."""
    import asyncio

    from batchrun.endpoints import Endpoint
    from batchrun.runner.routes import Routes
    from batchrun.settings import BatchOptions, WorkerSettings

    store = BatchStore(redis_client)
    eps = (Endpoint("only", "http://only/v1"),)

    async def scenario():
        earlier = Routes(store, WorkerSettings(), BatchOptions(), "t1", endpoints=eps)
        await asyncio.to_thread(earlier.all[0].server_day_spent, store, "m", 3600.0, "rpd", 10_000)
        later = Routes(store, WorkerSettings(), BatchOptions(), "t2", endpoints=eps)
        await later.ready("m")
        return later.choose("m", 10), later.days_spent("m")

    chosen, days = asyncio.run(scenario())
    assert chosen is None
    assert [(d.endpoint, d.limit, d.by) for d in days] == [("only", "rpd", "server")]


@pytest.mark.redis
def test_jobs_all_too_large_for_what_is_left_pause_the_batch_rather_than_go_round_until_midnight(real_redis_url,
                                                                                                   tmp_path):
    """What is left (2,760 tokens) still takes today's average request, but each of 36 jobs needs more,
    20 leased at a time: they wait, and once none is in flight or due the batch pauses, saying why."""
    small, jobs = tmp_path / "small.jsonl", tmp_path / "jobs.jsonl"
    small.write_text("\n".join(_job(i, 300) for i in range(4)) + "\n")
    jobs.write_text("\n".join(_job(i, 3000) for i in range(4, 40)) + "\n")
    with MockServerThread(MockConfig()) as srv:
        config = _config(tmp_path, _endpoint("d", srv.base_url, 'tpd = ["gpt-4o-mini=4000"]'))
        first = _run(config, small, tmp_path / "first.jsonl", real_redis_url, "--batch-id", "small", "--no-cache",
                     timeout=60)
        assert first.returncode == 0 and srv.stats()["requests"] == 4, first.stderr[-3000:]
        # (the day's 1,240 tokens counted: the batch of the large ones leases 20 at a time, each seeing the others)
        proc = _run(config, jobs, tmp_path / "out.jsonl", real_redis_url, "--batch-id", "stall", "--concurrency",
                    "20", "--backoff-cap", "1", "--no-cache", timeout=60)
        assert srv.stats()["requests"] == 4, proc.stderr[-3000:]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"job j\d+ needs up to [\d,]+ tokens, more than what is left today .* \(tokens left: d 2,760\), "
                     r"and no other job of the batch is ready to go; .* so the batch is paused", proc.stderr), \
        proc.stderr[-3000:]


@pytest.mark.redis
def test_pace_per_endpoint_with_two_worker_processes_is_what_each_server_saw_not_doubled(real_redis_url, tmp_path):
    from tests.helpers import write_jobs

    with MockServerThread(MockConfig(latency_ms=50)) as a, MockServerThread(MockConfig(latency_ms=50)) as b:
        config = _config(tmp_path, _endpoint("a", a.base_url), _endpoint("b", b.base_url, 'rpd = ["gpt-4o-mini=5"]'))
        jobs = write_jobs(tmp_path / "jobs.jsonl", 12)
        proc = _run(config, jobs, tmp_path / "out.jsonl", real_redis_url, "--batch-id", "two", "--processes", "2",
                    "--concurrency", "4", "--no-cache", timeout=90)
        assert proc.returncode == 0, proc.stderr[-3000:]
        seen = {"a": a.stats()["requests"], "b": b.stats()["requests"]}
    assert seen["b"] == 5 and sum(seen.values()) == 12  # the rpd a ceiling across both processes
    st = json.loads(subprocess.run(batchrun_cmd("--config", config, "status", "two", "--json"), capture_output=True,
                                   text=True, env=cli_env(BATCHRUN_REDIS_URL=real_redis_url), timeout=60).stdout)
    by_name = {e["endpoint"]: e for e in st["endpoints"]}
    assert {n: e["requests"] for n, e in by_name.items()} == seen
    assert sum(e["tokens"] for e in by_name.values()) == st["models"][0]["tokens"] > 0


def test_a_run_event_is_still_a_kind_and_text_pair_with_the_status_beside_it():
    """Handlers written before progress events unpack ``kind, text = event``: that still works."""
    import pickle

    from batchrun.api.events import EventKind, RunEvent

    progress = RunEvent(EventKind.PROGRESS, "progress: 1/2 jobs ended", {"jobs": {"total": 2}})
    kind, text = progress
    assert (kind, text, progress.status) == ("progress", "progress: 1/2 jobs ended", {"jobs": {"total": 2}})
    assert RunEvent(EventKind.WARNING, "w").status is None and len(RunEvent(EventKind.NOTE, "n")) == 2
    assert pickle.loads(pickle.dumps(progress)).status == {"jobs": {"total": 2}}
