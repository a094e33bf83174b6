"""One run of a job file: submit, local workers and collect, with Ctrl-C handled; what
``batchrun run`` does and what ``batchrun.run()`` is built on.

On the in-process Redis the workers are threads of this process; on a real Redis they are
``batchrun worker --burst`` processes, and workers on other machines may join. Nothing here
prints: every line goes to the caller's RunOutput (the CLI prints, the library logs).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, Protocol

from batchrun.api.continuing import (DEFAULT_ENDPOINT, batch_to_continue, continue_command, prepare_existing,
                                     print_resume, reword)
from batchrun.api.errors import ApiKeyMissing
from batchrun.api.run_files import already_done, check_paths, held
from batchrun.api.run_settings import record_spent, save_run_settings, settings_path
from batchrun.exitcodes import Exit, for_state
from batchrun.ops import hints, local_workers
from batchrun.ops.collect import CollectReport, collect, default_errors_path
from batchrun.ops.local_workers import LocalWorkers, RunLogFilter
from batchrun.ops.submit import submit_file, submit_requests
from batchrun.endpoints import CONFIG_ENV, configured_endpoints, missing_keys
from batchrun.policy.cache_entries import RequestKeys
from batchrun.settings import BatchOptions, WorkerSettings
from batchrun.state.connections import after_interrupt, connect, describe, interrupt_unless_in_redis, is_memory
from batchrun.state.jobcounts import jobs_left
from batchrun.state.states import BatchState
from batchrun.remote.start import remote_paid_for_open
from batchrun.state.store import BatchStore

__all__ = ["DEFAULT_ENDPOINT", "RunConfig", "RunEnd", "RunOutput", "run_batch"]

log = logging.getLogger("batchrun")

COLLECT_POLL_SECONDS = 0.1  # how soon `run` writes an outcome after it lands, and sees the batch end


class ProgressDisplay(Protocol):
    def update(self) -> None: ...

    def close(self) -> None: ...


class RunOutput(Protocol):
    """Where a run's words go. ``result``: the summary (stdout in the CLI); ``warn``: what the user
    must see (stderr); ``note``: informational (hidden by -q); ``progress``: the display."""

    def result(self, line: str) -> None: ...

    def warn(self, line: str) -> None: ...

    def note(self, line: str) -> None: ...

    def progress(self, store: BatchStore, batch_id: str, total: int) -> ProgressDisplay: ...


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
    redis_source: hints.RedisSource = hints.RedisSource.COMMAND_LINE  # how the user named the Redis
    cap_total: float | None = None  # resume: the cap over every run of the file (default: options.max_cost)
    base_url: str | None = None  # the library's: over OPENAI_BASE_URL (the mock's when `mock`)
    api_key: str | None = field(default=None, repr=False)  # the library's: over OPENAI_API_KEY; never stored
    library: bool = False  # a library call: its words say what to call in Python, not what to type
    output_kept: bool = True  # the library's: False when the output is a temporary file, gone after the call
    requests: list[dict] | None = field(default=None, repr=False)  # the library's: the jobs, in place of a file

    @property
    def redis(self) -> hints.RedisRef:
        return hints.RedisRef.of(self.redis_url, self.redis_source)


@dataclass(frozen=True)
class RunEnd:
    """How a run ended: its batch, the batch's state, and the exit code `batchrun run` gives."""
    batch_id: str
    state: BatchState | None
    exit_code: int
    reason: str = ""  # why the batch paused, if it did
    interrupted: bool = False


@dataclass
class _Run:
    """One `run` under way: what its steps share."""
    cfg: RunConfig
    out: RunOutput
    errors_path: str
    skip: set[str]  # custom_ids the files hold already
    store: BatchStore
    workers: LocalWorkers
    stop_requested: Callable[[], bool]
    written: CollectReport = field(default_factory=CollectReport)  # what this command wrote, over its collects
    batch_id: str = ""

    def collect(self, **kw) -> CollectReport:
        r = CollectReport()
        try:
            collect(self.store, self.batch_id, self.cfg.output, self.errors_path,
                    on_note=self.out.warn, report=r, **kw)
        finally:
            # Counted even when Ctrl-C cuts the collect short: what it wrote is in the files.
            self.written.results_written += r.results_written
            self.written.errors_written += r.errors_written
            self.written.other_there += r.other_there
        return r

    def should_stop(self) -> bool:
        import redis

        if self.stop_requested():
            raise KeyboardInterrupt  # the library's caller was interrupted on another thread
        try:
            state = self.store.meta(self.batch_id).get("state")
        except (redis.ConnectionError, redis.TimeoutError):
            state = None  # Redis away: collect waits it out, and so does this run
        if state == BatchState.PAUSED and remote_paid_for_open(self.store, self.batch_id):
            return not self.workers.alive()  # at the cap: the remote batches it paid for are still collected
        return state == BatchState.PAUSED or not self.workers.alive()


