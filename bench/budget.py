"""How fully batchrun spends a TPM budget, against the mock server enforcing it.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python bench/budget.py [--tpm 100000] [--jobs 1000]

A TPM-bound batch (varied prompt and output sizes) is run by
  (a) one `batchrun worker` process, (b) four sharing the budget through Redis
      (workers already running, as in a deployed fleet: the clock runs from
      `submit` until the batch is finished),
  (c) the baseline: one process with an in-memory token bucket, the OpenAI
      cookbook's approach (full bucket at start, estimate = tiktoken + max_tokens,
      15 s pause after a 429).
For each, from the mock's own per-second accounting:
  TPM ÷ T     tokens the server charged per minute after its initial burst, over
              the busy window, divided by the limit T
  429 share   requests answered 429 ÷ requests sent
  wall÷ideal  wall time ÷ ((tokens the server charged − the burst its bucket allowed
              at start) ÷ T)
  wall÷ceil   wall time ÷ ((tokens the server charged − one second's worth) ÷ T): the
              shortest time for a fleet that keeps to --tpm T as a ceiling (batchrun
              does; the baseline spends the server's whole initial burst)
`--count chars` (default) has the mock charge prompts by characters/4, as OpenAI
documents, while batchrun estimates with tiktoken: its calibration must close the gap.
Needs a Redis server (default redis://127.0.0.1:6379/14, flushed before each run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import tiktoken

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import MockProcess  # noqa: E402
MODEL = "gpt-4o-mini"
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will can more other what "
         "time about these into some could them only then new first its also two may any like our over such "
         "system model request token limit batch worker result answer server budget minute second").split()


def make_jobs(path: Path, n: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 300)))
            body = {"model": MODEL, "max_tokens": rng.randint(16, 256),
                    "messages": [{"role": "system", "content": "You are a concise assistant."},
                                 {"role": "user", "content": f"Summarise: {words}"}]}
            f.write(json.dumps({"custom_id": f"job-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")


def budget_mock(tpm: int, rpm: int, count: str, burst_seconds: float) -> MockProcess:
    """The limited mock server of these runs, in its own process (its own GIL)."""
    return MockProcess("--tpm", str(tpm), "--rpm", str(rpm), "--count", count, "--burst-seconds", str(burst_seconds))


def run_batchrun(jobs: Path, mock: MockProcess, redis_url: str, workers: int, tpm: int, rpm: int) -> float:
    """A fleet as deployed: workers already running; the clock runs from submit to the batch's end."""
    from rq import Worker

    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    env = {**os.environ, "BATCHRUN_REDIS_URL": redis_url, "OPENAI_BASE_URL": mock.base_url,
           "OPENAI_API_KEY": "sk-bench"}
    procs = [subprocess.Popen([sys.executable, "-m", "batchrun", "-q", "worker", "--concurrency", "50"], env=env)
             for _ in range(workers)]
    try:
        while Worker.count(connection=conn) < workers:
            time.sleep(0.1)
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "batchrun", "-q", "submit", str(jobs), "--tpm", str(tpm),
                              "--rpm", str(rpm), "--shard-size", "250"], env=env, check=True,
                             capture_output=True, text=True)
        batch = f"batchrun:batch:{out.stdout.split()[-1]}"
        while conn.hget(batch, "state") != b"finished":
            time.sleep(0.05)
        return time.monotonic() - started
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)


