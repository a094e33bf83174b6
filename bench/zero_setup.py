"""The zero-setup `batchrun run` and a small fleet, against the cookbook's loop in the same run.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python bench/zero_setup.py [--quick] [--redis-url URL]

Every run sends the same small chat jobs to a fresh `batchrun mock-server` process (no limits) on
the same machine, with C requests in flight (default 200):

  cookbook   the OpenAI cookbook's api_request_parallel_processor.py main loop as written (the
             same function as bench/throughput.py's; limits too high to bind): one line per loop
             turn, its tokens counted, one aiohttp task per job, a 1 ms sleep per turn, each
             answer appended to the output file; C connections. The issue's ratios are against it.
  semaphore  the same approach stripped to its bones: one asyncio process reads the file, starts
             one task per job behind a semaphore of C, posts it with aiohttp and appends each
             answer to the output file (no token count, no sleep): the floor of a one-process loop
  run        `batchrun run JOBS -o OUT` as a newcomer types it: no Redis named, so the in-process
             one (fakeredis), its worker in the same process
  fleet      on a real Redis (--redis-url, flushed first): `batchrun submit`, then 2
             `batchrun worker --burst` processes started after it, and `batchrun collect --follow`

Columns: wall seconds (process start included) and its ratio to the cookbook's wall in the same
run (below 1 is faster), and to the semaphore loop's; "first request" is when the mock server had answered its first request,
from the start (polled every 20 ms). The fleet's note says when its first request left after the
submit, and how long after the last outcome landed in Redis the collector's files held it (both
polled every 10 ms). --quick runs 2,000 jobs only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PYTHON, MockProcess, command_line, env, machine, table, write_jobs  # noqa: E402
from bench.throughput import cookbook  # noqa: E402  (the cookbook's loop as written)


async def semaphore_loop(jobs: Path, base_url: str, out: Path, concurrency: int) -> None:
    """One task per job, at most ``concurrency`` in flight, every answer appended to ``out``."""
    import aiohttp

    url = base_url + "/chat/completions"
    headers = {"Authorization": "Bearer sk-bench"}
    limit = asyncio.Semaphore(concurrency)

    async def call_api(session: aiohttp.ClientSession, job: dict, sink) -> None:
        async with limit:
            async with session.post(url, headers=headers, json=job["body"]) as response:
                answer = await response.json()
        sink.write(json.dumps([job["body"], answer, {"custom_id": job["custom_id"]}]) + "\n")

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        with open(jobs) as file, open(out, "w") as sink:
            tasks = []
            for line in file:
                tasks.append(asyncio.create_task(call_api(session, json.loads(line), sink)))
                await asyncio.sleep(0)  # the cookbook yields to its requests between lines
            await asyncio.gather(*tasks)


BASELINES = {"cookbook": cookbook, "semaphore": semaphore_loop}
LABELS = {"cookbook": "cookbook's loop", "semaphore": "aiohttp + semaphore loop", "run": "batchrun run (zero-setup)",
          "fleet": "fleet: submit, 2 workers, collect"}


class FirstRequest:
    """Polls the mock server until it has answered a request: when that was, from ``started``."""

    def __init__(self, mock: MockProcess, started: float):
        self.mock, self.started, self.at = mock, started, None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.is_set():
            try:
                if self.mock.stats()["requests"]:
                    self.at = time.monotonic() - self.started
                    return
            except OSError:
                pass
            time.sleep(0.02)

    def stop(self) -> float | None:
        self.done.set()
        self.thread.join()
        return self.at


class LastOutcome:
    """Polls the batch's outcome list in Redis and the collector's files (every 10 ms): when the
    n-th outcome landed in Redis, and when the files held n lines."""

    def __init__(self, redis_url: str, batch_id: str, n: int, files: list[Path]):
        import redis

        from batchrun.state import keys

        self.redis, self.key, self.n, self.files = redis.Redis.from_url(redis_url), keys.sub(batch_id, "results"), n, files
        self.landed = self.written = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _lines(self) -> int:
        return sum(p.read_bytes().count(b"\n") for p in self.files if p.exists())

    def _poll(self) -> None:
        while not self.done.is_set() and self.written is None:
            if self.landed is None and self.redis.llen(self.key) >= self.n:
                self.landed = time.monotonic()
            if self.landed is not None and self._lines() >= self.n:
                self.written = time.monotonic()
            time.sleep(0.01)

    def lag(self) -> float | None:
        """Seconds from the last outcome's landing to its being written (None if not seen)."""
        self.done.set()
        self.thread.join()
        return self.written - self.landed if self.landed is not None and self.written is not None else None


