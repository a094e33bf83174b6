"""A spent day per endpoint, said by `status` (text and --json), the progress line and `batchrun
endpoints`; and the pace per endpoint (requests and tokens per minute) beside the per-model one.

The wording is pure (policy/days.py); on the real Redis, two local fake servers: one endpoint's
rpd spent while the other carries on, every endpoint's day spent (a pause that says until when),
the server's own per-day 429 recorded as a spent day."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from batchrun.mock import MockConfig, MockServerThread
from batchrun.policy.days import (DAY_MS, DaySpent, all_spent_sentence, day_spent, per_day_limit, spent_sentence,
                                  spent_short)
from tests.helpers import batchrun_cmd, check_exactly_once, cli_env, write_jobs
from tests.test_endpoints_fleet import _config, _endpoint, _run

NOW_MS = 20_000 * DAY_MS + 75_480_000  # 20:58 UTC: 3 h 02 min before midnight


# -- pure: the record and its words ------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(req=st.integers(0, 50), tok=st.integers(0, 5000), rpd=st.integers(0, 40), tpd=st.integers(0, 4000),
       now=st.integers(10 * DAY_MS, 30_000 * DAY_MS), yesterday=st.booleans())
def test_counts_alone_say_a_day_is_spent_only_once_they_reach_todays_limit(req, tok, rpd, tpd, now, yesterday):
    day = now // DAY_MS - (1 if yesterday else 0)
    d = day_spent({"day": str(day), "req": str(req), "tok": str(tok)}, endpoint="a", model="m", now_ms=now,
                  rpd=rpd, tpd=tpd)
    reached = bool(rpd and req >= rpd) or bool(tpd and tok >= tpd * 0.999)
    assert (d is not None) == (reached and not yesterday)
    if d is not None:
        assert d.resumes_ms % DAY_MS == 0 and 0 < d.resumes_ms - now <= DAY_MS  # the next midnight UTC
        assert d.limit == ("rpd" if rpd and req >= rpd else "tpd") and d.by == "count"


@settings(max_examples=100, deadline=None)
@given(left_ms=st.integers(-DAY_MS, DAY_MS), by=st.sampled_from(["count", "server"]))
def test_a_record_says_spent_until_its_time_and_not_after(left_ms, by):
    fields = {"spent_until": str(NOW_MS + left_ms), "spent_limit": "rpd", "spent_of": "10000", "spent_by": by,
              "endpoint": "openai-a"}
    d = day_spent(fields, endpoint="?", model="gpt-4o-mini", now_ms=NOW_MS)
    assert (d is not None) == (left_ms > 0)
    if d is not None:
        assert (d.endpoint, d.limit, d.limit_value, d.by) == ("openai-a", "rpd", 10_000, by)
        back = DaySpent.from_json("openai-a", d.as_json())  # (the JSON's seconds are rounded to 0.1 s)
        assert back.resumes_ms == d.resumes_ms and abs(back.now_ms - d.now_ms) <= 50
        assert (back.endpoint, back.limit, back.limit_value, back.by) == ("openai-a", "rpd", 10_000, by)


@settings(max_examples=100, deadline=None)
@given(left_s=st.integers(1, 86_400), others=st.booleans())
def test_the_sentence_says_when_it_resumes_and_in_how_long(left_s, others):
    d = DaySpent("openai-a", "gpt-4o-mini", "rpd", 10_000, "count", NOW_MS + left_s * 1000, NOW_MS)
    line = spent_sentence(d, others_carry_on=others)
    m = re.fullmatch(r"endpoint openai-a: gpt-4o-mini's requests-per-day limit \(10,000\) is spent; it resumes at "
                     r"(\d\d):(\d\d) UTC \(in (?:(\d+) h )?(?:(\d+) min|(\d+) s)\); (.*)", line)
    assert m, line
    hours, minutes, seconds = int(m[3] or 0), int(m[4] or 0), int(m[5] or 0)
    assert abs(hours * 3600 + minutes * 60 + seconds - left_s) < 60
    clock_s = (NOW_MS + left_s * 1000) // 1000 % 86_400
    assert (int(m[1]), int(m[2])) == (clock_s // 3600, clock_s % 3600 // 60)
    assert m[6] == ("other endpoints carry on" if others
                    else "no other endpoint of this batch takes gpt-4o-mini now, so its jobs wait until then")


def test_the_issues_example_words():
    d = DaySpent("openai-a", "gpt-4o-mini", "rpd", 10_000, "count", 20_001 * DAY_MS, 20_001 * DAY_MS - 11_520_000)
    assert spent_sentence(d, others_carry_on=True) == (
        "endpoint openai-a: gpt-4o-mini's requests-per-day limit (10,000) is spent; it resumes at 00:00 UTC "
        "(in 3 h 12 min); other endpoints carry on")
    assert spent_short(d) == "openai-a gpt-4o-mini rpd spent, resumes 00:00 UTC (in 3 h 12 min)"
    server = DaySpent("b", "gpt-4o-mini", "tpd", 0, "server", NOW_MS + 60_000, NOW_MS)
    assert "gpt-4o-mini's tokens-per-day limit at the server is spent" in spent_sentence(server, others_carry_on=True)


def test_every_endpoint_spent_is_a_pause_naming_each_and_the_first_to_resume():
    a = DaySpent("a", "m", "rpd", 5, "count", NOW_MS + 7200_000, NOW_MS)
    b = DaySpent("b", "m", "tpd", 900, "server", NOW_MS + 3600_000, NOW_MS)
    line = all_spent_sentence("m", [a, b], 60)
    assert line.startswith("every endpoint serving m has spent its per-day limit: a's requests-per-day limit (5), "
                           "b's tokens-per-day limit (900) at the server; the first, b, resumes at 21:58 UTC "
                           "(in 1 h 0 min), longer than the --backoff-cap of 60 s, so the batch is paused"), line
    assert line.endswith("Run `batchrun resume BATCH_ID` after 21:58 UTC (2024-10-04)"), line


@pytest.mark.parametrize("kind, message, expected", [
    ("rate_limit_requests", "Rate limit reached for gpt-4o-mini in organization org-x on requests per day (RPD): "
                            "Limit 10000, Used 10000, Requested 1. Please try again in 7h12m0s.", ("rpd", 10_000)),
    ("rate_limit_tokens", "... on tokens per day (TPD): Limit 2,000,000, Used 1999990, Requested 40.",
     ("tpd", 2_000_000)),
    ("rate_limit", "You exceeded your per day limit.", ("", 0)),
])
def test_a_per_day_429_names_its_limit(kind, message, expected):
    assert per_day_limit(kind, message) == expected


# -- the real Redis, two fake servers ------------------------------------------------------------------

def _status(config: str, redis_url: str, batch_id: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(batchrun_cmd("--config", config, "status", batch_id, *args), capture_output=True, text=True,
                          env=cli_env(BATCHRUN_REDIS_URL=redis_url), timeout=60)


@pytest.mark.redis
def test_one_endpoints_rpd_spent_is_said_by_status_with_when_it_resumes_and_the_other_carries_on(real_redis_url,
                                                                                                  tmp_path):
    with MockServerThread(MockConfig()) as daily, MockServerThread(MockConfig()) as other:
        config = _config(tmp_path, _endpoint("daily", daily.base_url, 'rpd = ["gpt-4o-mini=3"]'),
                         _endpoint("other", other.base_url))
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 12), tmp_path / "out.jsonl"
        proc = _run(config, jobs, out, real_redis_url, "--batch-id", "days", timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results, errors = check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")
        assert not errors and Counter(r["batchrun_endpoint"] for r in results) == {"daily": 3, "other": 9}
        assert daily.stats()["requests"] == 3
    text = _status(config, real_redis_url, "days")
    assert text.returncode == 0, text.stderr
    assert re.search(r"endpoint daily: gpt-4o-mini's requests-per-day limit \(3\) is spent; it resumes at 00:00 UTC "
                     r"\(in \d+ (h|min|s)[^)]*\); other endpoints carry on", text.stdout), text.stdout
    pace = r"endpoints: daily 3 requests \d[\d,]* tokens, other 9 requests [1-9][\d,]* tokens"
    assert re.search(pace, text.stdout), text.stdout
    st = json.loads(_status(config, real_redis_url, "days", "--json").stdout)
    by_name = {e["endpoint"]: e for e in st["endpoints"]}
    assert by_name["daily"]["requests"] == 3 and by_name["other"]["requests"] == 9
    assert by_name["other"]["tokens"] > 0 and by_name["other"]["days_spent"] == []
    spent = by_name["daily"]["days_spent"]
    assert [(d["model"], d["limit"], d["limit_value"], d["by"]) for d in spent] == [("gpt-4o-mini", "rpd", 3, "count")]
    assert spent[0]["resumes_at"] % 86_400 == 0 and 0 < spent[0]["resumes_in_seconds"] <= 86_400


@pytest.mark.redis
def test_every_endpoint_spent_pauses_the_batch_saying_until_when_and_status_says_it_too(real_redis_url, tmp_path):
    with MockServerThread(MockConfig()) as a, MockServerThread(MockConfig()) as b:
        config = _config(tmp_path, _endpoint("a", a.base_url, "rpd = [2]"), _endpoint("b", b.base_url, "rpd = [2]"))
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 6), tmp_path / "out.jsonl"
        proc = _run(config, jobs, out, real_redis_url, "--batch-id", "spent", "--backoff-cap", "5",
                    "--processes", "1", "--concurrency", "1", timeout=120)  # (one at a time: each day's 2 sent)
        assert a.stats()["requests"] == 2 and b.stats()["requests"] == 2
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"every endpoint serving gpt-4o-mini has spent its per-day limit: a's requests-per-day limit "
                     r"\(2\), b's requests-per-day limit \(2\); the first, [ab], resumes at 00:00 UTC \(in [^)]+\), "
                     r"longer than the --backoff-cap of 5 s, so the batch is paused", proc.stderr), proc.stderr[-3000:]
    text = _status(config, real_redis_url, "spent").stdout
    assert "batch spent: paused — every endpoint serving gpt-4o-mini" in text, text
    assert "jobs: 4 done, 0 failed" in text and "2 queued" in text, text
    for name in "ab":
        assert (f"endpoint {name}: gpt-4o-mini's requests-per-day limit (2) is spent; it resumes at 00:00 UTC"
                in text), text
    assert text.count("no other endpoint of this batch takes gpt-4o-mini now, so its jobs wait until then") == 2, text


@pytest.mark.redis
def test_the_servers_per_day_429_is_recorded_and_said_while_the_other_endpoint_carries_on(real_redis_url, tmp_path):
    from tests.hostile import HostileServer, Reply, error_body

    rpd = error_body("Rate limit reached for gpt-4o-mini in organization org-x on requests per day (RPD): Limit "
                     "10000, Used 10000, Requested 1. Please try again in 7h12m0s.", type_="requests",
                     code="rate_limit_exceeded")
    with HostileServer(lambda seen: Reply(429, {}, rpd)) as day_gone, MockServerThread(MockConfig()) as other:
        config = _config(tmp_path, _endpoint("gone", day_gone.base_url), _endpoint("other", other.base_url))
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 10), tmp_path / "out.jsonl"
        proc = _run(config, jobs, out, real_redis_url, "--batch-id", "server-day", timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results, errors = check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")
        assert not errors and {r["batchrun_endpoint"] for r in results} == {"other"}
        assert 1 <= len(day_gone.requests) < 10  # the first burst, before its 429 came back; then skipped
    text = _status(config, real_redis_url, "server-day").stdout
    assert re.search(r"endpoint gone: gpt-4o-mini's requests-per-day limit \(10,000\) at the server is spent; it "
                     r"resumes at \d\d:\d\d UTC \(in 7 h 1[12] min\); other endpoints carry on", text), text
    listed = subprocess.run(batchrun_cmd("--config", config, "endpoints", "--json"), capture_output=True, text=True,
                            env=cli_env(BATCHRUN_REDIS_URL=real_redis_url), timeout=60).stdout
    gone = next(e for e in json.loads(listed) if e["name"] == "gone")
    assert [b["day_spent"]["by"] for b in gone["budgets"]] == ["server"], gone["budgets"]


def test_a_runner_starting_after_an_endpoints_day_was_spent_skips_it_from_its_first_request(redis_client):
    """Another runner (another worker) recorded the server's per-day 429: this one reads the record
    before its first request chooses, and never routes there (nor waits on that endpoint's
    cooldown); a day counted and not sent is given back."""
    import asyncio

    from batchrun.endpoints import Endpoint, parse_endpoints
    from batchrun.runner.routes import Routes
    from batchrun.settings import BatchOptions, WorkerSettings
    from batchrun.state import keys
    from batchrun.state.store import BatchStore

    store = BatchStore(redis_client)
    eps = (Endpoint("gone", "http://gone/v1"), Endpoint("up", "http://up/v1"))
    daily = parse_endpoints("f.toml", [{"name": "d", "base_url": "http://d/v1", "rpd": ["m=1"]}])[0]

    async def scenario():
        earlier = Routes(store, WorkerSettings(), BatchOptions(), "t1", endpoints=eps)
        await asyncio.to_thread(earlier.all[0].server_day_spent, store, "m", 3600.0, "rpd", 10_000)
        later = Routes(store, WorkerSettings(), BatchOptions(), "t2", endpoints=eps)
        await later.ready("m")
        chosen = Counter(later.choose("m", 10).name for _ in range(20))
        record = later.all[0].day_record("m")
        # a day counted, then not sent: its count (and the record it made) go back
        d = Routes(store, WorkerSettings(), BatchOptions(), "t3", endpoints=(daily,)).all[0]
        first, day = d.day_spent(store, "m", 5)
        refused, _ = d.day_spent(store, "m", 5)
        d.day_give_back(store, "m", day, 5)
        again, _ = d.day_spent(store, "m", 5)
        return chosen, record, (first, refused > 0, again), later.noticed

    chosen, record, takes, noticed = asyncio.run(scenario())
    assert chosen == {"up": 20}
    assert (record.limit, record.limit_value, record.by) == ("rpd", 10_000, "server")
    assert 3590 < record.seconds_left <= 3600
    assert takes == (0.0, True, 0.0)
    gone_budget = keys.budget(keys.budget_id("http://gone/v1", WorkerSettings().key_fingerprint(), "m"))
    assert noticed == {f"day:{gone_budget}": 1}  # `status` of the batch reads that budget's record


# -- the Python API's progress events --------------------------------------------------------------

def _question(i: int) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"day question {i}"}], "max_tokens": 8}


def test_the_librarys_progress_events_carry_the_pace_and_the_spent_day_per_endpoint(tmp_path, monkeypatch):
    import batchrun
    import batchrun.api.events as events

    monkeypatch.setattr(events, "PROGRESS_EVERY_SECONDS", 0.0)  # one per update, not one per 5 s
    with MockServerThread(MockConfig(latency_ms=150)) as a, MockServerThread(MockConfig(latency_ms=150)) as b:
        monkeypatch.setenv("BATCHRUN_CONFIG", _config(tmp_path, _endpoint("a", a.base_url, 'rpd = ["gpt-4o-mini=2"]'),
                                                      _endpoint("b", b.base_url)))
        seen: list = []
        results = batchrun.run([_question(i) for i in range(12)], api_key="sk-x", progress=False, concurrency=2,
                               cache=False, on_event=seen.append)
        assert all(r.ok for r in results) and a.stats()["requests"] == 2
    progress = [e for e in seen if e.kind == "progress"]
    assert progress and all(e.text.startswith("progress: ") for e in progress)
    last = progress[-1]  # (the runners report their counts once a second: the last may lag the end)
    assert [e["endpoint"] for e in last.status["endpoints"]] == ["a", "b"], last.status["endpoints"]
    assert all(e["tokens"] > 0 for e in last.status["endpoints"]), last.status["endpoints"]
    assert re.search(r"\ba [12] requests? [1-9][\d,]* tokens, b \d+ requests? [1-9][\d,]* tokens", last.text), \
        last.text
    assert any("a gpt-4o-mini rpd spent, resumes 00:00 UTC (in " in e.text for e in progress), last.text


def test_without_endpoints_the_progress_events_show_no_endpoint(monkeypatch):
    import batchrun
    import batchrun.api.events as events

    monkeypatch.setattr(events, "PROGRESS_EVERY_SECONDS", 0.0)
    monkeypatch.delenv("BATCHRUN_CONFIG", raising=False)
    with MockServerThread(MockConfig(latency_ms=100)) as srv:
        seen: list = []
        batchrun.run([_question(i) for i in range(6)], base_url=srv.base_url, api_key="sk-x", progress=False,
                     concurrency=2, cache=False, on_event=seen.append)
    progress = [e for e in seen if e.kind == "progress"]
    assert progress and all(e.status["endpoints"] == [] for e in progress)
    assert not any("spent" in e.text or "requests/min" in e.text for e in progress), progress[-1].text
