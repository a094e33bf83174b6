"""--via auto --deadline against all-live, on the mock: the split, the time and the cost.

Both runs are `batchrun run` processes against one mock server (its own process-free thread,
RPM-limited like a real account) in the same run of this script: the baseline sends every job
live at the same --rpm; the auto run gets a deadline shorter than the all-live run needs, so the
share the live budget cannot carry by then goes through the mock's Batch API at half price.

    python bench/batch_split.py [--jobs 1200] [--rpm 1200] [--deadline 30] [--batch-seconds 5]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PYTHON, command_line, env, machine, table, write_jobs  # noqa: E402
from batchrun.mock import MockServerThread  # noqa: E402


def run(jobs: Path, out: Path, base_url: str, rpm: int, *extra: str) -> tuple[float, float, float, str]:
    """(seconds in all, seconds since the batch was made, USD counted, stderr) of one `batchrun run`."""
    started = time.monotonic()
    made = None
    proc = subprocess.Popen([PYTHON, "-m", "batchrun", "run", str(jobs), "-o", str(out), "--rpm", str(rpm), *extra],
                            env=env(OPENAI_BASE_URL=base_url, OPENAI_API_KEY="sk-bench"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if made is None and " job(s) on " in line:  # the batch exists: its deadline counts from here
            made = time.monotonic()
    if proc.wait(timeout=3600) != 0:
        sys.exit(f"batchrun run failed ({proc.returncode}): {''.join(lines)[-2000:]}")
    ended = time.monotonic()
    log = "".join(lines)
    costs = re.findall(r"\$(\d+\.\d+)\s*$", log, re.M)
    return ended - started, ended - (made or started), float(costs[-1]) if costs else 0.0, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1200)
    parser.add_argument("--rpm", type=int, default=1200)
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds, for the auto run")
    parser.add_argument("--batch-seconds", type=float, default=5.0, help="the mock's time per remote batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, MockServerThread(rpm=args.rpm, batch_seconds=args.batch_seconds) as srv:
        jobs = write_jobs(Path(tmp) / "jobs.jsonl", args.jobs)
        live_s, _, live_usd, _ = run(jobs, Path(tmp) / "live.jsonl", srv.base_url, args.rpm)
        before = srv.stats()["requests"]
        auto_s, auto_batch_s, auto_usd, log = run(jobs, Path(tmp) / "auto.jsonl", srv.base_url, args.rpm, "--via", "auto",
                                    "--deadline", f"{args.deadline}s")
        auto_live = srv.stats()["requests"] - before
        results = sum(1 for _ in open(Path(tmp) / "auto.jsonl"))
    split = re.search(r"(\d+) job\(s\) live by the deadline.*?, (\d+) through the Batch API", log)
    print(f"{command_line()}  ({machine()}; mock at {args.rpm:,} RPM, remote batches take {args.batch_seconds:g} s)")
    print(table(["run", "live jobs", "Batch API jobs", "seconds", "cost", "cost vs all-live"], [
        ["all live (baseline)", f"{args.jobs:,}", "0", f"{live_s:.1f}", f"${live_usd:.4f}", "1.00"],
        [f"auto, deadline {args.deadline:g} s", f"{auto_live:,}", f"{args.jobs - auto_live:,}", f"{auto_s:.1f}",
         f"${auto_usd:.4f}", f"{auto_usd / live_usd:.2f}" if live_usd else "-"],
    ]))
    print(f"split chosen: {split.group(1) if split else '?'} live, {split.group(2) if split else '?'} via the Batch API; "
          f"the auto batch {'met' if auto_batch_s <= args.deadline else 'MISSED'} its deadline: it ended "
          f"{auto_batch_s:.1f} s after it was made, of {args.deadline:g} s ({auto_s:.1f} s with the process's start); "
          f"{results:,} results")
    print(json.dumps({"live_s": live_s, "auto_s": auto_s, "auto_batch_s": auto_batch_s, "live_usd": live_usd, "auto_usd": auto_usd,
                      "auto_live_jobs": auto_live}))


if __name__ == "__main__":
    main()
