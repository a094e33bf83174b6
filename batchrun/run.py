"""``batchrun run``: submit, local workers and collect in one command.

On the in-process Redis the workers are threads of this process; on a real
Redis they are ``batchrun worker --burst`` processes, and workers on other
machines may join.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from contextlib import ExitStack
from dataclasses import dataclass

import click

from batchrun import shard
from batchrun.collect import collect, default_errors_path
from batchrun.connections import connect, describe, is_memory
from batchrun.progress import Progress, note
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
    grace: float = 30.0
    only_missing: bool = False  # resume from the files: skip custom_ids the outputs already hold
    retry_failed: bool = False  # ...but send again those in the errors file
    prices: str | None = None  # the user's price file, over the shipped table


def run_batch(cfg: RunConfig) -> int:
    if logging.getLogger("batchrun").getEffectiveLevel() == logging.INFO:  # the progress display says it; -v shows the workers' lines
        logging.getLogger("batchrun.worker").setLevel(logging.WARNING)
    errors_path = cfg.errors or default_errors_path(cfg.output)
    skip = _already_done(cfg, errors_path) if cfg.only_missing else None
    with ExitStack() as stack:
        settings = WorkerSettings.from_env(concurrency=cfg.concurrency, grace_seconds=cfg.grace)
        if cfg.mock:
            from batchrun.mock_server import MockConfig, MockServerThread

            server = stack.enter_context(MockServerThread(MockConfig()))
            settings.base_url, settings.api_key = server.base_url, settings.api_key or "sk-mock"
            note(f"using the built-in mock OpenAI server at {server.base_url}")
        elif not settings.api_key:
            raise click.ClickException("OPENAI_API_KEY is not set; export it, or try the mock server with --mock")

        store = BatchStore(connect(cfg.redis_url))
        if cfg.batch_id and store.exists(cfg.batch_id):
            _apply_new_cap(store, cfg.batch_id, cfg.options.max_cost)  # before any worker runs its shards
        report = submit_file(store, cfg.jobs, batch_id=cfg.batch_id, options=cfg.options, endpoint=cfg.endpoint,
                             skip_invalid=cfg.skip_invalid, skip_ids=skip, prices=cfg.prices,
                             on_skip=lambda e: click.echo(f"skipped: {e}", err=True))
        bid = report.batch_id
        note(f"batch {bid}: {report.total} job(s) on {describe(cfg.redis_url)}")

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
            click.echo(f"\ninterrupted: requests in flight get up to {cfg.grace:.0f} s to finish "
                       f"(Ctrl-C again to stop at once; nothing finished is lost)", err=True)
            try:
                shard.STOP.set()
                workers.stop()
                collect(store, bid, cfg.output, errors_path, on_note=lambda m: click.echo(m, err=True))
            except KeyboardInterrupt:
                workers.abandon()
                click.echo("stopped at once; the jobs in flight come back to the queue as after a crash", err=True)
            counts = store.counts(bid)
            click.echo(f"{counts['done']} result(s) in {cfg.output}, {counts['failed']} error(s) in {errors_path}; "
                       f"{counts['total'] - counts['done'] - counts['failed']} job(s) not done", err=True)
            _print_resume(cfg, bid, errors_path, store)
            return 130
        if store.meta(bid).get("state") != "finished":
            # Paused (quota, the spending cap): the requests in flight still land and were paid
            # for; wait for the workers to finish them, and write them too.
            workers.stop()
            collect(store, bid, cfg.output, errors_path, on_note=lambda m: click.echo(m, err=True))
        progress.close()
        store.expire_ended()  # a finished batch's keys start their --keep-days now

    meta = store.meta(bid)
    counts = store.counts(bid)
    click.echo(f"{counts['done']} result(s) in {cfg.output}, {counts['failed']} error(s) in {errors_path}"
               + (_held(cfg.output, errors_path) if cfg.only_missing else ""))
    if meta.get("state") == "paused":
        click.echo(f"batch {bid} is paused: {meta.get('reason')}", err=True)
        _print_resume(cfg, bid, errors_path, store)
        return 2
    if meta.get("state") != "finished":
        click.echo(f"batch {bid} is {meta.get('state')} with work left", err=True)
        _print_resume(cfg, bid, errors_path, store)
        return 1
    return 0


def _held(output: str, errors_path: str) -> str:
    """After a resume from the files, which already held earlier runs' lines: what they hold now."""
    from batchrun.outputs import iter_custom_ids

    results, errors = (sum(1 for _ in iter_custom_ids(p)) if os.path.exists(p) else 0 for p in (output, errors_path))
    return f" from this run; the files now hold {results} result(s) and {errors} error(s) in all"