def run_batch(cfg: RunConfig, out: RunOutput, stop_requested: Callable[[], bool] = lambda: False) -> RunEnd:
    errors_path = cfg.errors or default_errors_path(cfg.output)
    sidecar = settings_path(cfg.output)
    settings = WorkerSettings.from_env(concurrency=cfg.concurrency, grace_seconds=cfg.grace,
                                       base_url=cfg.base_url, api_key=cfg.api_key)
    endpoints = () if cfg.mock else configured_endpoints()  # the config file's [[endpoints]], each its own key
    if endpoints and missing_keys(endpoints):
        raise ApiKeyMissing("; ".join(missing_keys(endpoints)))
    if not cfg.mock and not endpoints and not settings.api_key:
        raise ApiKeyMissing("no API key: pass api_key=, or set OPENAI_API_KEY in the environment" if cfg.library else
                            "OPENAI_API_KEY is not set; export it, or try the mock server with --mock")
    # Every path is checked before anything is submitted: a batch must not start that
    # cannot write its results.
    check_paths(cfg, errors_path, sidecar)
    # Jobs the files hold already are never sent again, by `run` as by `resume`: a second
    # run onto a complete output must not pay again for answers it would then drop.
    skip, prior_errors = already_done(cfg, errors_path, out.note)
    if skip and not cfg.only_missing:
        _say_skipped(cfg, out, errors_path, len(skip), prior_errors)
    with ExitStack() as stack:
        _quiet_worker_lines(cfg, stack)
        if cfg.mock:
            from batchrun.mock import MockConfig, MockServerThread

            server = stack.enter_context(MockServerThread(MockConfig()))
            settings.base_url, settings.api_key = server.base_url, settings.api_key or "sk-mock"
            out.note(f"using the built-in mock OpenAI server at {server.base_url}")
            _without_endpoints(stack, out)

        store = BatchStore(connect(cfg.redis_url))
        if not cfg.batch_id and not cfg.only_missing:
            cfg.batch_id = batch_to_continue(cfg, sidecar, store, out)
        if cfg.batch_id and store.exists(cfg.batch_id):
            prepare_existing(store, cfg, skip)  # before any worker runs its shards
        run = _Run(cfg, out, errors_path, skip, store, LocalWorkers(cfg.grace), stop_requested)
        # However the run ends (an error, a Ctrl-C outside the steps that handle it), its runners
        # stop at once rather than go on sending while this waits the grace period + 30 s for them.
        stack.callback(run.workers.halt)
        _catch_interrupts(stack)
        try:
            total = _submit_and_start(run, settings, endpoints, sidecar, stack)
        except BaseException as exc:
            if not run.workers.threads and not run.workers.procs:
                if isinstance(exc, KeyboardInterrupt):  # an interrupt exits 130, also before any job is sent
                    again = "call the same run again" if cfg.library else "run the same command again"
                    run.out.warn(f"\ninterrupted while the file was being submitted: no job was sent; {again} "
                                 f"to start")
                    return RunEnd(run.batch_id or "", None, Exit.INTERRUPTED, interrupted=True)
                raise  # nothing was sent yet
            if isinstance(exc, KeyboardInterrupt):
                return _interrupted(run)
            _stop_and_collect(run)  # the load failed (the file changed, say): what was sent is written
            raise
        interrupted = _follow(run, stack, total)
        if interrupted is not None:
            return interrupted
        store.expire_ended()  # a finished batch's keys start their --keep-days now
    return _report_end(run, prior_errors)


def _say_skipped(cfg: RunConfig, out: RunOutput, errors_path: str, skipped: int, prior_errors: int) -> None:
    """The jobs the output files hold already, which this run does not send again."""
    said = f"{skipped} job(s) already in {cfg.output} or {errors_path} are not sent again"
    if cfg.library:
        out.note(said + (f"; the {prior_errors} failed one(s) come back as they failed (to send them again, "
                         f"take their lines out of {errors_path})" if prior_errors else ""))
        return
    again = hints.resume_files(cfg.jobs, cfg.output, cfg.errors, cfg.redis, mock=cfg.mock, extra=["--retry-failed"])
    out.note(said + (f"; to send the {prior_errors} failed one(s) again: {hints.command(again)}" if prior_errors
                     else ""))


