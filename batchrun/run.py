"""``batchrun run``: submit, local workers and collect in one command.

On the in-process Redis the workers are threads of this process; on a real
Redis they are ``batchrun worker --burst`` processes, and workers on other
machines may join.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from contextlib import ExitStack
from dataclasses import dataclass

import click

from batchrun.collect import collect, default_errors_path
from batchrun.connections import connect, describe, is_memory
from batchrun.progress import Progress
from batchrun.settings import BatchOptions, WorkerSettings, set_worker_settings
from batchrun.store import BatchStore
from batchrun.submit import submit_file

log = logging.getLogger("batchrun")


@dataclass
class RunConfig:
    jobs: str
    output: str
    errors: str | None
    redis_url: str
    batch_id: str | None
    endpoint: str
    skip_invalid: bool
    options: BatchOptions
    concurrency: int | None
    processes: int
    mock: bool


def run_batch(cfg: RunConfig) -> int:
    errors_path = cfg.errors or default_errors_path(cfg.output)
    with ExitStack() as stack:
        settings = WorkerSettings.from_env(concurrency=cfg.concurrency)
        if cfg.mock:
            from batchrun.mock_server import MockConfig, MockServerThread

            server = stack.enter_context(MockServerThread(MockConfig()))
            settings.base_url, settings.api_key = server.base_url, settings.api_key or "sk-mock"
            click.echo(f"using the built-in mock OpenAI server at {server.base_url}", err=True)
        elif not settings.api_key:
            raise click.ClickException("OPENAI_API_KEY is not set; export it, or try the mock server with --mock")

        store = BatchStore(connect(cfg.redis_url))
        report = submit_file(store, cfg.jobs, batch_id=cfg.batch_id, options=cfg.options, endpoint=cfg.endpoint,
                             skip_invalid=cfg.skip_invalid,
                             on_skip=lambda e: click.echo(f"skipped: {e}", err=True))
        bid = report.batch_id
        click.echo(f"batch {bid}: {report.total} job(s) on {describe(cfg.redis_url)}", err=True)

        workers = _start_workers(cfg, settings, store)
        stack.callback(workers.stop)
        progress = stack.enter_context(Progress(store, bid, total=report.total))

        def should_stop() -> bool:
            state = store.meta(bid).get("state")
            return state == "paused" or not workers.alive()

        try:
            collect(store, bid, cfg.output, errors_path, follow=True, poll=0.3,
                    on_note=lambda m: click.echo(m, err=True), on_progress=lambda r: progress.update(),
                    should_stop=should_stop)
        except KeyboardInterrupt:
            progress.close()
            click.echo("\ninterrupted: workers stop; finished results are in the files.", err=True)
            _print_resume(cfg, bid)
            return 130
        progress.close()

    meta = store.meta(bid)
    counts = store.counts(bid)
    click.echo(f"{counts['done']} result(s) in {cfg.output}, {counts['failed']} error(s) in {errors_path}")
    if meta.get("state") == "paused":
        click.echo(f"batch {bid} is paused: {meta.get('reason')}", err=True)
        _print_resume(cfg, bid)
        return 2
    if meta.get("state") != "finished":
        click.echo(f"batch {bid} is {meta.get('state')} with work left", err=True)
        _print_resume(cfg, bid)
        return 1
    return 0


def _print_resume(cfg: RunConfig, bid: str) -> None:
    if is_memory(cfg.redis_url):
        click.echo(f"to finish it, run the same command again with --batch-id {bid}: jobs already in "
                   f"{cfg.output} are skipped", err=True)
    else:
        click.echo(f"to continue: batchrun resume {bid} --redis-url {describe(cfg.redis_url)} && "
                   f"batchrun worker --burst && batchrun collect {bid} -o {cfg.output}", err=True)


class _Workers:
    def __init__(self):
        self.threads: list[threading.Thread] = []
        self.procs: list[subprocess.Popen] = []
        self.rq_workers = []

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads) or any(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for w in self.rq_workers:
            w._stop_requested = True
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for t in self.threads:
            t.join(timeout=60)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def _start_workers(cfg: RunConfig, settings: WorkerSettings, store: BatchStore) -> _Workers:
    from batchrun.worker import make_worker, preload_encodings

    workers = _Workers()
    if is_memory(cfg.redis_url):
        set_worker_settings(settings)
        preload_encodings()
        w = make_worker(store.redis, burst=True, threaded=True)
        t = threading.Thread(target=w.work, kwargs={"burst": True, "logging_level": "WARNING"}, daemon=True)
        t.start()
        workers.rq_workers.append(w)
        workers.threads.append(t)
        return workers
    # Secrets (the API key, a Redis password) go through the environment, never the command line.
    env = {**os.environ, "OPENAI_BASE_URL": settings.base_url, "OPENAI_API_KEY": settings.api_key,
           "BATCHRUN_REDIS_URL": cfg.redis_url}
    cmd = [sys.executable, "-m", "batchrun", "-q", "worker", "--burst"]
    if cfg.concurrency:
        cmd += ["--concurrency", str(cfg.concurrency)]
    for _ in range(cfg.processes):
        workers.procs.append(subprocess.Popen(cmd, env=env))
    return workers