def _apply_new_cap(store: BatchStore, bid: str, max_cost: float) -> None:
    """`run --batch-id ID --max-cost N` on a batch that exists: N becomes its cap, and a batch
    paused at its old cap runs again."""
    meta = store.meta(bid)
    if not max_cost or float(meta.get("max_cost") or 0) == max_cost:
        return
    committed = store.committed_cost(bid)
    if max_cost <= committed:
        raise ValueError(f"batch {bid} has already spent or set aside ${committed:.4f}; a cap of ${max_cost:.4f} "
                         f"would pause it again at once")
    store.set_max_cost(bid, max_cost)
    if meta.get("state") == "paused" and "past its --max-cost" in (meta.get("reason") or ""):
        store.resume(bid)


def _already_done(cfg: RunConfig, errors_path: str) -> set[str]:
    """custom_ids the output files hold (results, and errors unless they are to be retried)."""
    from pathlib import Path

    from batchrun.outputs import read_custom_ids, repair_truncated_tail

    for path in (cfg.output, errors_path):
        note = repair_truncated_tail(path) if Path(path).exists() else None
        if note:
            click.echo(note, err=True)
    done = read_custom_ids(cfg.output)
    if cfg.retry_failed and Path(errors_path).exists():
        kept = f"{errors_path}.previous"
        os.replace(errors_path, kept)  # their new outcome goes to a fresh errors file
        click.echo(f"the errors of the previous run are sent again; the old errors file is now {kept}", err=True)
    else:
        done |= read_custom_ids(errors_path)
    return done


def _print_resume(cfg: RunConfig, bid: str, errors_path: str, store: BatchStore | None = None) -> None:
    """The exact command that continues where this run stopped."""
    errors = f" --errors {shlex.quote(errors_path)}" if cfg.errors else ""
    meta = store.meta(bid) if store is not None else {}
    capped = "past its --max-cost" in (meta.get("reason") or "")
    cap = " --max-cost USD" if capped else ""
    if is_memory(cfg.redis_url):
        # The in-process Redis is gone with this process: continue from the files.
        click.echo(f"to finish the batch: batchrun resume {shlex.quote(cfg.jobs)} -o {shlex.quote(cfg.output)}"
                   f"{errors}{' --mock' if cfg.mock else ''}{cap}", err=True)
        if capped:
            click.echo(f"(the resumed run's cap counts from zero: this run spent "
                       f"${float(meta.get('cost') or 0):.4f})", err=True)
    else:
        click.echo(f"to finish the batch: batchrun run {shlex.quote(cfg.jobs)} -o {shlex.quote(cfg.output)}"
                   f"{errors} --batch-id {bid}{' --mock' if cfg.mock else ''}{cap} (with the same --redis-url)"
                   + (" and a cap above the old one" if capped else ""), err=True)


class _Workers:
    def __init__(self, grace: float):
        self.grace = grace
        self.abandoned = False
        self.threads: list[threading.Thread] = []
        self.procs: list[subprocess.Popen] = []
        self.rq_workers = []

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads) or any(p.poll() is None for p in self.procs)

    def abandon(self) -> None:
        """Stop at once: worker threads die with this process; worker processes are killed (their
        leases lapse and their jobs come back, as after a crash)."""
        self.abandoned = True
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.abandoned:
            return
        for w in self.rq_workers:
            w._stop_requested = True
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for t in self.threads:
            t.join(timeout=self.grace + 30)
        for p in self.procs:
            try:
                p.wait(timeout=self.grace + 30)
            except subprocess.TimeoutExpired:
                p.kill()


def _start_workers(cfg: RunConfig, settings: WorkerSettings, store: BatchStore) -> _Workers:
    from batchrun.worker import make_worker, preload_encodings

    workers = _Workers(cfg.grace)
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
    cmd = [sys.executable, "-m", "batchrun", "-q", "worker", "--burst", "--grace", str(cfg.grace)]
    if cfg.concurrency:
        cmd += ["--concurrency", str(cfg.concurrency)]
    for _ in range(cfg.processes):
        # Own session: a Ctrl-C at the terminal reaches `run` only, which stops them once, gracefully.
        workers.procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    return workers
