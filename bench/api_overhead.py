"""The overhead of the library over the command: `batchrun.run(list of dicts)` against
`batchrun run FILE -o OUT`, the same jobs, in the same run.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python bench/api_overhead.py [--quick] [--redis-url URL]

Both send N small chat jobs (default 20,000; --quick 2,000) to one `batchrun mock-server`
process (no limits, no latency) on the same machine, each from a fresh Python process, so both
walls include the interpreter's start and batchrun's import:

  cli   `batchrun -q run JOBS -o OUT --concurrency C`, the job file written beforehand
  api   a script that builds the same N request bodies as dicts and calls
        `batchrun.run(bodies, concurrency=C, progress=False)`, which returns N Results in order

No Redis named: both on the in-process one. With --redis-url (flushed before each run), both on
that Redis. The runs alternate, --repeat times each; the table gives, for each, the median and the
fastest wall and the median CPU seconds (user + system, of the process and the worker processes it
waited for), and the ratios api / cli (the issue's goal: at most 1.05). On a shared machine the
walls swing by half between runs; the fastest wall and the CPU seconds swing far less, so their
ratios are the ones to read there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PYTHON, MockProcess, command_line, env, machine, table, write_jobs  # noqa: E402

API_SCRIPT = """
import sys, batchrun
n, concurrency, redis_url = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None
bodies = [{"model": "gpt-4o-mini", "max_tokens": 16,
           "messages": [{"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": f"Tell me one fact about the number {i}."}]} for i in range(n)]
results = batchrun.run(bodies, concurrency=concurrency, progress=False, redis_url=redis_url)
assert len(results) == n and all(r.ok for r in results), "not every job came back ok"
"""


def _flush(redis_url: str | None) -> None:
    if redis_url:
        import redis

        redis.Redis.from_url(redis_url).flushdb()


class Measured(tuple):
    """(wall seconds, CPU seconds) of one run."""

    wall = property(lambda self: self[0])
    cpu = property(lambda self: self[1])


def run_measured(cmd: list[str], env_: dict) -> Measured:
    """Run ``cmd`` to its end: its wall, and the CPU seconds of it and of the children it reaped."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env_, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # a child's rusage counts the grandchildren it waited for
    wall = time.monotonic() - started
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return Measured((wall, usage.ru_utime + usage.ru_stime))


def run_cli(jobs: Path, out: Path, mock: MockProcess, concurrency: int, redis_url: str | None) -> Measured:
    for p in (out, out.with_name(out.stem + ".errors.jsonl"), out.with_name(out.stem + ".batchrun.json")):
        p.unlink(missing_ok=True)
    _flush(redis_url)
    cmd = [PYTHON, "-m", "batchrun", "-q", "run", str(jobs), "-o", str(out), "--concurrency", str(concurrency)]
    cmd += ["--redis-url", redis_url] if redis_url else []
    measured = run_measured(cmd, _env(mock))
    with open(out) as f, open(jobs) as g:
        lines, expected = sum(1 for _ in f), sum(1 for _ in g)
    if lines != expected:
        raise RuntimeError(f"batchrun run wrote {lines} results of {expected}")
    return measured


def run_api(n: int, mock: MockProcess, concurrency: int, redis_url: str | None) -> Measured:
    _flush(redis_url)
    return run_measured([PYTHON, "-c", API_SCRIPT, str(n), str(concurrency), redis_url or ""], _env(mock))


def _env(mock: MockProcess) -> dict:
    e = env(OPENAI_BASE_URL=mock.base_url, OPENAI_API_KEY="sk-bench")
    e.pop("BATCHRUN_REDIS_URL", None)
    return e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 jobs")
    ap.add_argument("-n", type=int, default=None, help="jobs (default 20,000)")
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--redis-url", default=None, help="run both on this Redis (FLUSHED before each run)")
    args = ap.parse_args()
    n = args.n or (2000 if args.quick else 20000)
    runs: dict[str, list[Measured]] = {"cli": [], "api": []}
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp, MockProcess() as mock:
        jobs = write_jobs(Path(tmp) / "jobs.jsonl", n)
        for i in range(args.repeat):
            for kind in ("cli", "api") if i % 2 == 0 else ("api", "cli"):
                m = (run_cli(jobs, Path(tmp) / "out.jsonl", mock, args.concurrency, args.redis_url)
                     if kind == "cli" else run_api(n, mock, args.concurrency, args.redis_url))
                runs[kind].append(m)
                print(f"{kind} #{i + 1}: {m.wall:.2f} s wall, {m.cpu:.2f} s CPU", file=sys.stderr, flush=True)
    fig = {kind: (statistics.median(m.wall for m in ms), min(m.wall for m in ms), statistics.median(m.cpu for m in ms))
           for kind, ms in runs.items()}
    print(f"command: {command_line()}")
    print(f"{n} jobs, concurrency {args.concurrency}, {'Redis ' + args.redis_url if args.redis_url else 'in-process Redis'}, "
          f"mock server in its own process; {args.repeat} runs each, alternating; machine: {machine()}\n")
    rows = []
    for kind, label in (("cli", "`batchrun run FILE` (cli)"), ("api", "`batchrun.run(dicts)` (api)")):
        med, best, cpu = fig[kind]
        rows.append([label, f"{med:.2f}", f"{best:.2f}", f"{cpu:.2f}", " ".join(f"{m.wall:.1f}" for m in runs[kind]),
                     f"{med / fig['cli'][0]:.3f}", f"{best / fig['cli'][1]:.3f}", f"{cpu / fig['cli'][2]:.3f}"])
    print(table(["run", "wall s (median)", "wall s (fastest)", "CPU s (median)", "walls s",
                 "÷ cli (median)", "÷ cli (fastest)", "÷ cli (CPU)"], rows))
    for name, i in (("median wall", 0), ("fastest wall", 1), ("CPU", 2)):
        print(f"overhead of the api by {name}: {100 * (fig['api'][i] / fig['cli'][i] - 1):+.1f} %", end="; ")
    print("(goal: at most +5 %)")


if __name__ == "__main__":
    main()
