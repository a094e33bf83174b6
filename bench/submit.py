"""Submit and collect at scale: a 1,000,000-line file in, 1,000,000 outcomes out.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python bench/submit.py [--lines 1000000]

  submit    `batchrun submit FILE` as a process of its own: lines per second (validation, both
            passes over the file and loading Redis included, process start too) and the peak
            resident memory of that process (the kernel's high-water mark)
  collect   the batch's outcomes are put in Redis as workers record them (the `complete` script,
            500 at a time; 1 in 50 an error line), then `batchrun collect ID -o OUT` writes them
            to the results and errors files: lines per second and peak memory, as for submit
  floor     for scale, one process that only reads the file and parses each line (json.loads),
            the least any submit written in Python does

Needs a Redis server (default redis://127.0.0.1:6379/10, flushed before and after; the batch
takes about 1 GB of Redis memory at 1,000,000 lines).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PYTHON, batchrun_env, command_line, machine, run_measured, table, write_jobs  # noqa: E402

FLOOR = "import json, sys\nfor line in open(sys.argv[1], 'rb'):\n    json.loads(line)\n"


def fill_outcomes(redis_url: str, batch_id: str, n: int, prefix: str) -> float:
    """Record an outcome for each of the n jobs, as workers do (BatchStore.complete); returns seconds."""
    from batchrun.state.connections import connect
    from batchrun.files.outputs import error_line, result_line
    from batchrun.state.store import BatchStore

    store = BatchStore(connect(redis_url))
    started = time.monotonic()
    body = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "mock answer " * 8,
                                                 "refusal": None}, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36}}
    items = []
    for i in range(n):
        cid = f"{prefix}-{i}"
        if i % 50 == 49:
            items.append(("E", cid, json.dumps(error_line(cid, code="invalid_request", message="bench error"))))
        else:
            items.append(("R", cid, json.dumps(result_line(cid, status_code=200, request_id=f"req_{i}", body=body))))
        if len(items) == 500:  # as workers record them (batching.Batcher: at most 500 a call)
            store.complete(batch_id, items)
            items = []
    if items:
        store.complete(batch_id, items)
    return time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    args = ap.parse_args()

    import redis

    conn = redis.Redis.from_url(args.redis_url)
    tmp = Path(tempfile.mkdtemp(prefix="batchrun-submit-bench-"))
    jobs = write_jobs(tmp / "jobs.jsonl", args.lines, prefix="job")
    size_mb = jobs.stat().st_size / 1e6
    env = batchrun_env(args.redis_url)
    rows = []
    try:
        conn.flushdb()
        floor_wall, floor_rss, _ = run_measured([PYTHON, "-c", FLOOR, str(jobs)], env)
        print(f"floor: {args.lines / floor_wall:.0f} lines/s", file=sys.stderr, flush=True)

        wall, rss, out = run_measured([PYTHON, "-m", "batchrun", "-q", "submit", str(jobs), "--batch-id", "bench-submit"],
                                      env)
        added = int(out.split()[0])
        if added != args.lines:
            raise RuntimeError(f"submit added {added} jobs, expected {args.lines}")
        rows.append(["submit (`batchrun submit`)", args.lines, f"{wall:.1f}", f"{args.lines / wall:.0f}",
                     f"{args.lines / wall / (args.lines / floor_wall):.2f}", f"{rss:.0f}", "≥ 50,000 lines/s, ≤ 200 MB"])
        print(f"submit: {args.lines / wall:.0f} lines/s, peak {rss:.0f} MB", file=sys.stderr, flush=True)

        fill = fill_outcomes(args.redis_url, "bench-submit", args.lines, "job")
        print(f"outcomes recorded in {fill:.1f} s", file=sys.stderr, flush=True)
        results = tmp / "results.jsonl"
        wall, rss, out = run_measured([PYTHON, "-m", "batchrun", "-q", "collect", "bench-submit", "-o", str(results)],
                                      env)
        errors = tmp / "results.errors.jsonl"
        written = sum(1 for _ in open(results)) + sum(1 for _ in open(errors))
        if written != args.lines:
            raise RuntimeError(f"collect wrote {written} lines, expected {args.lines}")
        rows.append(["collect (`batchrun collect`)", args.lines, f"{wall:.1f}", f"{args.lines / wall:.0f}",
                     f"{args.lines / wall / (args.lines / floor_wall):.2f}", f"{rss:.0f}", "≥ 50,000 lines/s, ≤ 200 MB"])
        print(f"collect: {args.lines / wall:.0f} lines/s, peak {rss:.0f} MB", file=sys.stderr, flush=True)
        rows.append(["floor: read + json.loads per line", args.lines, f"{floor_wall:.1f}",
                     f"{args.lines / floor_wall:.0f}", "1.00", f"{floor_rss:.0f}", ""])
    finally:
        conn.flushdb()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()

    print(f"\ncommand: {command_line()}")
    print(f"machine: {machine()}; Redis {args.redis_url}; job file {args.lines} lines, {size_mb:.0f} MB; "
          f"outcome lines ~{700} bytes\n")
    print(table(["step", "lines", "wall s", "lines/s", "÷ floor", "peak RSS MB", "target"], rows, "lrrrrrl"))


if __name__ == "__main__":
    main()
