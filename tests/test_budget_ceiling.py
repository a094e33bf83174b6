"""A configured --tpm is a ceiling for the whole fleet, by the server's count, whatever its headers say.

Two real `batchrun worker --burst` processes share one budget on the real Redis and send to a
hostile server (tests/hostile.py) that allows four times --tpm and says so in its x-ratelimit-*
headers: its bucket stays (nearly) full. It charges each request as OpenAI documents (characters / 4
of the messages, plus max_tokens), which is not batchrun's tiktoken estimate, and records when
each request arrived and what it charged. In every window the tokens it admitted stay within
--tpm x window / 60 (2 % slack), plus one second's worth.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import threading
import time

import pytest

from tests.helpers import batchrun_cmd, cli_env, read_lines
from tests.hostile import HostileServer, Reply, Seen, chat_body, error_body, rate_limit_body

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will can more other what "
         "time about these into some could them only then new first its also two may any like our over such "
         "system model request token limit batch worker result answer server budget minute second").split()


def server_charge(body: dict) -> int:
    """What the server counts at admission: characters of the messages / 4, plus max_tokens x n."""
    chars = sum(len(m.get("role", "")) + len(str(m.get("content", ""))) for m in body["messages"])
    return math.ceil(chars / 4) + body.get("max_tokens", 0) * body.get("n", 1)


class LimitedServer:
    """A token bucket per minute as OpenAI keeps one: capacity ``limit``, refilled at limit / 60 per
    second. ``other_per_s`` tokens a second go to another client on the same key. A request that does
    not fit is answered 429; one bigger than the limit, 429 "Request too large"."""

    def __init__(self, limit: int, other_per_s: float = 0.0, latency: float = 0.03, level: float | None = None,
                 echo_full: bool = False):
        self.limit, self.other_per_s, self.latency = limit, other_per_s, latency
        self.echo_full = echo_full  # a proxy echoing fixed headers: remaining = limit, always
        self.level, self.at = float(limit if level is None else level), time.monotonic()
        self.admitted: list[tuple[float, int]] = []  # (arrival, charge) of each request admitted
        self.refused = 0
        self.lock = threading.Lock()

    def __call__(self, seen: Seen) -> Reply:
        charge = server_charge(seen.body)
        with self.lock:
            now = time.monotonic()
            self.level = min(self.limit, self.level + (now - self.at) * (self.limit / 60 - self.other_per_s))
            self.at = now
            if charge > self.limit:
                self.refused += 1
                return Reply(429, {}, error_body(f"Request too large for gpt-4o-mini on tokens per min (TPM): "
                                                 f"Limit {self.limit}, Requested {charge}.", "tokens",
                                                 "rate_limit_exceeded"))
            headers = {"x-ratelimit-limit-tokens": str(self.limit), "x-ratelimit-limit-requests": "100000",
                       "x-ratelimit-remaining-requests": "99999"}
            if self.level < charge:
                self.refused += 1
                headers["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(self.level)))
                return Reply(429, headers, rate_limit_body("1s"))
            self.level -= charge
            self.admitted.append((now, charge))
            headers["x-ratelimit-remaining-tokens"] = str(self.limit if self.echo_full else math.floor(self.level))
        return Reply(200, headers, chat_body("ok", completion_tokens=5), delay=self.latency)


def write_jobs(path, n: int, *, seed: int = 7, big: dict[int, int] | None = None) -> None:
    """Chat jobs with English-like prompts of 5-40 words and max_tokens 20-60; ``big`` gives some
    jobs (index -> words) a long prompt."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range((big or {}).get(i) or rng.randint(5, 40)))
            body = {"model": "gpt-4o-mini", "max_tokens": rng.randint(20, 60),
                    "messages": [{"role": "system", "content": "You are a concise assistant."},
                                 {"role": "user", "content": f"Summarise: {words}"}]}
            f.write(json.dumps({"custom_id": f"job-{i:04d}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")


def run_fleet(spawn, redis_url: str, server, jobs, tmp_path, *submit_args: str, workers: int = 2,
              timeout: float = 150) -> tuple[list[dict], list[dict]]:
    """submit, `workers` burst worker processes until the batch is done, collect; (results, errors)."""
    with HostileServer(server) as srv:
        env = cli_env(BATCHRUN_REDIS_URL=redis_url, OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-ceiling")
        sub = subprocess.run(batchrun_cmd("submit", str(jobs), *submit_args), env=env, capture_output=True,
                             text=True, timeout=60)
        assert sub.returncode == 0, sub.stderr
        batch_id = sub.stdout.strip().splitlines()[-1]
        procs = [spawn(batchrun_cmd("-q", "worker", "--burst", "--concurrency", "20"), env=env)
                 for _ in range(workers)]
        for p in procs:
            assert p.wait(timeout=timeout) == 0
    out, err = tmp_path / "results.jsonl", tmp_path / "errors.jsonl"
    col = subprocess.run(batchrun_cmd("collect", batch_id, "-o", str(out), "--errors", str(err)), env=env,
                         capture_output=True, text=True, timeout=60)
    assert col.returncode == 0, col.stderr
    return read_lines(out), read_lines(err)


def assert_within_ceiling(admitted: list[tuple[float, int]], tpm: int) -> None:
    """Every window [t, t + W) that starts at an admission holds at most tpm x W / 60 x 1.02 plus
    one second's worth of tpm, by the server's count."""
    times = [t for t, _ in admitted]
    for window in (1, 2, 5, 10, 20, 30):
        j, total, worst = 0, 0, (0, 0.0)
        for i, (start, _) in enumerate(admitted):  # a sliding window over the sorted arrivals
            while j < len(admitted) and times[j] < start + window:
                total += admitted[j][1]
                j += 1
            if total > worst[0]:
                worst = (total, start - times[0])
            total -= admitted[i][1]
        bound = tpm * window / 60 * 1.02 + tpm / 60
        print(f"window {window:2d} s: at most {worst[0]} tokens (from {worst[1]:.1f} s on), bound {bound:.0f}")
        assert worst[0] <= bound, (f"{worst[0]} tokens admitted in {window} s from {worst[1]:.1f} s on; "
                                   f"--tpm {tpm} allows {bound:.0f}")


@pytest.mark.redis
def test_two_workers_keep_to_the_configured_tpm_against_a_server_that_allows_four_times_more(
        spawn, real_redis_url, tmp_path):
    tpm, n = 30_000, 200  # 500 tokens/s; the jobs take ~15,000 tokens by the server's count
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, n)
    server = LimitedServer(limit=4 * tpm)
    results, errors = run_fleet(spawn, real_redis_url, server, jobs, tmp_path, "--tpm", str(tpm),
                                "--shard-size", "50")
    assert not errors and len(results) == n
    assert server.refused == 0
    admitted = sorted(server.admitted)
    assert len(admitted) == n
    assert_within_ceiling(admitted, tpm)
    # Not idle either: over the run, the fleet used most of what --tpm allows (loosely: a loaded
    # machine may be slow, never fast).
    span = admitted[-1][0] - admitted[0][0]
    total = sum(c for _, c in admitted)
    assert total >= 0.5 * tpm * span / 60, f"{total} tokens in {span:.1f} s"


@pytest.mark.redis
def test_headers_that_never_move_do_not_break_the_configured_tpm(spawn, real_redis_url, tmp_path):
    """A proxy that always says remaining = limit: no answer shows a charge. Under --tpm that must
    not teach the budget that requests cost less than the estimate they were reserved by."""
    tpm, n = 30_000, 120
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, n)
    server = LimitedServer(limit=4 * tpm, echo_full=True)
    results, errors = run_fleet(spawn, real_redis_url, server, jobs, tmp_path, "--tpm", str(tpm),
                                "--shard-size", "30")
    assert not errors and len(results) == n
    assert_within_ceiling(sorted(server.admitted), tpm)


@pytest.mark.redis
def test_other_traffic_on_the_key_slows_the_fleet_but_fails_no_job_that_fits(spawn, real_redis_url, tmp_path):
    """Another client spends 60 % of the key's limit: the server's remaining falls faster than the
    fleet's own use explains. The calibration blames the fleet's requests (its k rises), which slows
    it; but the long prompts at the end of each shard, whose own input + output fit the budget's
    capacity (2 s' worth with --burst-seconds 2), are sent, not failed as request_too_large."""
    tpm, n = 30_000, 60
    jobs = tmp_path / "jobs.jsonl"
    big = {i: 500 for i in (27, 28, 57, 58)}  # ~2,700 characters: ~700 tokens either way, of 1,000
    write_jobs(jobs, n, big=big)
    server = LimitedServer(limit=tpm, other_per_s=0.6 * tpm / 60, level=2000)
    results, errors = run_fleet(spawn, real_redis_url, server, jobs, tmp_path, "--tpm", str(tpm),
                                "--burst-seconds", "2", "--shard-size", "30", "--backoff-base", "0.2")
    assert [e["error"]["code"] for e in errors] == []
    assert len(results) == n
    requests = len(server.admitted) + server.refused
    span = max(t for t, _ in server.admitted) - min(t for t, _ in server.admitted)
    print(f"{len(server.admitted)} admitted, {server.refused} refused (429); "
          f"{sum(c for _, c in server.admitted) / span * 60:.0f} tokens/min over {span:.1f} s")
    assert server.refused <= 0.25 * requests  # the fleet followed the server's remaining
