"""Chaos: workers killed at random and a Redis restart in the middle of a batch; nothing lost or doubled.

    TIKTOKEN_CACHE_DIR=../shared/tiktoken_cache python bench/chaos.py [--jobs 3000] [--runs 5]

Each run: a Redis with AOF (appendfsync always) on a spare port; `batchrun mock-server` answering
10 % 429, 5 % 500 and 2 % broken streams (half disconnects, half truncations; a third of the jobs
stream); 3 `batchrun worker` processes, each in its own process group. A killer sends SIGKILL to a
random worker and all its descendants every few seconds, as a lost machine: the RQ worker and its
work horse, which RQ puts in a process group of its own (so killing the worker's group alone
leaves the horse running its shard). It checks that every process it killed is gone, and starts a
new worker. Redis is stopped and started again once, mid-run. At the end:
every custom_id exactly once across results and errors, each result matching its request, no job
in errors, and the run's count of requests sent.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batchrun.mock import MockConfig, MockServerThread, reply_text  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throwaway redis-server with AOF, restartable on the same port and data."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.port = port or free_port()
        self.dir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                                      "--dir", str(self.dir)], stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        self.proc.kill()  # no clean shutdown: what AOF kept is what survives
        self.proc.wait()


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, then the parent's pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and fields[0] not in ("Z", "X"):
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def kill_machine(proc: subprocess.Popen, timeout: float = 5.0) -> list[int]:
    """SIGKILL ``proc`` (a worker started in its own session) and every process below it, as a lost
    machine; returns their pids, after checking that none of them runs any more. The worker's
    group is stopped first, so that it cannot fork a new work horse between the look and the kill."""
    os.killpg(proc.pid, signal.SIGSTOP)
    victims = [proc.pid, *descendants(proc.pid)]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in victims[1:]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in victims):
        if time.monotonic() > deadline:
            raise RuntimeError(f"still running after SIGKILL: {[pid for pid in victims if alive(pid)]}")
        time.sleep(0.01)
    return victims


def make_jobs(path: Path, n: int) -> dict[str, dict]:
    jobs = {}
    with open(path, "w") as f:
        for i in range(n):
            body = {"model": "gpt-4o-mini", "max_tokens": 24,
                    "messages": [{"role": "user", "content": f"Chaos job number {i}: say something."}]}
            if i % 3 == 0:
                body["stream"] = True
            line = {"custom_id": f"chaos-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            jobs[line["custom_id"]] = line
            f.write(json.dumps(line) + "\n")
    return jobs


def run_once(n_jobs: int, workers: int, kill_every: float, seed: int, redis_port: int | None = None) -> dict:
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="batchrun-chaos-"))
    jobs = make_jobs(tmp / "jobs.jsonl", n_jobs)
    server = RedisServer(tmp, redis_port)
    server.start()
    faults = {"429": 0.10, "500": 0.05, "stream_disconnect": 0.01, "stream_truncate": 0.01}
    kills = restarts = killed_horses = 0
    procs: list[subprocess.Popen] = []
    with MockServerThread(MockConfig(latency_ms=20, error_rates=faults, seed=seed)) as mock:
        env = {**os.environ, "BATCHRUN_REDIS_URL": server.url, "OPENAI_BASE_URL": mock.base_url,
               "OPENAI_API_KEY": "sk-chaos", "BATCHRUN_LEASE_SECONDS": "5"}

        def start_worker() -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "batchrun", "-q", "worker", "--concurrency", "50"],
                                    env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)

        out = subprocess.run([sys.executable, "-m", "batchrun", "-q", "submit", str(tmp / "jobs.jsonl"),
                              "--shard-size", str(max(1, n_jobs // 12)), "--backoff-base", "0.2",
                              "--backoff-cap", "5"], env=env, check=True, capture_output=True, text=True)
        batch_id = out.stdout.split()[-1]
        started = time.monotonic()
        procs = [start_worker() for _ in range(workers)]
        conn = redis.Redis.from_url(server.url, socket_timeout=5)
        next_kill = started + kill_every
        restart_at = None
        try:
            while True:
                time.sleep(0.2)
                try:
                    meta = conn.hgetall(f"batchrun:batch:{batch_id}")
                except (redis.ConnectionError, redis.TimeoutError):
                    continue
                ended = int(meta.get(b"done", 0)) + int(meta.get(b"failed", 0))
                if meta.get(b"state") == b"finished":
                    break
                if restart_at is None and ended >= n_jobs // 2:
                    server.kill()
                    time.sleep(1.0)
                    server.start()
                    restarts += 1
                    restart_at = time.monotonic() - started
                if time.monotonic() >= next_kill:
                    victim = rng.randrange(len(procs))
                    killed_horses += len(kill_machine(procs[victim])) - 1
                    procs[victim] = start_worker()
                    kills += 1
                    next_kill = time.monotonic() + kill_every * rng.uniform(0.5, 1.5)
                if time.monotonic() - started > 600:
                    raise RuntimeError(f"not finished after 600 s: {ended} of {n_jobs} ended")
            wall = time.monotonic() - started
            load = os.getloadavg()[1]  # the machine's 5-minute load: other work slows a run down
            sent = mock.stats()["requests"]
        finally:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for p in procs:
                p.wait(timeout=60)
    results, errors = tmp / "results.jsonl", tmp / "errors.jsonl"
    subprocess.run([sys.executable, "-m", "batchrun", "-q", "collect", batch_id, "-o", str(results), "--errors",
                    str(errors)], env=env, check=True, capture_output=True)
    server.kill()
    res = [json.loads(line) for line in open(results)]
    err = [json.loads(line) for line in open(errors)] if errors.exists() else []
    ids = [r["custom_id"] for r in res] + [e["custom_id"] for e in err]
    mismatched = [r["custom_id"] for r in res
                  if r["response"]["body"]["choices"][0]["message"]["content"]
                  != reply_text(jobs[r["custom_id"]]["url"], jobs[r["custom_id"]]["body"])]
    return {"jobs": n_jobs, "lines": len(ids), "distinct": len(set(ids)), "missing": len(set(jobs) - set(ids)),
            "errors": len(err), "mismatched": len(mismatched), "kills": kills, "horses_killed": killed_horses,
            "redis_restarts": restarts,
            "restart_at_s": round(restart_at or 0, 1), "sent": sent, "sent_per_job": sent / n_jobs,
            "wall_s": wall, "load_5min": load,
            "ok": len(ids) == len(set(ids)) == n_jobs and not err and not mismatched and restarts == 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills, on average")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--redis-port", type=int, default=None, help="port for its redis-server (default: a free one)")
    args = ap.parse_args()
    print(f"command: {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"cores: {os.cpu_count()}")
    print("| run | jobs | kills (work horses among the killed) | Redis restarts | requests sent ÷ jobs | wall s | load (5 min) | exactly once, all match, no errors |")
    print("|-----|------|--------------------------------------|----------------|----------------------|--------|--------------|------------------------------------|")
    all_ok = True
    for i in range(args.runs):
        r = run_once(args.jobs, args.workers, args.kill_every, seed=i + 1, redis_port=args.redis_port)
        all_ok &= r["ok"]
        print(f"| {i + 1} | {r['jobs']} | {r['kills']} ({r['horses_killed']}) | {r['redis_restarts']} (at {r['restart_at_s']} s) | "
              f"{r['sent_per_job']:.3f} | {r['wall_s']:.1f} | {r['load_5min']:.1f} | "
              f"{'yes' if r['ok'] else 'NO: ' + json.dumps(r)} |", flush=True)
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
