"""Fair share between batches: this tree against a baseline tree (default: branch main), same run.

    TIKTOKEN_CACHE_DIR=/path/to/tiktoken_cache python bench/fairshare.py [--redis-url URL] [--baseline-ref main]

Each scenario runs twice, once with each tree's `batchrun worker` (two processes) and `batchrun
submit`, against the mock server, every batch with --tpm 60000 on one budget (same key, model):
  small latency   a 2,000-job batch (two shards) holds both workers; a 10-job batch is submitted:
                  seconds until it has finished (capped at --cap: the baseline waits for
                  max_shard_seconds, 600 s)
  2:1 share       two 3,000-job batches, one with --priority 2 (the baseline has no --priority:
                  both are equal there): the weighted one's share of the jobs finished over 10 s
  low yields      a --priority low batch alone, then a normal one: the normal one's share over
                  6 s, from 4 s after it arrived
Needs a Redis server (default redis://127.0.0.1:6379/14, flushed before each scenario).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, command_line, machine, write_jobs  # noqa: E402
from batchrun.mock import MockConfig, MockServerThread  # noqa: E402

TPM = "60000"


class Tree:
    """One batchrun tree's processes on one Redis and mock server."""

    def __init__(self, name: str, path: Path, url: str, base_url: str, tmp: Path, fair: bool):
        self.name, self.path, self.url, self.tmp, self.fair = name, path, url, tmp, fair
        self.env = {**os.environ, "PYTHONPATH": str(path), "BATCHRUN_REDIS_URL": url,
                    "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "sk-bench"}
        self.redis = redis.Redis.from_url(url)
        self.workers: list[subprocess.Popen] = []

    def start(self) -> None:
        self.redis.flushdb()
        self.workers = [subprocess.Popen([sys.executable, "-m", "batchrun", "-q", "worker", "--concurrency", "100",
                                          "--grace", "5"], env=self.env, cwd=self.tmp,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]

    def stop(self) -> None:
        for w in self.workers:
            w.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
        self.redis.flushdb()

    def submit(self, name: str, n: int, *args: str, priority: str | None = None) -> None:
        jobs = write_jobs(self.tmp / f"{name}.jsonl", n, prefix=name)
        extra = ["--priority", priority] if priority and self.fair else []
        subprocess.run([sys.executable, "-m", "batchrun", "-q", "submit", str(jobs), "--tpm", TPM, "--batch-id", name,
                        *args, *extra], env=self.env, cwd=self.tmp, check=True, capture_output=True)

    def done(self, batch_id: str) -> int:
        return int(self.redis.hget(f"batchrun:batch:{batch_id}", "done") or 0)

    def wait_for(self, what, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def counted(self, batches: list[str], seconds: float) -> dict[str, int]:
        before = {b: self.done(b) for b in batches}
        time.sleep(seconds)
        return {b: self.done(b) - before[b] for b in batches}


def small_latency(t: Tree, cap: float) -> float:
    t.submit("big", 2000, "--shard-size", "1000")
    t.wait_for(lambda: t.done("big") > 100, 60)
    time.sleep(2)
    started = time.monotonic()
    t.submit("small", 10)
    t.wait_for(lambda: t.done("small") == 10, cap)
    return time.monotonic() - started


def weighted_share(t: Tree) -> float:
    t.submit("a", 3000, "--shard-size", "3000", priority="2")
    t.submit("b", 3000, "--shard-size", "3000")
    t.wait_for(lambda: t.done("a") > 20 and t.done("b") > 20, 60)
    time.sleep(2)
    counts = t.counted(["a", "b"], 10)
    return counts["a"] / max(1, counts["a"] + counts["b"])


def low_yields(t: Tree) -> float:
    t.submit("low", 3000, "--shard-size", "3000", priority="low")
    t.wait_for(lambda: t.done("low") > 20, 60)
    time.sleep(2)
    t.submit("normal", 3000, "--shard-size", "3000")
    t.wait_for(lambda: t.done("normal") > 0, 30)
    time.sleep(4)
    counts = t.counted(["low", "normal"], 6)
    return counts["normal"] / max(1, counts["low"] + counts["normal"])


def baseline_tree(ref: str, where: Path) -> Path:
    """The baseline's batchrun package, from git (a user's clone has the branch too)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "batchrun"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--baseline-ref", default="main")
    parser.add_argument("--cap", type=float, default=60.0, help="Seconds the small batch is waited for at most.")
    args = parser.parse_args()
    scenarios = [("small latency (s)", lambda t: small_latency(t, args.cap)),
                 ("2:1 share of the weighted batch", weighted_share),
                 ("normal's share against a low batch", low_yields)]
    with tempfile.TemporaryDirectory(prefix="batchrun-bench-") as tmp, MockServerThread(MockConfig()) as srv:
        Path(tmp, "baseline").mkdir()
        base = baseline_tree(args.baseline_ref, Path(tmp) / "baseline")
        trees = [Tree(args.baseline_ref, base, args.redis_url, srv.base_url, Path(tmp), fair=False),
                 Tree("this tree", ROOT, args.redis_url, srv.base_url, Path(tmp), fair=True)]
        print(f"# {command_line()}  ({machine()}, 2 worker processes, --tpm {TPM}, mock server)")
        print(f"{'scenario':36} {args.baseline_ref:>10} {'this tree':>10} {'ratio':>7}")
        for title, scenario in scenarios:
            figures = []
            for t in trees:
                t.start()
                try:
                    figures.append(scenario(t))
                finally:
                    t.stop()
            ratio = figures[0] / figures[1] if "latency" in title else figures[1] / max(figures[0], 1e-9)
            shown = [f"{f:>10.1f}" if "latency" in title else f"{f:>10.0%}" for f in figures]
            capped = " (capped)" if "latency" in title and figures[0] >= args.cap else ""
            print(f"{title:36} {shown[0]} {shown[1]} {ratio:>6.1f}x{capped}")


if __name__ == "__main__":
    main()
