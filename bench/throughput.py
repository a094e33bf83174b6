"""End-to-end jobs per second on `batchrun mock-server`, against single-process asyncio baselines.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python bench/throughput.py [--jobs 20000] [--concurrency 200]

No limits anywhere (a big account, or a local vLLM server): how fast batchrun's own machinery goes.
Every run sends the same small chat jobs to a fresh `batchrun mock-server` process on the same
machine (ports 18000-18999).

  (a) batchrun, 1 worker process     `batchrun worker --concurrency C` already running (as in a
  (b) batchrun, 2 worker processes   deployed fleet); the clock runs from `batchrun submit` until
                                     `batchrun collect --follow` has written every result to a file
  (c) baseline: the cookbook         openai-cookbook's api_request_parallel_processor.py approach:
                                     one asyncio loop that takes a line, counts its tokens, fires
                                     `aiohttp session.post` as a task, sleeps 1 ms, and appends each
                                     answer to the output file; C connections
  (d) baseline: minimal aiohttp      the least a single asyncio process can do: C coroutines doing
                                     `session.post` back to back, answers written to a file
  (e) bare AsyncOpenAI loop          the same with the SDK's default client (its own HTTP stack)
With --latency-ms L (default 200) the mock waits L ms before answering, and (f) batchrun (1 worker,
--concurrency 500) and (g) the minimal aiohttp loop (500 in flight) show concurrency at work: the
ideal is 500 / L jobs per second.

Columns: jobs/s; ÷ (c) and ÷ (d), the ratio to the baselines measured in the same run; CPU ms per
job of the client processes (batchrun: the worker processes and their work horses, not submit or
collect) and of the mock server. Needs a Redis server (default redis://127.0.0.1:6379/10, flushed
before each batchrun run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (PYTHON, MockProcess, Workers, batchrun_env, command_line, machine, table,  # noqa: E402
                          write_jobs)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process so far (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- batchrun --------------------------------------------------------------------------------


def run_batchrun(jobs: Path, n: int, mock: MockProcess, redis_url: str, workers: int, concurrency: int,
                 shard_size: int | None, out_dir: Path) -> dict:
    import redis

    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    out = out_dir / f"batchrun-{workers}-{concurrency}.jsonl"
    for p in (out, out.with_name(out.stem + ".errors.jsonl")):
        p.unlink(missing_ok=True)
    with Workers(workers, redis_url, mock.base_url, concurrency) as fleet:
        mock_cpu0 = cpu_seconds(mock.proc.pid)
        horses: dict[int, float] = {}
        parents0 = sum(cpu_seconds(p.pid) for p in fleet.procs)
        started = time.monotonic()
        sized = ["--shard-size", str(shard_size)] if shard_size else []  # else batchrun's own choice
        sub = subprocess.run([PYTHON, "-m", "batchrun", "-q", "submit", str(jobs), *sized],
                             env=batchrun_env(redis_url), check=True, capture_output=True, text=True)
        batch_id = sub.stdout.split()[-1]
        shards = int(conn.hget(f"batchrun:batch:{batch_id}", "shards") or 0)
        submitted = time.monotonic() - started
        collector = subprocess.Popen([PYTHON, "-m", "batchrun", "-q", "collect", batch_id, "-o", str(out), "--follow"],
                                     env=batchrun_env(redis_url), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finished = None
        while collector.poll() is None:
            for pid in fleet.horse_pids():
                horses[pid] = cpu_seconds(pid)  # a horse's CPU, read last while it lives
            if finished is None and conn.hget(f"batchrun:batch:{batch_id}", "state") == b"finished":
                finished = time.monotonic() - started
            time.sleep(0.02)
        wall = time.monotonic() - started
        if collector.returncode:
            raise RuntimeError("batchrun collect failed")
        worker_cpu = sum(horses.values()) + sum(cpu_seconds(p.pid) for p in fleet.procs) - parents0
        mock_cpu = cpu_seconds(mock.proc.pid) - mock_cpu0
    written = sum(1 for _ in open(out))
    if written != n:
        raise RuntimeError(f"batchrun wrote {written} results, expected {n}")
    return {"wall": wall, "rate": n / wall, "client_ms": 1000 * worker_cpu / n, "mock_ms": 1000 * mock_cpu / n,
            "note": f"{shards} shards; submit {submitted:.1f} s, all done in Redis at {finished or wall:.1f} s"}


# --- baselines (each in its own process: `throughput.py --child KIND ...`) ---------------------


async def cookbook(jobs: Path, base_url: str, out: Path, concurrency: int) -> None:
    """openai-cookbook's api_request_parallel_processor.py, its main loop as written (limits set
    too high to bind): one line per loop turn, tokens counted per request, a 1 ms sleep per turn,
    one task per request, each answer appended to the output file."""
    import aiohttp
    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base")
    max_rpm, max_tpm = 1e12, 1e12
    url = base_url + "/chat/completions"
    headers = {"Authorization": "Bearer sk-bench"}

    def num_tokens(request: dict) -> int:
        tokens = 0
        for message in request["messages"]:
            tokens += 4
            for key, value in message.items():
                tokens += len(encoding.encode(value))
                if key == "name":
                    tokens -= 1
        return tokens + 2 + request.get("max_tokens", 15) * request.get("n", 1)

    def append_to_jsonl(data, filename: Path) -> None:
        with open(filename, "a") as f:
            f.write(json.dumps(data) + "\n")

    in_progress = 0

    async def call_api(session, request: dict) -> None:
        nonlocal in_progress
        async with session.post(url=url, headers=headers, json=request["body"]) as response:
            answer = await response.json()
        append_to_jsonl([request["body"], answer, {"custom_id": request["custom_id"]}], out)
        in_progress -= 1

    available_requests, available_tokens = max_rpm, max_tpm
    last_update = time.time()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        with open(jobs) as file:
            lines = iter(file)
            file_not_finished, next_request, next_tokens = True, None, 0
            while True:
                if next_request is None and file_not_finished:
                    try:
                        next_request = json.loads(next(lines))
                        next_tokens = num_tokens(next_request["body"])
                        in_progress += 1
                    except StopIteration:
                        file_not_finished = False
                now = time.time()
                elapsed, last_update = now - last_update, now
                available_requests = min(available_requests + max_rpm * elapsed / 60, max_rpm)
                available_tokens = min(available_tokens + max_tpm * elapsed / 60, max_tpm)
                if next_request is not None and available_requests >= 1 and available_tokens >= next_tokens:
                    available_requests -= 1
                    available_tokens -= next_tokens
                    asyncio.create_task(call_api(session, next_request))
                    next_request = None
                if in_progress == 0 and not file_not_finished:
                    break
                await asyncio.sleep(0.001)  # the cookbook's seconds_to_sleep_each_loop


async def minimal_aiohttp(jobs: Path, base_url: str, out: Path, concurrency: int) -> None:
    """C coroutines, each posting the next job as soon as its previous answer is in."""
    import aiohttp

    url = base_url + "/chat/completions"
    headers = {"Authorization": "Bearer sk-bench"}
    with open(jobs) as file, open(out, "w") as sink:
        lines = iter(file)

        async def loop(session) -> None:
            for line in lines:
                job = json.loads(line)
                async with session.post(url, headers=headers, json=job["body"]) as response:
                    answer = await response.json()
                sink.write(json.dumps({"custom_id": job["custom_id"], "response": answer}) + "\n")

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
            await asyncio.gather(*(loop(session) for _ in range(concurrency)))


async def bare_openai(jobs: Path, base_url: str, out: Path, concurrency: int) -> None:
    """The same with AsyncOpenAI as it comes (its own HTTP stack), answers as raw JSON."""
    import httpx2
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
    with open(jobs) as file, open(out, "w") as sink:
        lines = iter(file)

        async def loop() -> None:
            for line in lines:
                job = json.loads(line)
                response = await client.post("/chat/completions", body=job["body"], cast_to=httpx2.Response)
                sink.write(json.dumps({"custom_id": job["custom_id"], "response": response.json()}) + "\n")

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    await client.close()


CHILDREN = {"cookbook": cookbook, "minimal": minimal_aiohttp, "openai": bare_openai}


def run_baseline(kind: str, jobs: Path, n: int, mock: MockProcess, concurrency: int, out_dir: Path) -> dict:
    out = out_dir / f"{kind}-{concurrency}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [PYTHON, __file__, "--child", kind, "--child-jobs", str(jobs), "--child-url", mock.base_url,
           "--child-out", str(out), "--concurrency", str(concurrency)]
    mock_cpu0 = cpu_seconds(mock.proc.pid)
    started = time.monotonic()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"baseline {kind} failed")
    mock_cpu = cpu_seconds(mock.proc.pid) - mock_cpu0
    written = sum(1 for _ in open(out))
    if written != n:
        raise RuntimeError(f"baseline {kind} wrote {written} answers, expected {n}")
    return {"wall": wall, "rate": n / wall, "client_ms": 1000 * (usage.ru_utime + usage.ru_stime) / n,
            "mock_ms": 1000 * mock_cpu / n, "note": "process start included"}


# --- main --------------------------------------------------------------------------------------

LABELS = {
    "a": "(a) batchrun, 1 worker process",
    "b": "(b) batchrun, 2 worker processes",
    "c": "(c) baseline: the cookbook's loop",
    "d": "(d) baseline: minimal aiohttp loop",
    "e": "(e) bare AsyncOpenAI loop",
    "f": "(f) batchrun, 1 worker, L ms latency",
    "g": "(g) minimal aiohttp, L ms latency",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=20_000, help="jobs per run without latency")
    ap.add_argument("--concurrency", type=int, default=200, help="requests in flight per process")
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--latency-jobs", type=int, default=10_000)
    ap.add_argument("--latency-concurrency", type=int, default=500)
    ap.add_argument("--shard-size", type=int, default=None, help="default: batchrun's own choice")
    ap.add_argument("--scenarios", default="a,b,c,d,e,f,g")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--child-jobs", help=argparse.SUPPRESS)
    ap.add_argument("--child-url", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        asyncio.run(CHILDREN[args.child](Path(args.child_jobs), args.child_url, Path(args.child_out),
                                         args.concurrency))
        return

    tmp = Path(tempfile.mkdtemp(prefix="batchrun-throughput-"))
    jobs = write_jobs(tmp / "jobs.jsonl", args.jobs)
    latency_jobs = write_jobs(tmp / "latency-jobs.jsonl", args.latency_jobs)
    results: dict[str, dict] = {}
    for name in args.scenarios.split(","):
        latency = name in ("f", "g")
        extra = ("--latency-ms", str(args.latency_ms)) if latency else ()
        n = args.latency_jobs if latency else args.jobs
        path = latency_jobs if latency else jobs
        conc = args.latency_concurrency if latency else args.concurrency
        with MockProcess(*extra) as mock:
            if name in ("a", "b", "f"):
                r = run_batchrun(path, n, mock, args.redis_url, 2 if name == "b" else 1, conc, args.shard_size, tmp)
            else:
                r = run_baseline({"c": "cookbook", "d": "minimal", "e": "openai", "g": "minimal"}[name],
                                 path, n, mock, conc, tmp)
        results[name] = r
        print(f"{LABELS[name].replace('L ms', f'{args.latency_ms:g} ms')}: {r['rate']:.0f} jobs/s", file=sys.stderr,
              flush=True)

    rows = []
    for name, r in results.items():
        base = results.get("g") if name in ("f", "g") else None
        vs_c = f"{r['rate'] / results['c']['rate']:.2f}" if "c" in results and name not in ("f", "g") else ""
        vs_d = (f"{r['rate'] / results['d']['rate']:.2f}" if "d" in results and name not in ("f", "g") else
                f"{r['rate'] / base['rate']:.2f}" if base else "")
        n = args.latency_jobs if name in ("f", "g") else args.jobs
        conc = args.latency_concurrency if name in ("f", "g") else args.concurrency
        rows.append([LABELS[name].replace("L ms", f"{args.latency_ms:g} ms"), n, conc, f"{r['wall']:.1f}",
                     f"{r['rate']:.0f}", vs_c, vs_d, f"{r['client_ms']:.2f}", f"{r['mock_ms']:.2f}", r["note"]])
    print(f"\ncommand: {command_line()}")
    print(f"machine: {machine()}; mock server in its own process; Redis {args.redis_url}; shard size "
          f"{args.shard_size or 'chosen by batchrun'}; ideal with {args.latency_ms:g} ms latency and {args.latency_concurrency} in flight: "
          f"{args.latency_concurrency / (args.latency_ms / 1000):.0f} jobs/s\n")
    print(table(["run", "jobs", "in flight", "wall s", "jobs/s", "÷ (c)", "÷ (d) or (g)", "client CPU ms/job",
                 "mock CPU ms/job", "note"], rows, "lrrrrrrrrl"))


if __name__ == "__main__":
    main()
