"""One batch over several endpoints, on the real Redis: local fake servers each with its own limit.

The batch spreads, each endpoint stays within its limit, one that goes down or answers 429s loses
its share with no job failing; max_in_flight holds across worker processes; an Azure endpoint gets
the api-key header, its deployment path and api-version, and its 429s are waited out."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import web

from batchrun.mock import MockConfig, MockServerThread
from tests.helpers import batchrun_cmd, check_exactly_once, cli_env, read_lines, write_jobs
from tests.hostile import HostileServer, Reply, chat_body, error_body

pytestmark = pytest.mark.redis


def _config(tmp_path: Path, *tables: str) -> str:
    path = tmp_path / "batchrun.toml"
    path.write_text("\n".join(tables))
    return str(path)


def _endpoint(name: str, base_url: str, *extra: str) -> str:
    return "\n".join(["[[endpoints]]", f'name = "{name}"', f'base_url = "{base_url}"', *extra, ""])


def _run(config: str, jobs: Path, out: Path, redis_url: str, *args: str, timeout: float = 300, **env):
    return subprocess.run(batchrun_cmd("--config", config, "run", str(jobs), "-o", str(out), *args),
                          env=cli_env(BATCHRUN_REDIS_URL=redis_url, **env), capture_output=True, text=True,
                          timeout=timeout)


def _busiest_window(per_second: list[list[int]], seconds: int = 60) -> int:
    """The most tokens a server admitted in any ``seconds`` window."""
    by_second = {s: tokens for s, _, tokens, _ in per_second}
    if not by_second:
        return 0
    return max(sum(by_second.get(t, 0) for t in range(start, start + seconds)) for start in by_second)


def test_a_batch_spreads_over_two_endpoints_each_within_its_limit_in_the_time_of_their_sum(real_redis_url, tmp_path):
    tpm = 12_000  # each; the batch is ~9,000 tokens: about 22 s at both limits' sum, 45 s at one
    with MockServerThread(MockConfig(tpm=tpm)) as a, MockServerThread(MockConfig(tpm=tpm)) as b:
        config = _config(tmp_path, _endpoint("a", a.base_url, 'api_key_env = "KEY_A"', f"tpm = [{tpm}]"),
                         _endpoint("b", b.base_url, 'api_key_env = "KEY_B"', f'tpm = ["gpt-4o-mini={tpm}"]'))
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 200), tmp_path / "out.jsonl"
        proc = _run(config, jobs, out, real_redis_url, KEY_A="sk-a", KEY_B="sk-b")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results, errors = check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")
        stats = [a.stats(), b.stats()]
    assert not errors
    shares = Counter(r["batchrun_endpoint"] for r in results)
    assert set(shares) == {"a", "b"} and min(shares.values()) >= 200 * 0.35, shares
    for s in stats:
        assert s["rate_limited"]["tokens"] == 0, s["rate_limited"]  # never over its limit
        assert _busiest_window(s["per_second"]) <= tpm * 1.02
    seconds = [sec for s in stats for sec, *_ in s["per_second"]]
    wall = max(seconds) - min(seconds) + 1  # from the first request in to the last, at the servers
    # The work as the budgets count it (batchrun's charge of each request, the one minute of `status`).
    env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
    batch_id = subprocess.run(batchrun_cmd("list"), env=env, capture_output=True, text=True).stdout.split()[0]
    status = json.loads(subprocess.run(batchrun_cmd("status", batch_id, "--json"), env=env, capture_output=True,
                                       text=True).stdout)
    ideal = sum(m["tokens"] for m in status["models"]) / (2 * tpm / 60)
    assert {e["endpoint"] for e in status["endpoints"]} == {"a", "b"}  # the pace per endpoint
    assert sum(e["requests"] for e in status["endpoints"]) == 200
    print(f"wall {wall} s, work / sum of limits {ideal:.1f} s, ratio {wall / ideal:.2f}")
    assert wall <= ideal * 1.1 + 2  # within 10 %, plus the servers' whole-second buckets


@pytest.mark.parametrize("trouble", ["500", "429"])
def test_an_endpoint_that_is_down_or_rate_limited_loses_its_share_and_no_job_fails(real_redis_url, tmp_path, trouble):
    with MockServerThread(MockConfig(tpm=60_000)) as good, \
            MockServerThread(MockConfig(error_rates={trouble: 1.0}, retry_after_header=True)) as bad:
        config = _config(tmp_path, _endpoint("good", good.base_url, "tpm = [60000]"),
                         _endpoint("bad", bad.base_url, "tpm = [60000]"))
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 120), tmp_path / "out.jsonl"
        proc = _run(config, jobs, out, real_redis_url, "--max-attempts", "4", timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results, errors = check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")
        assert bad.stats()["requests"] > 0  # it was tried, and lost its share
    assert not errors and {r["batchrun_endpoint"] for r in results} == {"good"}


class CountingServer(HostileServer):
    """A hostile server that counts the requests open at once (the most it ever had)."""

    def __init__(self, script, delay: float):
        super().__init__(script)
        self.open_now = self.most_open = 0
        self._count_lock = threading.Lock()
        self._delay = delay

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        with self._count_lock:
            self.open_now += 1
            self.most_open = max(self.most_open, self.open_now)
        try:
            await asyncio.sleep(self._delay)  # held open, so that the cap is what limits
            return await super()._handle(request)
        finally:
            with self._count_lock:
                self.open_now -= 1


def test_max_in_flight_holds_across_three_worker_processes(real_redis_url, tmp_path, spawn):
    with CountingServer(lambda seen: Reply(200, {}, chat_body()), delay=0.3) as srv:
        config = _config(tmp_path, _endpoint("capped", srv.base_url, "max_in_flight = 8"))
        env = cli_env(BATCHRUN_REDIS_URL=real_redis_url)
        jobs = write_jobs(tmp_path / "jobs.jsonl", 150)
        sub = subprocess.run(batchrun_cmd("--config", config, "submit", str(jobs), "--shard-size", "20"), env=env,
                             capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stderr
        batch_id = next(w for w in sub.stdout.split() if w.startswith("batch-"))
        workers = [spawn(batchrun_cmd("--config", config, "worker", "--burst", "--concurrency", "20"), env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(3)]
        for w in workers:
            assert w.wait(timeout=240) == 0, w.stderr.read().decode()[-2000:]
        col = subprocess.run(batchrun_cmd("collect", batch_id, "-o", str(tmp_path / "out.jsonl")), env=env,
                             capture_output=True, text=True, timeout=120)
        assert col.returncode == 0, col.stderr
        assert len(read_lines(tmp_path / "out.jsonl")) == 150
        assert len(srv.requests) == 150
        assert 1 < srv.most_open <= 8, srv.most_open


def test_slots_of_a_dead_worker_come_back_when_their_leases_run_out(redis_client):
    from batchrun.state.slots import FleetSlots
    from batchrun.state.store import BatchStore

    store = BatchStore(redis_client)
    dead = FleetSlots(store, "http://x/v1", 2, lease_ms=300, token="dead")
    live = FleetSlots(store, "http://x/v1", 2, lease_ms=30_000, token="live")

    async def scenario():
        await dead.acquire()
        await dead.acquire()  # both slots, then the worker dies (no release, no renewal)
        assert live._take("probe")[0] == 0
        got = await asyncio.wait_for(live.acquire(), timeout=10)  # its leases run out
        return got

    assert asyncio.run(scenario()).startswith("live:")


# -- Azure OpenAI ------------------------------------------------------------------------------------

AZURE_429 = error_body("Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 "
                       "have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after "
                       "1 second.", code="429")


def test_an_azure_endpoint_gets_its_header_path_and_api_version_and_its_429s_are_waited_out(real_redis_url, tmp_path):
    answered: list[str] = []
    limited: list[float] = []  # when the 429 was sent

    def azure(seen):
        if seen.headers.get("api-key") != "az-key" or "authorization" in {k.lower() for k in seen.headers}:
            return Reply(401, {}, error_body("Access denied due to invalid subscription key.", code="401"))
        if seen.path != "/openai/deployments/my-4o-mini/chat/completions" or seen.query != "api-version=2024-10-21":
            return Reply(404, {}, error_body(f"Resource not found: {seen.path}?{seen.query}", code="404"))
        if not limited:  # the first request: Azure's 429, with its headers
            limited.append(time.monotonic())
            return Reply(429, {"retry-after-ms": "800", "retry-after": "1", "x-ratelimit-remaining-requests": "0",
                               "x-ratelimit-remaining-tokens": "0"}, AZURE_429)
        answered.append(seen.body["messages"][-1]["content"])
        return Reply(200, {"x-ratelimit-remaining-requests": "99", "x-ratelimit-remaining-tokens": "9000"},
                     chat_body(model="gpt-4o-mini"))

    with HostileServer(azure) as srv:
        config = _config(tmp_path, _endpoint("azure-east", f"http://127.0.0.1:{srv.port}", 'kind = "azure"',
                                             'api_key_env = "AZ_KEY"', 'api_version = "2024-10-21"',
                                             'deployments = { "gpt-4o-mini" = "my-4o-mini" }'))
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 6), tmp_path / "out.jsonl"
        started = time.monotonic()
        proc = _run(config, jobs, out, real_redis_url, AZ_KEY="az-key", timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = read_lines(out)
        assert len(results) == 6 and {r["batchrun_endpoint"] for r in results} == {"azure-east"}
        assert not read_lines(tmp_path / "out.errors.jsonl")
        assert len(srv.requests) == 7  # the 429 once, then every job once
        retried = [r.at for r in srv.requests[1:]]
        assert time.monotonic() - started >= 0.8 and max(retried) - srv.requests[0].at >= 0.7  # retry-after-ms


def test_an_azure_content_filter_400_fails_at_once_with_its_category(real_redis_url, tmp_path):
    body = {"error": {"message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
                                 "management policy.", "type": None, "param": "prompt", "code": "content_filter",
                      "status": 400,
                      "innererror": {"code": "ResponsibleAIPolicyViolation",
                                     "content_filter_result": {"hate": {"filtered": False, "severity": "safe"},
                                                               "violence": {"filtered": True, "severity": "high"}}}}}
    with HostileServer([Reply(400, {}, body)]) as srv:
        config = _config(tmp_path, _endpoint("az", f"http://127.0.0.1:{srv.port}", 'kind = "azure"',
                                             'deployments = { "gpt-4o-mini" = "d" }'))
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 2), tmp_path / "out.jsonl"
        proc = _run(config, jobs, out, real_redis_url, timeout=120)
        errors = read_lines(tmp_path / "out.errors.jsonl")
        assert len(errors) == 2 and len(srv.requests) == 2, proc.stderr[-2000:]  # not retried
        assert all(r.path == "/openai/v1/chat/completions" and r.body["model"] == "d" for r in srv.requests)
        assert all("violence" in e["error"]["message"] for e in errors), errors[0]["error"]


def test_an_endpoint_whose_day_is_spent_stops_and_the_others_carry_on(real_redis_url, tmp_path):
    with MockServerThread(MockConfig()) as daily, MockServerThread(MockConfig()) as other:
        config = _config(tmp_path, _endpoint("daily", daily.base_url, "rpd = [5]", 'tpd = ["gpt-4o-mini=100000"]'),
                         _endpoint("other", other.base_url, "tpm = [600000]"))
        jobs, out = write_jobs(tmp_path / "jobs.jsonl", 40), tmp_path / "out.jsonl"
        proc = _run(config, jobs, out, real_redis_url, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results, errors = check_exactly_once(jobs, out, tmp_path / "out.errors.jsonl")
        assert not errors and daily.stats()["requests"] == 5  # its day's 5 requests, not one more
        assert Counter(r["batchrun_endpoint"] for r in results) == {"daily": 5, "other": 35}
        listed = subprocess.run(batchrun_cmd("--config", config, "endpoints"), capture_output=True, text=True,
                                env=cli_env(BATCHRUN_REDIS_URL=real_redis_url), timeout=60).stdout
    daily_part = listed.split("other (")[0]
    assert "today (UTC): 5 of 5 requests" in daily_part
    assert "requests-per-day limit (5) is spent; it resumes at 00:00 UTC (in " in daily_part
    assert "other endpoints carry on" in daily_part


def test_bad_per_day_limits_are_named(tmp_path):
    from batchrun.endpoints import EndpointsError, load_endpoints

    path = _config(tmp_path, _endpoint("d", "https://x/v1", 'rpd = ["m=0"]'))
    with pytest.raises(EndpointsError, match=r"\('d'\): rpd 'm=0': a limit must be at least 1"):
        load_endpoints(path)