def run_baseline(jobs: Path, mock: MockProcess, tpm: int, rpm: int) -> float:
    """The cookbook's single-process approach: an in-memory bucket, no shared state."""
    from openai import AsyncOpenAI, RateLimitError

    enc = tiktoken.encoding_for_model(MODEL)
    requests = [json.loads(line) for line in open(jobs)]

    def cost(body: dict) -> int:
        prompt = sum(4 + sum(len(enc.encode(str(v))) for v in m.values()) for m in body["messages"]) + 2
        return prompt + body["max_tokens"] * body.get("n", 1)

    async def main() -> None:
        client = AsyncOpenAI(base_url=mock.base_url, api_key="sk-bench", max_retries=0)
        tokens, reqs, last = float(tpm), float(rpm), time.monotonic()
        cooldown_until = 0.0
        queue = list(requests)
        retry: list[dict] = []
        pending: set[asyncio.Task] = set()

        async def call(job: dict) -> None:
            nonlocal cooldown_until
            try:
                await client.chat.completions.create(**job["body"])
            except RateLimitError:
                cooldown_until = time.monotonic() + 15  # the cookbook's pause after a rate-limit error
                retry.append(job)

        while queue or retry or pending:
            now = time.monotonic()
            tokens = min(tpm, tokens + (now - last) * tpm / 60)
            reqs = min(rpm, reqs + (now - last) * rpm / 60)
            last = now
            job = retry[0] if retry else (queue[0] if queue else None)
            if job is not None and now >= cooldown_until:
                c = cost(job["body"])
                if tokens >= c and reqs >= 1:
                    tokens -= c
                    reqs -= 1
                    (retry if retry else queue).pop(0)
                    t = asyncio.create_task(call(job))
                    pending.add(t)
                    t.add_done_callback(pending.discard)
                    continue
            await asyncio.sleep(0.001)
        await client.close()

    started = time.monotonic()
    asyncio.run(main())
    return time.monotonic() - started


def figures(stats: dict, wall: float, tpm: int, burst_tokens: float) -> dict:
    per_second = stats["per_second"]
    charged = stats["tokens_charged"]
    window = per_second[-1][0] + 1 - per_second[0][0]  # seconds from the first admission to the last
    after_burst = max(0.0, charged - burst_tokens)
    ideal = after_burst / tpm * 60
    requests = stats["requests"]
    return {
        "tpm_ratio": after_burst / (window / 60) / tpm if window else 0.0,
        "share_429": stats["by_status"].get("429", 0) / requests if requests else 0.0,
        "wall_over_ideal": wall / ideal if ideal else 0.0,
        "wall_over_ceiling": wall / ((charged - tpm / 60) / tpm * 60) if charged > tpm / 60 else 0.0,
        "wall": wall, "ideal": ideal, "requests": requests, "charged": charged,
        "answered_429": stats["by_status"].get("429", 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tpm", type=int, default=100_000)
    ap.add_argument("--rpm", type=int, default=5_000)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--count", choices=["chars", "tiktoken"], default="chars")
    ap.add_argument("--burst-seconds", type=float, default=60.0, help="the mock's bucket: seconds' worth of T")
    ap.add_argument("--scenarios", default="a,b,c")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="batchrun-bench-"))
    jobs = tmp / "jobs.jsonl"
    make_jobs(jobs, args.jobs)
    burst_tokens = args.tpm * args.burst_seconds / 60
    rows = []
    for name in args.scenarios.split(","):
        with budget_mock(args.tpm, args.rpm, args.count, args.burst_seconds) as mock:
            if name == "a":
                label, wall = "(a) batchrun, 1 worker process", run_batchrun(jobs, mock, args.redis_url, 1,
                                                                             args.tpm, args.rpm)
            elif name == "b":
                label, wall = "(b) batchrun, 4 worker processes", run_batchrun(jobs, mock, args.redis_url, 4,
                                                                               args.tpm, args.rpm)
            else:
                label, wall = "(c) baseline: in-memory token bucket", run_baseline(jobs, mock, args.tpm, args.rpm)
            rows.append((label, figures(mock.stats(), wall, args.tpm, burst_tokens)))
            print(f"{label}: done in {wall:.1f} s", file=sys.stderr, flush=True)

    print(f"\ncommand: {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"mock: T = {args.tpm} TPM, {args.rpm} RPM, burst {args.burst_seconds:g} s, charging by {args.count}; "
          f"{args.jobs} jobs; machine: {os.cpu_count()} cores\n")
    print(f"| {'run':38} | TPM ÷ T | 429 share | wall ÷ ideal | wall ÷ ceil | wall s | ideal s | requests "
          f"| tokens charged |")
    print(f"|{'-' * 40}|---------|-----------|--------------|-------------|--------|---------|----------|"
          f"----------------|")
    for label, f in rows:
        print(f"| {label:38} | {f['tpm_ratio']:7.3f} | {f['share_429']:8.2%} | {f['wall_over_ideal']:12.3f} | "
              f"{f['wall_over_ceiling']:11.3f} | {f['wall']:6.1f} | {f['ideal']:7.1f} | {f['requests']:8d} | "
              f"{f['charged']:14d} |")


if __name__ == "__main__":
    main()