def _catch_interrupts(stack: ExitStack) -> None:
    """In the main thread, until the run ends: SIGTERM (timeout, CI, `docker stop`) stops as the
    first Ctrl-C does (no paid answer dropped, the command that continues printed), from before
    the submit, since on the in-process Redis sending starts while the file loads. Ctrl-C too,
    except inside a call to the in-process Redis, which gets it as it returns (raised in there, it
    could leave a lock of the fake server held for good)."""
    if threading.current_thread() is not threading.main_thread():
        return
    stack.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, interrupt_unless_in_redis))
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        stack.callback(signal.signal, signal.SIGINT, signal.signal(signal.SIGINT, interrupt_unless_in_redis))


def _without_endpoints(stack: ExitStack, out: RunOutput) -> None:
    """--mock: the config file's [[endpoints]] are not sent to (they may be paid ones), neither by
    this run's workers nor in the submit's check of the models, which read them from CONFIG_ENV."""
    path = os.environ.pop(CONFIG_ENV, None)
    if path is None:
        return
    stack.callback(os.environ.__setitem__, CONFIG_ENV, path)
    if configured_endpoints({CONFIG_ENV: path}):
        out.note(f"the [[endpoints]] of {path} are not used with --mock: every request goes to the mock server")


def _submit_and_start(run: _Run, settings: WorkerSettings, endpoints, sidecar: str, stack: ExitStack) -> int:
    """Submit the file and start the local workers; returns the batch's total.

    On the in-process Redis the worker threads start as soon as the first shard has its jobs, and
    send while the rest of the file loads; on a real Redis the worker processes start after it.
    The lines the response cache answers end in the submit (keyed as these workers key them), and
    a batch they end whole gets no worker at all."""
    cfg, store = run.cfg, run.store

    def accepted(bid: str) -> None:
        # Only now (a refused run leaves no settings behind), and with the batch id: a rerun of
        # this command after a crash continues this batch instead of paying for its jobs again.
        run.batch_id = bid
        saved = save_run_settings(cfg, sidecar, bid)
        # After all else, and however the run ended: on a connection a Ctrl-C cut between a send and its
        # read, its meta would be another command's reply (after_interrupt).
        stack.callback(lambda: (after_interrupt(store.redis), record_spent(sidecar, saved, bid, store)))

    def start_threads(bid: str) -> None:
        accepted(bid)  # the file is valid and the batch exists: from here on the run is not refused
        local_workers.start_threads(run.workers, store.redis, settings, bid)

    given = {"batch_id": cfg.batch_id, "options": cfg.options, "endpoint": cfg.endpoint,
             "skip_invalid": cfg.skip_invalid, "skip_ids": run.skip, "prices": cfg.prices,
             "on_skip": lambda e: run.out.warn(f"skipped: {e}"),
             "on_loading": start_threads if is_memory(cfg.redis_url) else None,
             "request_keys": RequestKeys(settings.base_url, endpoints)}
    if cfg.requests is not None:  # the library's requests, validated and loaded without a file
        report = submit_requests(store, cfg.requests, **given)
    else:
        report = submit_file(store, cfg.jobs, **given)
    bid = report.batch_id
    if not run.batch_id:
        accepted(bid)
    run.out.note(f"batch {bid}: {report.total} job(s) on {describe(cfg.redis_url)}")
    if run.workers.threads:
        pass  # started while the file loaded
    elif not jobs_left(store.meta(bid)):
        pass  # nothing to send: every line was there already, or the cache served it
    elif is_memory(cfg.redis_url):
        local_workers.start_threads(run.workers, store.redis, settings, bid)
    else:
        local_workers.start_processes(run.workers, cfg.redis_url, settings, processes=cfg.processes,
                                      concurrency=cfg.concurrency)
    return report.total


def _follow(run: _Run, stack: ExitStack, total: int) -> RunEnd | None:
    """Collect until the batch ends or pauses; on Ctrl-C (or SIGTERM) stop gracefully and return
    how the run ended, else None."""
    store, bid = run.store, run.batch_id
    progress = run.out.progress(store, bid, total)
    stack.callback(progress.close)
    try:
        followed = run.collect(follow=True, poll=COLLECT_POLL_SECONDS, on_progress=lambda r: progress.update(),
                               should_stop=run.should_stop)
        if store.meta(bid).get("state") != BatchState.FINISHED:
            # Paused (quota, the spending cap): the requests in flight still land and were paid
            # for; wait for the workers to finish them, and write them too. A Ctrl-C meanwhile (the
            # wait can be the request timeout) stops as any other does, saying how to continue.
            run.workers.stop()
            run.collect()
        elif not followed.finished:
            # The follow stopped before the batch finished (this run's workers had nothing left to
            # take: another worker held its last jobs), and it finished since: its last outcomes too.
            run.collect()
    except KeyboardInterrupt:
        run.workers.stop_flag.set()  # first: the runners stop taking jobs whatever the display does
        return _interrupted(run, before=progress.close)
    progress.close()
    return None


