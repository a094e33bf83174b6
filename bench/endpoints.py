"""The spread over endpoints: two endpoints of T tokens per minute each against one of T.

    TIKTOKEN_CACHE_DIR=/path/to/tiktoken_cache python bench/endpoints.py [--tpm 12000] [--jobs 200]

The same TPM-bound batch is run by `batchrun --config FILE run` twice, measured in the same run:
  (a) the baseline: one [[endpoints]] table, a mock server limited to T;
  (b) two [[endpoints]] tables, each its own mock server limited to T.
Wall time is the servers' view: from the first request admitted to the last (per-second buckets).
The ratio (b) ÷ (a) should be about 0.5. Needs a Redis server (default redis://127.0.0.1:6379/14,
flushed before each run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batchrun.mock import MockConfig, MockServerThread  # noqa: E402
from bench.common import PYTHON, command_line, env, machine, table, write_jobs  # noqa: E402


def _wall(stats: list[dict]) -> int:
    seconds = [sec for s in stats for sec, *_ in s["per_second"]]
    return max(seconds) - min(seconds) + 1 if seconds else 0


def run_once(n_endpoints: int, tpm: int, jobs: Path, redis_url: str, work: Path) -> dict:
    redis.Redis.from_url(redis_url).flushdb()
    servers = [MockServerThread(MockConfig(tpm=tpm)).__enter__() for _ in range(n_endpoints)]
    try:
        config = work / f"endpoints{n_endpoints}.toml"
        config.write_text("\n".join(f'[[endpoints]]\nname = "e{i}"\nbase_url = "{s.base_url}"\ntpm = [{tpm}]\n'
                                    for i, s in enumerate(servers)))
        out = work / f"out{n_endpoints}.jsonl"
        started = time.monotonic()
        proc = subprocess.run([PYTHON, "-m", "batchrun", "--config", str(config), "run", str(jobs), "-o", str(out)],
                              env=env(BATCHRUN_REDIS_URL=redis_url), capture_output=True, text=True)
        elapsed = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"run with {n_endpoints} endpoint(s) failed: {proc.stderr[-2000:]}")
        stats = [s.stats() for s in servers]
    finally:
        for s in servers:
            s.__exit__(None, None, None)
    return {"wall": _wall(stats), "elapsed": elapsed, "tokens": sum(s["tokens_charged"] for s in stats),
            "rate_limited": sum(s["by_status"].get("429", 0) for s in stats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tpm", type=int, default=12_000)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        jobs = write_jobs(work / "jobs.jsonl", args.jobs)
        one = run_once(1, args.tpm, jobs, args.redis_url, work)
        two = run_once(2, args.tpm, jobs, args.redis_url, work)
    print(f"{command_line()}  ({machine()}; {args.jobs} jobs, T = {args.tpm:,} TPM per endpoint)")
    rows = [[name, r["wall"], f"{r['elapsed']:.1f}", f"{r['tokens']:,}", r["rate_limited"]]
            for name, r in (("one endpoint of T (baseline)", one), ("two endpoints of T each", two))]
    print(table(["run", "wall s (servers)", "command s", "tokens charged", "429s"], rows, "lrrrr"))
    print(f"two ÷ one: wall {two['wall'] / one['wall']:.2f} (ideal 0.50), command {two['elapsed'] / one['elapsed']:.2f}")


if __name__ == "__main__":
    main()
