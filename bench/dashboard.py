"""Worker throughput with the dashboard open, against the same runs without it.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python bench/dashboard.py [--jobs 10000] [--rounds 2]

The dashboard only reads Redis (what the workers write anyway), so a worker should go as fast
with it open as without. Each round runs the same batch twice on a fresh `batchrun mock-server`
with one `batchrun worker` already running: once alone, once with `batchrun dashboard` serving
"viewers" that poll far harder than a page does (the overview every 0.5 s, the batch page every
second, /metrics every 2 s; a page polls every 2 s). Rounds alternate the order (without, with;
with, without) so that a machine getting busier does not favour either.

Columns: jobs/s of each run; ratio with ÷ without (1.00: unchanged), the median over rounds; the
answers the viewers got. Needs a Redis server (default redis://127.0.0.1:6379/10, flushed before
each run).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (PYTHON, MockProcess, Workers, batchrun_env, command_line,  # noqa: E402
                          free_port, machine, submit, table, wait_finished, write_jobs)

POLLS = (("/api/overview", 0.5), ("/api/batch/{batch}", 1.0), ("/metrics", 2.0))  # path, seconds between


class Viewers:
    """`batchrun dashboard` and threads polling it until stopped; counts the answers."""

    def __init__(self, redis_url: str):
        self.port = free_port()
        self.redis_url = redis_url
        self.batch = ""
        self.answers = 0
        self.failures = 0
        self._stop = threading.Event()

    def __enter__(self) -> Viewers:
        self.proc = subprocess.Popen([PYTHON, "-m", "batchrun", "dashboard", "--port", str(self.port)],
                                     env=batchrun_env(self.redis_url), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not self._get("/api/overview"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the dashboard did not start")
            time.sleep(0.1)
        self.threads = [threading.Thread(target=self._poll, args=poll, daemon=True) for poll in POLLS]
        for t in self.threads:
            t.start()
        return self

    def _get(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
                r.read()
            return True
        except OSError:
            return False

    def _poll(self, path: str, every: float) -> None:
        while not self._stop.wait(every):
            if "{batch}" in path and not self.batch:
                continue
            ok = self._get(path.format(batch=self.batch))
            self.answers += ok
            self.failures += not ok

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=35)
        self.proc.terminate()
        self.proc.wait(timeout=10)


def one_run(jobs: Path, n: int, redis_url: str, concurrency: int, with_dashboard: bool) -> dict:
    import redis

    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    with MockProcess() as mock, Workers(1, redis_url, mock.base_url, concurrency):
        viewers = Viewers(redis_url).__enter__() if with_dashboard else None
        try:
            started = time.monotonic()
            batch = submit(jobs, redis_url)
            if viewers:
                viewers.batch = batch
            wait_finished(conn, batch)
            wall = time.monotonic() - started
        finally:
            if viewers:
                viewers.__exit__(None, None, None)
    return {"rate": n / wall, "wall": wall,
            "answers": viewers.answers if viewers else 0, "failures": viewers.failures if viewers else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    args = ap.parse_args()
    jobs = write_jobs(Path(tempfile.mkdtemp(prefix="batchrun-dashboard-")) / "jobs.jsonl", args.jobs)
    rows, ratios = [], []
    for i in range(args.rounds):
        order = (False, True) if i % 2 == 0 else (True, False)
        runs = {with_: one_run(jobs, args.jobs, args.redis_url, args.concurrency, with_) for with_ in order}
        without, with_ = runs[False], runs[True]
        ratios.append(with_["rate"] / without["rate"])
        rows.append([i + 1, "without, with" if order[0] is False else "with, without", f"{without['rate']:.0f}",
                     f"{with_['rate']:.0f}", f"{ratios[-1]:.2f}", f"{with_['answers']} ({with_['failures']} failed)"])
        print(f"round {i + 1}: {without['rate']:.0f} jobs/s without, {with_['rate']:.0f} with the dashboard open",
              file=sys.stderr, flush=True)
    print(f"\ncommand: {command_line()}")
    print(f"machine: {machine()}; {args.jobs} jobs, 1 worker, {args.concurrency} in flight; Redis {args.redis_url}\n")
    print(table(["round", "order", "jobs/s without", "jobs/s with", "with ÷ without", "dashboard answers"], rows))
    print(f"\nmedian ratio with ÷ without over {args.rounds} rounds: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