def _interrupted(run: _Run, before: Callable[[], None] = lambda: None) -> RunEnd:
    """After a Ctrl-C (or SIGTERM): requests in flight get the grace period and their answers are
    written; a second Ctrl-C stops at once, also one that comes during ``before`` (the progress
    display's last line, which reads the batch's counts: a double tap of Ctrl-C lands there)."""
    cfg, store, bid, out = run.cfg, run.store, run.batch_id, run.out
    after_interrupt(store.redis)  # a reply the Ctrl-C left unread must not answer the next command
    try:
        before()
        out.warn(f"\ninterrupted: requests in flight get up to {cfg.grace:.0f} s to finish "
                 f"(Ctrl-C again to stop at once; nothing finished is lost)")
        _stop_and_collect(run)
    except KeyboardInterrupt:
        run.workers.abandon()
        after_interrupt(store.redis)
        out.warn("stopped at once; the jobs in flight come back to the queue as after a crash")
    counts = store.counts(bid)
    out.warn(_summary(cfg, run.errors_path, run.written, run.skip) + f"; {jobs_left(counts)} job(s) not done")
    print_resume(cfg, bid, out, store)
    return RunEnd(bid, _state_of(store.meta(bid)), Exit.INTERRUPTED, interrupted=True)


def _stop_and_collect(run: _Run) -> None:
    """Stop the workers gracefully (requests in flight get the grace period) and write what landed."""
    run.workers.halt()  # this run's worker threads only: another run of the process goes on
    run.collect()


def _report_end(run: _Run, prior_errors: int) -> RunEnd:
    cfg, store, bid, errors_path, out = run.cfg, run.store, run.batch_id, run.errors_path, run.out
    meta = store.meta(bid)
    counts = store.counts(bid)
    out.result(_summary(cfg, errors_path, run.written, run.skip) + (held(cfg.output, errors_path) if run.skip else "")
               + cache_note(meta))
    if meta.get("state") == BatchState.PAUSED:
        reason = reword(cfg, meta.get("reason") or "", bid)
        out.warn(f"batch {bid} is paused: {reason}")
        print_resume(cfg, bid, out, store)
    elif meta.get("state") != BatchState.FINISHED:
        out.warn(f"batch {bid} is {meta.get('state')} with work left")
        print_resume(cfg, bid, out, store)
    return RunEnd(bid, _state_of(meta), for_state(meta.get("state", ""), counts["failed"] + prior_errors),
                  reason=meta.get("reason") or "")


def cache_note(meta: dict) -> str:
    """'; 40 of them from the response cache (not sent, not paid: $0.0012 saved)', or ''."""
    from batchrun.ops.status import cache_phrase
    from batchrun.state.budget_headers import stored_number

    hits = int(stored_number(meta.get("cache_hits")))
    if not hits:
        return ""
    phrase = cache_phrase({"hits": hits, "saved_usd": stored_number(meta.get("cache_saved"))})
    return f"; {phrase.replace('answers from', 'of them from').replace('answer from', 'of them from')}"


def _state_of(meta: dict) -> BatchState | None:
    try:
        return BatchState(meta.get("state"))
    except ValueError:
        return None


def _summary(cfg: RunConfig, errors_path: str, written: CollectReport, skip: set[str]) -> str:
    """What this command wrote (not what the batch holds: a rerun writes only what was missing)."""
    where = (f"{written.results_written} result(s) written to {cfg.output}, {written.errors_written} error(s) "
             f"to {errors_path}" if cfg.output_kept else
             f"{written.results_written} result(s) and {written.errors_written} error(s) came back")
    return (where
            + (f"; {len(skip)} job(s) were there already" if skip else "")
            + (f"; {written.other_there} outcome(s) of this batch were not written, as the files hold another "
               f"outcome for their custom_id (a job sent twice after a Redis rollback, or a race with another run)"
               if written.other_there else ""))


def _quiet_worker_lines(cfg: RunConfig, stack: ExitStack) -> None:
    # At every verbosity a worker line's `batchrun resume ID` is completed for this run; only at
    # the default one are the info lines dropped (-v shows every line, -q what its level lets by).
    level = logging.getLogger("batchrun").getEffectiveLevel()
    worker_log = logging.getLogger("batchrun.worker")
    quiet = RunLogFilter(lambda bid, extra: continue_command(cfg, bid, extra), quiet=level == logging.INFO,
                         reword=(lambda message: reword(cfg, message)) if cfg.library else None)
    worker_log.addFilter(quiet)
    stack.callback(worker_log.removeFilter, quiet)
