"""The local workers of ``batchrun run``: threads of the run's own process on the in-process
Redis, ``batchrun worker --burst`` processes on a real one; and how their log lines show.

``python -m batchrun.cli.local_worker MODE worker …`` is such a worker process: this module
imports no more than a worker needs, so that it starts sooner.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from batchrun.ops import hints
from batchrun.settings import WorkerSettings

IN_PROCESS_WORKERS = 1  # worker threads on the in-process Redis (one shard after another)


class RunLogFilter(logging.Filter):
    """Worker lines in `run` at the default verbosity: warnings and the one-line retry
    summaries (what is happening, when it retries) show, the rest is the progress display's.
    A line that carries a `batchrun resume ID` command is completed for this run, or dropped
    (``complete`` None) where the run prints it completed itself."""

    def __init__(self, complete=None, *, quiet: bool = True, reword=None):
        super().__init__()
        self.complete = complete
        self.reword = reword  # the whole message reworded instead (the library's: a call, not a command)
        self.quiet = quiet  # drop the info lines; under -v (and -q) the level alone decides

    def filter(self, record: logging.LogRecord) -> bool:
        if self.quiet and record.levelno < logging.WARNING and record.funcName != "_summarise":
            return False
        message = record.getMessage()
        if hints.has_command(message):
            if self.reword is not None:
                record.msg, record.args = self.reword(message), ()
                return True
            if self.complete is None:
                return False
            record.msg, record.args = hints.complete(message, self.complete), ()
        return True


def worker_log_mode() -> str:
    level = logging.getLogger("batchrun").getEffectiveLevel()
    return "verbose" if level < logging.INFO else "quiet" if level > logging.INFO else "summaries"


class LocalWorkers:
    """The workers one `run` started, to watch and stop."""

    def __init__(self, grace: float):
        self.grace = grace
        self.abandoned = False
        self.threads: list[threading.Thread] = []
        # Set as each thread's work ends: what alive() and stop() go by, not Thread.is_alive()/join(). A
        # Ctrl-C that lands inside Thread.is_alive() (which alive() calls at every poll of `run`) marks
        # a thread that still runs as stopped (CPython 3.11's bpo-45274 handling); `run` would then
        # not wait for its requests in flight and exit with the thread still sending.
        self.ended: list[threading.Event] = []
        self.procs: list[subprocess.Popen] = []
        self.rq_workers = []
        # The stop flag of this run's worker threads (run_scope.py): this run's alone, so
        # stopping it stops no other run of the process.
        self.stop_flag = threading.Event()

    def alive(self) -> bool:
        return any(not e.is_set() for e in self.ended) or any(p.poll() is None for p in self.procs)

    def abandon(self) -> None:
        """Stop at once: worker threads die with this process; worker processes are killed (their
        leases lapse and their jobs come back, as after a crash)."""
        self.abandoned = True
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)

    def halt(self) -> None:
        """Stop now (Ctrl-C, SIGTERM, a run ending on an error): this run's runners stop taking
        jobs, their requests on the wire get the grace period, the rest goes back to the queue;
        waits for them as ``stop`` does. Without the flag a runner would go on until its shard
        parks or ends (a circuit open: until --give-up-after) and ``stop`` would wait it out."""
        self.stop_flag.set()
        self.stop()

    def stop(self) -> None:
        """Let the workers end: no new shard jobs; a runner under way ends by itself (its batch
        paused or done), or at once on ``halt``. Each wait is capped at the grace period + 30 s."""
        if self.abandoned:
            return
        for w in self.rq_workers:
            w._stop_requested = True
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for ended in self.ended:
            _wait_for(ended, self.grace + 30)
        for p in self.procs:
            try:
                p.wait(timeout=self.grace + 30)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_for(ended: threading.Event, limit: float) -> None:
    """Up to ``limit`` s for ``ended``, by looking at its flag, not by Event.wait: a Ctrl-C landing as
    Event.wait returns (at the entry of its Condition's ``__exit__``) leaves that Condition's lock
    held by this thread for good, and the next wait on it (the halt after the interrupt) waits for
    ever, as does the thread's own ``set`` at its end. A sleep can be interrupted anywhere."""
    deadline = time.monotonic() + limit
    while not ended.is_set() and time.monotonic() < deadline:
        time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))


def start_threads(workers: LocalWorkers, redis, settings: WorkerSettings, batch_id: str | None = None) -> None:
    """Worker threads on the in-process Redis (only this process sees it), for batch ``batch_id``'s
    shards alone (None: any batch's)."""
    from batchrun.run_scope import RunScope, serve
    from batchrun.runner.worker import make_worker, preload_encodings

    # The threads' shards send with this run's settings (base URL, API key) and stop on this run's
    # flag, not the process's: another run of this process has its own.
    scope = RunScope(settings, workers.stop_flag, batch_id)
    preload_encodings()
    for _ in range(IN_PROCESS_WORKERS):
        w = make_worker(redis, burst=True, threaded=True)
        ended = threading.Event()
        t = threading.Thread(target=_then_set(serve(scope, w.work, burst=True, logging_level="WARNING"), ended),
                             name="batchrun-local-worker", daemon=True)
        t.start()
        workers.rq_workers.append(w)
        workers.threads.append(t)
        workers.ended.append(ended)


def _then_set(target, ended: threading.Event):
    def run() -> None:
        try:
            target()
        finally:
            ended.set()

    return run


def start_processes(workers: LocalWorkers, redis_url: str, settings: WorkerSettings, *, processes: int,
                    concurrency: int | None) -> None:
    """``processes`` worker processes on a real Redis."""
    # Secrets (the API key, a Redis password) go through the environment, never the command line.
    env = {**os.environ, "OPENAI_BASE_URL": settings.base_url, "OPENAI_API_KEY": settings.api_key,
           "BATCHRUN_REDIS_URL": redis_url}
    cmd = [sys.executable, "-m", "batchrun.cli.local_worker", worker_log_mode(), "worker", "--burst", "--grace", str(workers.grace)]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    for _ in range(processes):
        # Own session: a Ctrl-C at the terminal reaches `run` only, which stops them once, gracefully.
        workers.procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))