def _wait(proc: subprocess.Popen, what: str) -> float:
    """Wait for ``proc``; its peak RSS in MB (getrusage of the reaped child)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{what} failed with exit code {proc.returncode}")
    return usage.ru_maxrss / 1024


def _count(path: Path, n: int, what: str) -> None:
    written = sum(1 for _ in open(path))
    if written != n:
        raise RuntimeError(f"{what} wrote {written} answers, expected {n}")


def run_baseline(kind: str, jobs: Path, n: int, mock: MockProcess, concurrency: int, tmp: Path) -> dict:
    out = tmp / f"{kind}.jsonl"
    out.unlink(missing_ok=True)  # the cookbook appends
    cmd = [PYTHON, __file__, "--child", kind, str(jobs), mock.base_url, str(out), "--concurrency", str(concurrency)]
    started = time.monotonic()
    first = FirstRequest(mock, started)
    peak = _wait(subprocess.Popen(cmd, env=env()), "the cookbook loop")
    wall = time.monotonic() - started
    _count(out, n, "the cookbook loop")
    return {"wall": wall, "first": first.stop(), "peak": peak}


def _clean(out: Path) -> None:
    for p in (out, out.with_name(out.stem + ".errors.jsonl"), out.with_name(out.stem + ".batchrun.json")):
        p.unlink(missing_ok=True)


def run_zero_setup(jobs: Path, n: int, mock: MockProcess, concurrency: int, tmp: Path) -> dict:
    out = tmp / "run.jsonl"
    _clean(out)
    run_env = env(OPENAI_BASE_URL=mock.base_url, OPENAI_API_KEY="sk-bench")
    run_env.pop("BATCHRUN_REDIS_URL", None)  # the zero-setup default: the in-process Redis
    cmd = [PYTHON, "-m", "batchrun", "-q", "run", str(jobs), "-o", str(out), "--concurrency", str(concurrency)]
    started = time.monotonic()
    first = FirstRequest(mock, started)
    peak = _wait(subprocess.Popen(cmd, env=run_env, stdout=subprocess.DEVNULL), "batchrun run")
    wall = time.monotonic() - started
    _count(out, n, "batchrun run")
    return {"wall": wall, "first": first.stop(), "peak": peak}


def run_fleet(jobs: Path, n: int, mock: MockProcess, concurrency: int, tmp: Path, redis_url: str) -> dict:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    out = tmp / "fleet.jsonl"
    _clean(out)
    fleet_env = env(BATCHRUN_REDIS_URL=redis_url, OPENAI_BASE_URL=mock.base_url, OPENAI_API_KEY="sk-bench")
    started = time.monotonic()
    first = FirstRequest(mock, started)
    sub = subprocess.run([PYTHON, "-m", "batchrun", "-q", "submit", str(jobs)], env=fleet_env, check=True,
                         capture_output=True, text=True)
    batch_id = sub.stdout.split()[-1]
    submitted = time.monotonic() - started
    worker = [PYTHON, "-m", "batchrun", "-q", "worker", "--burst", "--concurrency", str(concurrency)]
    workers = [subprocess.Popen(worker, env=fleet_env) for _ in range(2)]
    collector = subprocess.Popen([PYTHON, "-m", "batchrun", "-q", "collect", batch_id, "-o", str(out), "--follow"],
                                 env=fleet_env, stdout=subprocess.DEVNULL)
    last = LastOutcome(redis_url, batch_id, n, [out, out.with_name(out.stem + ".errors.jsonl")])
    _wait(collector, "batchrun collect --follow")
    wall = time.monotonic() - started
    lag = last.lag()
    for i, w in enumerate(workers):
        _wait(w, f"worker {i + 1}")
    _count(out, n, "the fleet")
    at = first.stop()
    return {"wall": wall, "first": at, "peak": None,
            "note": (f"submit {submitted:.2f} s; first request {at - submitted:.2f} s after it" if at else "")
            + (f"; last outcome written {lag:.2f} s after it landed" if lag is not None else "")}


SUBMIT_CHILD = """
import sys, time
from batchrun.state.connections import connect
from batchrun.state.store import BatchStore
from batchrun.ops.submit import submit_file
store = BatchStore(connect("memory://"))
started = time.monotonic()
report = submit_file(store, sys.argv[1])
print(report.total / (time.monotonic() - started))
"""


def submit_rate(jobs: Path) -> float:
    """Lines per second of submit_file into the in-process Redis (process start and imports not
    counted: this is what `run` spends on loading)."""
    out = subprocess.run([PYTHON, "-c", SUBMIT_CHILD, str(jobs)], env=env(), check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def big_run(n: int, concurrency: int, tmp: Path) -> list:
    """`batchrun run` on an n-line file: when its first request leaves, and its peak memory."""
    jobs = write_jobs(tmp / f"jobs-{n}.jsonl", n)
    rate = submit_rate(jobs)
    with MockProcess() as mock:
        r = run_zero_setup(jobs, n, mock, concurrency, tmp)
    print(f"{n} jobs, run: {r['wall']:.2f} s", file=sys.stderr, flush=True)
    return [LABELS["run"], n, f"{r['wall']:.2f}", "", "", f"{r['first']:.2f}", f"{r['peak']:.0f}",
            f"submit into the in-process Redis alone: {rate:,.0f} lines/s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 jobs only")
    ap.add_argument("--jobs", default="2000,20000", help="comma-separated job counts")
    ap.add_argument("--concurrency", type=int, default=200, help="requests in flight")
    ap.add_argument("--fleet-max", type=int, default=2000, help="run the fleet only up to this many jobs")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/10", help="the fleet's Redis (flushed)")
    ap.add_argument("--no-fleet", action="store_true")
    ap.add_argument("--big", type=int, default=100_000, help="jobs of the run that measures first request and memory "
                                                            "(0: none; not with --quick)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, jobs, url, out = args.child
        asyncio.run(BASELINES[kind](Path(jobs), url, Path(out), args.concurrency))
        return

    tmp = Path(tempfile.mkdtemp(prefix="batchrun-zero-setup-"))
    rows = []
    for n in [2000] if args.quick else [int(x) for x in args.jobs.split(",")]:
        jobs = write_jobs(tmp / f"jobs-{n}.jsonl", n)
        results = {}
        kinds = ["cookbook", "semaphore", "run"] + ([] if args.no_fleet or n > args.fleet_max else ["fleet"])
        for kind in kinds:
            with MockProcess() as mock:
                if kind in BASELINES:
                    results[kind] = run_baseline(kind, jobs, n, mock, args.concurrency, tmp)
                elif kind == "run":
                    results[kind] = run_zero_setup(jobs, n, mock, args.concurrency, tmp)
                else:
                    results[kind] = run_fleet(jobs, n, mock, args.concurrency, tmp, args.redis_url)
            print(f"{n} jobs, {kind}: {results[kind]['wall']:.2f} s", file=sys.stderr, flush=True)
        results["run"]["note"] = f"submit into the in-process Redis alone: {submit_rate(jobs):,.0f} lines/s"
        base, floor = results["cookbook"]["wall"], results["semaphore"]["wall"]
        for kind, r in results.items():
            rows.append([LABELS[kind], n, f"{r['wall']:.2f}", f"{r['wall'] / base:.2f}", f"{r['wall'] / floor:.2f}",
                         f"{r['first']:.2f}" if r["first"] is not None else "",
                         f"{r['peak']:.0f}" if r["peak"] else "", r.get("note", "")])
    if args.big and not args.quick:
        rows.append(big_run(args.big, args.concurrency, tmp))
    print(f"\ncommand: {command_line()}")
    print(f"machine: {machine()}; mock server in its own process; {args.concurrency} in flight; "
          f"fleet Redis {args.redis_url}\n")
    print(table(["run", "jobs", "wall s", "÷ cookbook", "÷ semaphore loop", "first request s", "peak MB", "note"],
                rows, "lrrrrrrl"))


if __name__ == "__main__":
    main()
