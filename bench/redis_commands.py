"""Redis commands per job, from INFO commandstats, on the success path.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python bench/redis_commands.py [--jobs 10000]

A batch of small chat jobs runs end to end against `batchrun mock-server` (no limits, no faults,
so every job succeeds on its first attempt): `batchrun submit`, one `batchrun worker
--concurrency 200` (running before the clock starts), then `batchrun collect`. INFO commandstats
is read before and after each step; the difference, divided by the number of jobs, is the step's
cost per job. Commands run inside Lua scripts are counted too (each EVALSHA counts once, plus
every command it calls), and so are RQ's own (dequeue, job bookkeeping, heartbeats) and
maintenance's.

INFO commandstats counts for the whole server, so by default the benchmark starts its own
`redis-server` on a free port in 18000-18999 (nothing else talks to it); `--redis-url` uses another
server instead, whose other clients then count too.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (PYTHON, MockProcess, Workers, batchrun_env, command_line, command_stats, free_port,  # noqa: E402
                          machine, table, write_jobs)


class PrivateRedis:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = workdir

    def __enter__(self) -> PrivateRedis:
        import redis

        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir)], stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def delta(before: dict[str, int], after: dict[str, int]) -> Counter:
    return Counter({k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--shard-size", type=int, default=None, help="default: batchrun's own choice")
    ap.add_argument("--redis-url", default=None, help="default: a private redis-server on a free port")
    args = ap.parse_args()
    if args.redis_url is None and not shutil.which("redis-server"):
        sys.exit("no redis-server binary: pass --redis-url")

    import redis

    tmp = Path(tempfile.mkdtemp(prefix="batchrun-redis-commands-"))
    jobs = write_jobs(tmp / "jobs.jsonl", args.jobs)
    private = PrivateRedis(tmp) if args.redis_url is None else None
    if private:
        private.__enter__()
    url = private.url if private else args.redis_url
    try:
        conn = redis.Redis.from_url(url)
        conn.flushdb()
        steps: dict[str, Counter] = {}
        with MockProcess() as mock, Workers(1, url, mock.base_url, args.concurrency):
            s0 = command_stats(conn)
            sized = ["--shard-size", str(args.shard_size)] if args.shard_size else []
            sub = subprocess.run([PYTHON, "-m", "batchrun", "-q", "submit", str(jobs), *sized], env=batchrun_env(url),
                                 check=True, capture_output=True, text=True)
            batch_id = sub.stdout.split()[-1]
            s1 = command_stats(conn)
            while conn.hget(f"batchrun:batch:{batch_id}", "state") != b"finished":
                time.sleep(0.05)
            s2 = command_stats(conn)
        subprocess.run([PYTHON, "-m", "batchrun", "-q", "collect", batch_id, "-o", str(tmp / "out.jsonl")],
                       env=batchrun_env(url), check=True, capture_output=True)
        s3 = command_stats(conn)
        meta = {k.decode(): v.decode() for k, v in conn.hgetall(f"batchrun:batch:{batch_id}").items()}
        if int(meta.get("done", 0)) != args.jobs:
            raise RuntimeError(f"only {meta.get('done')} of {args.jobs} jobs done")
        # The stats commands themselves (INFO, and the polling above) are not the batch's.
        ours = {"info", "hget"} if not private else {"info"}
        steps["submit"] = delta(s0, s1)
        steps["run (workers)"] = delta(s1, s2)
        steps["collect"] = delta(s2, s3)
        for counter in steps.values():
            for name in ours:
                counter.pop(name, None)
        if not private:
            print("note: a shared server: other clients' commands count too", file=sys.stderr)
    finally:
        if private:
            private.__exit__()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()

    n = args.jobs
    total = sum((c for c in steps.values()), Counter())
    rows = [[step, f"{sum(c.values()) / n:.2f}", f"{c.get('evalsha', 0) / n:.3f}",
             ", ".join(f"{k} {v / n:.2f}" for k, v in c.most_common(6))] for step, c in steps.items()]
    rows.append(["all steps", f"{sum(total.values()) / n:.2f}", f"{total.get('evalsha', 0) / n:.3f}",
                 ", ".join(f"{k} {v / n:.2f}" for k, v in total.most_common(6))])
    print(f"\ncommand: {command_line()}")
    print(f"machine: {machine()}; {'a private redis-server' if private else url}; {n} jobs, all succeeding; "
          f"shard size {meta.get('shard_size')} ({meta.get('shards')} shards); 1 worker, --concurrency {args.concurrency}; target: ≤ 10 per job\n")
    print(table(["step", "commands per job", "of which EVALSHA", "top commands per job"], rows, "lrrl"))
    run = steps["run (workers)"]
    print("\nrun (workers), every command per job:\n")
    print(table(["command", "per job"], [[k, f"{v / n:.3f}"] for k, v in run.most_common()], "lr"))


if __name__ == "__main__":
    main()
