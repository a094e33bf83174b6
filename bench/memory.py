"""Worker memory with 1,000 requests in flight.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python bench/memory.py [--in-flight 1000]

`batchrun mock-server --latency-ms 3000` holds every answer 3 s, so a `batchrun worker
--concurrency 1000` has 1,000 requests in flight for most of the run. Its memory is sampled every
50 ms: the RQ worker process and its work horse (the process RQ forks to run the shard). The horse
shares most of its pages with the worker it was forked from (Python, the libraries, tiktoken's
encodings), so its RSS counts them a second time; "both" is the worker's RSS plus the horse's own
pages (USS), the memory the two take together, and PSS (shared pages split between the processes
sharing them) says the same another way. Baseline: the minimal single-process aiohttp loop of
bench/throughput.py, with the same 1,000 in flight (its peak RSS from the kernel).

Needs a Redis server (default redis://127.0.0.1:6379/10, flushed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (PYTHON, MockProcess, Workers, batchrun_env, command_line, machine,  # noqa: E402
                          memory_mb, table, write_jobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in-flight", type=int, default=1000)
    ap.add_argument("--latency-ms", type=float, default=3000)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    args = ap.parse_args()

    import os

    import redis

    conn = redis.Redis.from_url(args.redis_url)
    conn.flushdb()
    tmp = Path(tempfile.mkdtemp(prefix="batchrun-memory-"))
    n = 4 * args.in_flight
    jobs = write_jobs(tmp / "jobs.jsonl", n)
    rows = []
    with MockProcess("--latency-ms", str(args.latency_ms)) as mock:
        with Workers(1, args.redis_url, mock.base_url, args.in_flight) as fleet:
            idle = memory_mb(fleet.procs[0].pid)
            # One shard, so that one work horse holds all 1,000 in flight.
            sub = subprocess.run([PYTHON, "-m", "batchrun", "-q", "submit", str(jobs), "--shard-size", str(n)],
                                 env=batchrun_env(args.redis_url), check=True, capture_output=True, text=True)
            batch_id = sub.stdout.split()[-1]
            peak: dict[str, float] = {}
            in_flight_seen = 0
            while conn.hget(f"batchrun:batch:{batch_id}", "state") != b"finished":
                parent = memory_mb(fleet.procs[0].pid)
                horse = {"rss": 0.0, "pss": 0.0, "uss": 0.0}
                for pid in fleet.horse_pids():
                    for k, v in memory_mb(pid).items():
                        horse[k] += v
                sample = {"parent rss": parent["rss"], "parent pss": parent["pss"], "horse rss": horse["rss"],
                          "horse pss": horse["pss"], "horse uss": horse["uss"],
                          "total": parent["rss"] + horse["uss"], "total pss": parent["pss"] + horse["pss"]}
                for k, v in sample.items():
                    peak[k] = max(peak.get(k, 0.0), v)
                in_flight_seen = max(in_flight_seen, conn.zcard(f"batchrun:batch:{batch_id}:leases"))
                time.sleep(0.05)
        rows.append(["batchrun worker: RQ worker process", args.in_flight, f"{idle['rss']:.0f}",
                     f"{peak['parent rss']:.0f}", f"{peak['parent pss']:.0f}", "", ""])
        rows.append(["batchrun worker: work horse (forked)", args.in_flight, "", f"{peak['horse rss']:.0f}",
                     f"{peak['horse pss']:.0f}", f"{peak['horse uss']:.0f}", ""])
        rows.append(["batchrun worker: both", args.in_flight, "", f"{peak['total']:.0f}", f"{peak['total pss']:.0f}",
                     "", "≤ 200 MB"])
        print(f"batchrun: peak {peak['total']:.0f} MB with up to {in_flight_seen} leased", file=sys.stderr, flush=True)

        out = tmp / "baseline.jsonl"
        proc = subprocess.Popen([PYTHON, str(Path(__file__).with_name("throughput.py")), "--child", "minimal",
                                 "--child-jobs", str(jobs), "--child-url", mock.base_url, "--child-out", str(out),
                                 "--concurrency", str(args.in_flight)])
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError("the baseline failed")
        rows.append(["baseline: minimal aiohttp loop", args.in_flight, "", f"{usage.ru_maxrss / 1024:.0f}", "", "",
                     ""])
    conn.flushdb()

    print(f"\ncommand: {command_line()}")
    print(f"machine: {machine()}; mock answers after {args.latency_ms:g} ms; {n} jobs in one shard; "
          f"up to {in_flight_seen} jobs leased (in flight) at once\n")
    print(table(["process", "in flight", "RSS idle MB", "peak RSS MB", "peak PSS MB", "peak USS MB", "target"],
                rows, "lrrrrrl"))


if __name__ == "__main__":
    main()
