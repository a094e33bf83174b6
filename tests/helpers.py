"""Shared helpers for the end-to-end tests: job files, result checks, running workers."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path

from batchrun.mock import reply_text

ROOT = Path(__file__).resolve().parent.parent


def write_jobs(path: Path, n: int, *, stream_every: int = 0, max_tokens: int = 20, model: str = "gpt-4o-mini",
               prefix: str = "req") -> Path:
    with open(path, "w") as f:
        for i in range(n):
            body = {"model": model, "max_tokens": max_tokens,
                    "messages": [{"role": "system", "content": "Answer briefly."},
                                 {"role": "user", "content": f"Tell me one fact about the number {i}."}]}
            if stream_every and i % stream_every == 0:
                body["stream"] = True
            f.write(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST",
                                "url": "/v1/chat/completions", "body": body}) + "\n")
    return path


def read_lines(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in open(path)]


def requests_by_id(jobs_path: Path) -> dict[str, dict]:
    return {j["custom_id"]: j for j in read_lines(jobs_path)}


def check_exactly_once(jobs_path: Path, results_path: Path, errors_path: Path) -> tuple[list[dict], list[dict]]:
    """Every custom_id exactly once across results and errors; each result answers its own request."""
    jobs = requests_by_id(jobs_path)
    results, errors = read_lines(results_path), read_lines(errors_path)
    ids = [r["custom_id"] for r in results] + [e["custom_id"] for e in errors]
    assert len(ids) == len(set(ids)), "a custom_id was written twice"
    assert set(ids) == set(jobs), f"missing: {sorted(set(jobs) - set(ids))[:5]}, extra: {sorted(set(ids) - set(jobs))[:5]}"
    for r in results:
        job = jobs[r["custom_id"]]
        assert r["response"]["status_code"] == 200
        body = r["response"]["body"]
        content = body["choices"][0]["message"]["content"]
        assert content == reply_text(job["url"], job["body"]), f"result of {r['custom_id']} is not its answer"
        assert body["usage"]["completion_tokens"] > 0
    return results, errors


def spare_port() -> int:
    """A TCP port on 127.0.0.1 that the OS just gave out and nothing holds, for a server a test starts:
    a fixed port would clash between the parallel workers of one run (pytest -n) or two runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_catching(proc, signum: int, timeout: float = 60) -> None:
    """Wait until ``proc`` has its own handler for ``signum`` (Linux: the SigCgt mask of
    /proc/PID/status), so a test's signal hits the code it means to test, not a start-up that is
    still importing (a loaded CI machine takes over a second for that)."""
    import time

    bit = 1 << (signum - 1)
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the process ended (exit {proc.returncode}) before it caught signal {signum}"
        with open(f"/proc/{proc.pid}/status") as status:
            caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
        if caught & bit:
            return
        assert time.monotonic() < deadline, f"the process did not catch signal {signum} within {timeout} s"
        time.sleep(0.01)


def batchrun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchrun", *args]


def cli_env(**extra: str) -> dict:
    env = {**os.environ, **extra}
    # This project's shared cache, only where it exists: on a fresh machine tiktoken downloads its
    # files (or, offline, the user sets TIKTOKEN_CACHE_DIR), and a made-up path would hide that.
    shared = ROOT.parent / "shared" / "tiktoken_cache"
    if shared.is_dir():
        env.setdefault("TIKTOKEN_CACHE_DIR", str(shared))
    return env


def run_thread_worker(redis, settings, timeout: float = 120) -> None:
    """Run one in-process burst worker until no running batch has work left."""
    from batchrun.settings import set_worker_settings
    from batchrun.runner.worker import make_worker

    set_worker_settings(settings)
    w = make_worker(redis, burst=True, threaded=True)
    t = threading.Thread(target=w.work, kwargs={"burst": True, "logging_level": "WARNING"}, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the burst worker did not end by itself"


def _report_errors(body, *args) -> None:
    """Process entry: run the body; an exception goes on the queue as text rather than dying silently."""
    out = args[-1]
    try:
        body(*args)
    except BaseException:
        import traceback
        out.put(traceback.format_exc())
        raise


def run_in_processes(body, arg_tuples: list[tuple], timeout: float) -> list:
    """Run ``body(*args, barrier, queue)`` in one spawned process per args tuple; each puts one
    result on the queue. Returns the results; fails on any process's error."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(len(arg_tuples)), ctx.Queue()
    procs = [ctx.Process(target=_report_errors, args=(body, *args, barrier, out)) for args in arg_tuples]
    for p in procs:
        p.start()
    results: list = []
    try:
        while len(results) < len(procs) and not any(isinstance(x, str) for x in results):
            results.append(out.get(timeout=timeout))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = [x for x in results if isinstance(x, str)]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs)
    return results


def on(server, **options) -> dict:
    """The Python API's options that point a call at a mock ``server`` (never a real key, no progress lines)."""
    return {"base_url": server.base_url, "api_key": "sk-mock", "progress": False, **options}


def assert_stopped_sending(server, total: int, settle: float) -> None:
    """A cancelled library run sent some of its ``total`` requests, sends no more within ``settle``
    seconds, and leaves no run thread behind."""
    import time

    sent = server.stats()["requests"]
    assert 0 < sent < total
    time.sleep(settle)
    assert server.stats()["requests"] == sent, "the run went on sending after it was cancelled"
    assert not any(t.name == "batchrun-run" and t.is_alive() for t in threading.enumerate())
