"""A batch running on the real Redis with a worker and `batchrun dashboard` in subprocesses, for the
dashboard's HTTP and browser tests."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from helpers import batchrun_cmd, cli_env, spare_port, write_jobs

from batchrun.mock import MockConfig, MockServerThread


def get(port: int, path: str, *, headers: dict | None = None, method: str = "GET",
        host: str = "127.0.0.1") -> tuple[int, str]:
    """(status, body) of one request to the dashboard; HTTP errors are answers too."""
    req = urllib.request.Request(f"http://{host}:{port}{path}", headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def get_json(port: int, path: str, **kw) -> dict:
    status, body = get(port, path, **kw)
    assert status == 200, (path, status, body)
    return json.loads(body)


def wait_until(what, predicate, timeout: float = 90.0, every: float = 0.5):
    """Poll ``predicate()`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_dashboard(spawn, env: dict, *args: str) -> int:
    """`batchrun dashboard` on a free port; returns the port once it answers."""
    port = spare_port()
    proc = spawn(batchrun_cmd("dashboard", "--port", str(port), *args), env=env,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # "dashboard of … on http://…" once it listens
    assert "dashboard of" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
    return port


@contextmanager
def running_batch(spawn, redis_url: str, tmp_path: Path, *, n: int = 300, latency_ms: float = 150,
                  concurrency: int = 4, error_rates: dict | None = None, submit_args: tuple = (),
                  batch_id: str = "live"):
    """A batch of ``n`` jobs submitted to ``redis_url`` and one burst worker sending it to a mock
    server (slow enough that the batch runs for a while); yields (env, worker process)."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", n)
    config = MockConfig(latency_ms=latency_ms, error_rates=error_rates or {}, seed=7)
    with MockServerThread(config) as srv:
        env = cli_env(OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="sk-test", BATCHRUN_REDIS_URL=redis_url)
        done = subprocess.run(batchrun_cmd("submit", str(jobs), "--batch-id", batch_id, *submit_args), env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        worker = spawn(batchrun_cmd("worker", "--burst", "-c", str(concurrency)), env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield env, worker
