"""Helpers shared by the speed benchmarks (throughput, submit, memory, redis_commands).

Each benchmark runs `batchrun` the way a user does: `batchrun mock-server`, `batchrun worker`,
`batchrun submit` and `batchrun collect` as their own processes.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MODEL = "gpt-4o-mini"


def env(**extra: str) -> dict:
    """The environment of the processes a benchmark starts: they run the batchrun of this tree."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""), **extra}


def command_line() -> str:
    """The command that is running now, to print with its figures."""
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def machine() -> str:
    import platform

    return f"{os.cpu_count()} cores, Python {platform.python_version()}"


def free_port(start: int = 18000, end: int = 18999) -> int:
    """A free TCP port in 18000-18999 (this project's benchmark range)."""
    for port in range(start, end):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{end}")


def write_jobs(path: Path, n: int, *, max_tokens: int = 16, prefix: str = "job") -> Path:
    """n small chat jobs (Batch API lines), each prompt distinct."""
    with open(path, "w") as f:
        for i in range(n):
            body = {"model": MODEL, "max_tokens": max_tokens,
                    "messages": [{"role": "system", "content": "Answer briefly."},
                                 {"role": "user", "content": f"Tell me one fact about the number {i}."}]}
            f.write(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")
    return path


def rss_mb(pid: int) -> float:
    """Resident memory of a process now (VmRSS), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def memory_mb(pid: int) -> dict[str, float]:
    """RSS, PSS (shared pages split among the processes sharing them) and USS (pages this process
    alone has) of a live process, in MB, from /proc/PID/smaps_rollup."""
    out = {"rss": 0.0, "pss": 0.0, "uss": 0.0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == "Rss":
                    out["rss"] = int(rest.split()[0]) / 1024
                elif name == "Pss":
                    out["pss"] = int(rest.split()[0]) / 1024
                elif name in ("Private_Clean", "Private_Dirty"):
                    out["uss"] += int(rest.split()[0]) / 1024
    except OSError:
        pass
    return out


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a live process (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_measured(cmd: list[str], env_: dict | None = None, cwd: str | None = None) -> tuple[float, float, str]:
    """Run a command to its end; return (wall seconds, peak RSS MB of that process, stdout).

    The peak is the kernel's own high-water mark of the child (getrusage of the reaped child)."""
    import resource

    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env_ or globals()["env"](), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    out = proc.stdout.read()
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    del resource
    return wall, usage.ru_maxrss / 1024, out


class MockProcess:
    """`batchrun mock-server` in its own process (its own GIL), on a port in 18000-18999."""

    def __init__(self, *extra: str, port: int | None = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.cmd = [PYTHON, "-m", "batchrun", "mock-server", "--port", str(self.port), *extra]

    def __enter__(self) -> MockProcess:
        self.proc = subprocess.Popen(self.cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            try:
                self.stats()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise RuntimeError(f"the mock server did not start: {' '.join(self.cmd)}")

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_mock/stats", timeout=5) as r:
            return json.load(r)

    def reset(self) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/_mock/reset", data=b"{}", method="POST")
        urllib.request.urlopen(req, timeout=5).close()

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Workers:
    """N `batchrun worker` processes on a Redis URL, sending to a mock; already running when the
    clock starts, as in a deployed fleet."""

    def __init__(self, n: int, redis_url: str, base_url: str, concurrency: int, *, extra_env: dict | None = None):
        self.n = n
        self.env = env(BATCHRUN_REDIS_URL=redis_url, OPENAI_BASE_URL=base_url, OPENAI_API_KEY="sk-bench",
                       **(extra_env or {}))
        self.cmd = [PYTHON, "-m", "batchrun", "-q", "worker", "--concurrency", str(concurrency)]
        self.conn = redis.Redis.from_url(redis_url)
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Workers:
        from rq import Worker

        self.procs = [subprocess.Popen(self.cmd, env=self.env) for _ in range(self.n)]
        deadline = time.monotonic() + 60
        while Worker.count(connection=self.conn) < self.n:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError("the workers did not start")
            time.sleep(0.1)
        return self

    def horse_pids(self) -> list[int]:
        """The work-horse processes (RQ forks one per shard job) of these workers."""
        out = []
        for p in self.procs:
            try:
                children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
            except OSError:
                continue
            out += [int(c) for c in children]
        return out

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def batchrun_env(redis_url: str) -> dict:
    return env(BATCHRUN_REDIS_URL=redis_url)


def submit(jobs: Path, redis_url: str, *args: str) -> str:
    """`batchrun submit`; returns the batch id."""
    out = subprocess.run([PYTHON, "-m", "batchrun", "-q", "submit", str(jobs), *args], env=batchrun_env(redis_url),
                         check=True, capture_output=True, text=True)
    return out.stdout.split()[-1]


def wait_finished(conn: redis.Redis, batch_id: str, timeout: float = 3600) -> None:
    key = f"batchrun:batch:{batch_id}"
    deadline = time.monotonic() + timeout
    while conn.hget(key, "state") != b"finished":
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} did not finish")
        time.sleep(0.02)


def command_stats(conn: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started (INFO commandstats), e.g. {'hset': 12, ...}."""
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in conn.info("commandstats").items()}


def table(headers: list[str], rows: list[list], aligns: str | None = None) -> str:
    """A Markdown table; numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    aligns = aligns or "l" + "r" * (len(headers) - 1)

    def fmt(row):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(row, widths, aligns)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, aligns)) + "|"
    return "\n".join([fmt(headers), sep] + [fmt(r) for r in cells])
