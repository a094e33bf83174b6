"""``batchrun run``: submit, local workers and collect in one command.

On the in-process Redis the workers are threads of this process; on a real
Redis they are ``batchrun worker --burst`` processes, and workers on other
machines may join.
"""

from __future__ import annotations

import logging
import signal
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field

import click

from batchrun.ops import hints, local_workers
from batchrun.ops.local_workers import LocalWorkers, RunLogFilter
from batchrun.cli.run_files import already_done, check_paths, held
# The settings file's functions live in run_settings; these names stay importable from here.
from batchrun.cli.run_settings import (load_run_settings, record_spent, save_run_settings,  # noqa: F401
                                       settings_path, spent_usd)

from batchrun.ops.collect import CollectReport, collect, default_errors_path
from batchrun.state.connections import connect, describe, is_memory
from batchrun.exitcodes import Exit, for_state
from batchrun.ops.progress import Progress, note
from batchrun.ops.resume import paused_at_cap, set_cap
from batchrun.settings import BatchOptions, WorkerSettings
from batchrun.state.jobcounts import jobs_left
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore
from batchrun.ops.submit import submit_file

log = logging.getLogger("batchrun")

DEFAULT_ENDPOINT = "/v1/chat/completions"
COLLECT_POLL_SECONDS = 0.1  # how soon `run` writes an outcome after it lands, and sees the batch end


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

    @property
    def redis(self) -> hints.RedisRef:
        return hints.RedisRef.of(self.redis_url, self.redis_source)


@dataclass
class _Run:
    """One `run` under way: what its steps share."""
    cfg: RunConfig
    errors_path: str
    skip: set[str]  # custom_ids the files hold already
    store: BatchStore
    workers: LocalWorkers
    written: CollectReport = field(default_factory=CollectReport)  # what this command wrote, over its collects
    batch_id: str = ""

    def collect(self, **kw) -> None:
        r = CollectReport()
        try:
            collect(self.store, self.batch_id, self.cfg.output, self.errors_path,
                    on_note=lambda m: click.echo(m, err=True), report=r, **kw)
        finally:
            # Counted even when Ctrl-C cuts the collect short: what it wrote is in the files.
            self.written.results_written += r.results_written
            self.written.errors_written += r.errors_written
            self.written.other_there += r.other_there

    def should_stop(self) -> bool:
        import redis

        try:
            state = self.store.meta(self.batch_id).get("state")
        except (redis.ConnectionError, redis.TimeoutError):
            state = None  # Redis away: collect waits it out, and so does this run
        return state == BatchState.PAUSED or not self.workers.alive()


def run_batch(cfg: RunConfig) -> int:
    errors_path = cfg.errors or default_errors_path(cfg.output)
    sidecar = settings_path(cfg.output)
    settings = WorkerSettings.from_env(concurrency=cfg.concurrency, grace_seconds=cfg.grace)
    if not cfg.mock and not settings.api_key:
        raise click.ClickException("OPENAI_API_KEY is not set; export it, or try the mock server with --mock")
    # Every path is checked before anything is submitted: a batch must not start that
    # cannot write its results.
    check_paths(cfg, errors_path, sidecar)
    # Jobs the files hold already are never sent again, by `run` as by `resume`: a second
    # run onto a complete output must not pay again for answers it would then drop.
    skip, prior_errors = already_done(cfg, errors_path)
    if skip and not cfg.only_missing:
        again = hints.resume_files(cfg.jobs, cfg.output, cfg.errors, cfg.redis, mock=cfg.mock, extra=["--retry-failed"])
        note(f"{len(skip)} job(s) already in {cfg.output} or {errors_path} are not sent again"
             + (f"; to send the {prior_errors} failed one(s) again: {hints.command(again)}" if prior_errors
                else ""))
    with ExitStack() as stack:
        _quiet_worker_lines(cfg, stack)
        if cfg.mock:
            from batchrun.mock import MockConfig, MockServerThread

            server = stack.enter_context(MockServerThread(MockConfig()))
            settings.base_url, settings.api_key = server.base_url, settings.api_key or "sk-mock"
            note(f"using the built-in mock OpenAI server at {server.base_url}")

        store = BatchStore(connect(cfg.redis_url))
        if not cfg.batch_id and not cfg.only_missing:
            cfg.batch_id = _batch_to_continue(cfg, sidecar, store)
        if cfg.batch_id and store.exists(cfg.batch_id):
            _prepare_existing(store, cfg, skip)  # before any worker runs its shards
        run = _Run(cfg, errors_path, skip, store, LocalWorkers(cfg.grace))
        stack.callback(run.workers.stop)
        # SIGTERM (timeout, CI, `docker stop`) stops as the first Ctrl-C does: no paid answer is
        # dropped, and the command that continues is printed. From before the submit: on the
        # in-process Redis, sending starts while the file loads.
        stack.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, _interrupt))
        try:
            total = _submit_and_start(run, settings, sidecar, stack)
        except BaseException as exc:
            if not run.workers.threads:
                if isinstance(exc, KeyboardInterrupt):  # an interrupt exits 130, also before any job is sent
                    click.echo("\ninterrupted while the file was being submitted: no job was sent; run the same "
                               "command again to start", err=True)
                    return Exit.INTERRUPTED
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


def _submit_and_start(run: _Run, settings: WorkerSettings, sidecar: str, stack: ExitStack) -> int:
    """Submit the file and start the local workers; returns the batch's total.

    On the in-process Redis the worker threads start as soon as the first shard has its jobs, and
    send while the rest of the file loads; on a real Redis the worker processes start after it."""
    cfg, store = run.cfg, run.store

    def accepted(bid: str) -> None:
        # Only now (a refused run leaves no settings behind), and with the batch id: a rerun of
        # this command after a crash continues this batch instead of paying for its jobs again.
        run.batch_id = bid
        saved = save_run_settings(cfg, sidecar, bid)
        stack.callback(lambda: record_spent(sidecar, saved, bid, store))

    def start_threads(bid: str) -> None:
        accepted(bid)  # the file is valid and the batch exists: from here on the run is not refused
        local_workers.start_threads(run.workers, store.redis, settings)

    report = submit_file(store, cfg.jobs, batch_id=cfg.batch_id, options=cfg.options, endpoint=cfg.endpoint,
                         skip_invalid=cfg.skip_invalid, skip_ids=run.skip, prices=cfg.prices,
                         on_skip=lambda e: click.echo(f"skipped: {e}", err=True),
                         on_loading=start_threads if is_memory(cfg.redis_url) else None)
    bid = report.batch_id
    if not run.batch_id:
        accepted(bid)
    note(f"batch {bid}: {report.total} job(s) on {describe(cfg.redis_url)}")
    if run.workers.threads:
        pass  # started while the file loaded
    elif is_memory(cfg.redis_url):
        local_workers.start_threads(run.workers, store.redis, settings)
    else:
        local_workers.start_processes(run.workers, cfg.redis_url, settings, processes=cfg.processes,
                                      concurrency=cfg.concurrency)
    return report.total


def _follow(run: _Run, stack: ExitStack, total: int) -> int | None:
    """Collect until the batch ends or pauses; on Ctrl-C (or SIGTERM) stop gracefully and return
    the exit code, else None."""
    store, bid = run.store, run.batch_id
    progress = stack.enter_context(Progress(store, bid, total=total))
    try:
        run.collect(follow=True, poll=COLLECT_POLL_SECONDS, on_progress=lambda r: progress.update(),
                    should_stop=run.should_stop)
    except KeyboardInterrupt:
        progress.close()
        return _interrupted(run)
    if store.meta(bid).get("state") != BatchState.FINISHED:
        # Paused (quota, the spending cap): the requests in flight still land and were paid
        # for; wait for the workers to finish them, and write them too.
        run.workers.stop()
        run.collect()
    progress.close()
    return None


def _interrupted(run: _Run) -> int:
    """After a Ctrl-C (or SIGTERM): requests in flight get the grace period and their answers are
    written; a second Ctrl-C stops at once. Returns the exit code."""
    cfg, store, bid = run.cfg, run.store, run.batch_id
    click.echo(f"\ninterrupted: requests in flight get up to {cfg.grace:.0f} s to finish "
               f"(Ctrl-C again to stop at once; nothing finished is lost)", err=True)
    try:
        _stop_and_collect(run)
    except KeyboardInterrupt:
        run.workers.abandon()
        click.echo("stopped at once; the jobs in flight come back to the queue as after a crash", err=True)
    counts = store.counts(bid)
    click.echo(_summary(cfg, run.errors_path, run.written, run.skip)
               + f"; {jobs_left(counts)} job(s) not done", err=True)
    _print_resume(cfg, bid, run.errors_path, store)
    return Exit.INTERRUPTED


def _stop_and_collect(run: _Run) -> None:
    """Stop the workers gracefully (requests in flight get the grace period) and write what landed."""
    # Only where this process runs shards itself (threads on the in-process Redis): `run` on a
    # real Redis does not import the sending machinery at all.
    shard = sys.modules.get("batchrun.runner.shard")
    if shard is not None:
        shard.STOP.set()
    run.workers.stop()
    run.collect()


def _report_end(run: _Run, prior_errors: int) -> int:
    cfg, store, bid, errors_path = run.cfg, run.store, run.batch_id, run.errors_path
    meta = store.meta(bid)
    counts = store.counts(bid)
    click.echo(_summary(cfg, errors_path, run.written, run.skip)
               + (held(cfg.output, errors_path) if run.skip else ""))
    if meta.get("state") == BatchState.PAUSED:
        reason = hints.complete(meta.get("reason") or "", lambda _id, extra: _continue_command(cfg, bid, extra))
        click.echo(f"batch {bid} is paused: {reason}", err=True)
        _print_resume(cfg, bid, errors_path, store)
    elif meta.get("state") != BatchState.FINISHED:
        click.echo(f"batch {bid} is {meta.get('state')} with work left", err=True)
        _print_resume(cfg, bid, errors_path, store)
    return for_state(meta.get("state", ""), counts["failed"] + prior_errors)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _summary(cfg: RunConfig, errors_path: str, written: CollectReport, skip: set[str]) -> str:
    """What this command wrote (not what the batch holds: a rerun writes only what was missing)."""
    return (f"{written.results_written} result(s) written to {cfg.output}, {written.errors_written} error(s) "
            f"to {errors_path}"
            + (f"; {len(skip)} job(s) were there already" if skip else "")
            + (f"; {written.other_there} outcome(s) of this batch were not written, as the files hold another "
               f"outcome for their custom_id (a job sent twice after a Redis rollback, or a race with another run)"
               if written.other_there else ""))


def _prepare_existing(store: BatchStore, cfg: RunConfig, skip: set[str]) -> None:
    """`run --batch-id ID` on a batch that exists: it continues that batch."""
    bid = cfg.batch_id
    meta = store.meta(bid)
    if meta.get("state") == BatchState.CANCELLED:
        raise ValueError(f"batch {bid} was cancelled; run the file under another --batch-id "
                         f"(the jobs {cfg.output} holds are not sent again)")
    pending = _pending_in_batch(store, bid, skip)
    if pending:
        raise ValueError(f"batch {bid} still has {len(pending)} job(s) to send whose custom_id {cfg.output} or its "
                         f"errors file already holds (e.g. {sorted(pending)[0]!r}): their answers would be paid "
                         f"for and then dropped; collect batch {bid} into another file instead, or run the file "
                         f"under another --batch-id")
    _apply_new_cap(store, bid, cfg.options.max_cost)
    meta = store.meta(bid)
    if meta.get("state") == BatchState.PAUSED:
        if paused_at_cap(meta):
            raise ValueError(f"batch {bid} is paused at its spending cap; give a higher one with --max-cost USD")
        store.resume(bid)  # a pause for the account (quota, key): the user runs it again once fixed


def _pending_in_batch(store: BatchStore, bid: str, ids: set[str]) -> set[str]:
    """Those of ``ids`` that batch ``bid`` holds and has not ended: they would be sent."""
    from batchrun.state import keys

    pending: set[str] = set()
    listed = list(ids)
    for i in range(0, len(listed), 1000):
        chunk = listed[i:i + 1000]
        found = store.redis.hmget(keys.sub(bid, "req"), chunk)
        pending.update(cid for cid, req in zip(chunk, found) if req is not None)
    return pending


def _apply_new_cap(store: BatchStore, bid: str, max_cost: float) -> None:
    """`run --batch-id ID --max-cost N` on a batch that exists: N becomes its cap, and a batch
    paused at its old cap runs again."""
    meta = store.meta(bid)
    if not max_cost or float(meta.get("max_cost") or 0) == max_cost:
        return
    set_cap(store, bid, max_cost)  # CapTooLow (a ValueError) when it would pause the batch again at once
    if paused_at_cap(meta):
        store.resume(bid)


def _batch_to_continue(cfg: RunConfig, sidecar: str, store: BatchStore) -> str | None:
    """The batch an earlier `run` of this file onto this output made on this Redis, if it is still
    there: a rerun of the same command (after a crash, a kill) continues it."""
    if cfg.redis.memory:
        return None  # the in-process Redis died with that run
    saved = load_run_settings(sidecar) or {}
    bid = saved.get("batch_id")
    if not isinstance(bid, str) or saved.get("jobs") != cfg.jobs or not store.exists(bid):
        return None
    if store.meta(bid).get("state") == BatchState.CANCELLED:
        return None
    note(f"continuing batch {bid}, which the earlier run of this command made ({sidecar} names it)")
    return bid


def resume_config(jobs: str, output: str, errors: str | None, given: dict, *, max_cost: float | None,
                  prices: str | None, mock: bool, concurrency: int | None, grace: float, retry_failed: bool,
                  redis_url: str, redis_source: hints.RedisSource) -> tuple[RunConfig, str]:
    """`resume JOBS -o OUT`: the first run's settings (from OUT's settings file), with what the
    user gives now over them. Returns the config and the settings it took from the file, as
    options, for the user to see."""
    from batchrun.settings import Limits, OptionsError

    saved = load_run_settings(settings_path(output)) or {}
    options = BatchOptions.from_fields(saved["options"]) if saved else BatchOptions()
    before = BatchOptions.from_fields(options.to_fields())
    used: list[str] = []
    if given.get("rpm") or given.get("tpm"):
        try:
            options.limits = Limits.parse(given.get("rpm") or (), given.get("tpm") or ())
        except ValueError as exc:  # a bad value on the command line: a usage error
            raise OptionsError(str(exc)) from None
    elif options.limits:
        used += [f"--{kind} {model + '=' if model != '*' else ''}{n}"
                 for model, entry in sorted(options.limits.by_model.items()) for kind, n in sorted(entry.items())]
    for name in ("max_attempts", "backoff_base", "backoff_cap", "burst_seconds", "give_up_seconds"):
        if given.get(name) is not None:
            setattr(options, name, given[name])
        elif getattr(before, name) != getattr(BatchOptions(), name):
            option = "--give-up-after" if name == "give_up_seconds" else f"--{name.replace('_', '-')}"
            used.append(f"{option} {getattr(before, name)}")

    def pick(name: str, value, default):
        if value not in (None, False):
            return value
        if saved.get(name) not in (None, False) and saved.get(name) != default:
            used.append(f"--{name.replace('_', '-')}" + ("" if saved[name] is True else f" {saved[name]}"))
            return saved[name]
        return default

    endpoint = pick("endpoint", given.get("endpoint"), DEFAULT_ENDPOINT)
    skip_invalid = pick("skip_invalid", given.get("skip_invalid"), False)
    processes = pick("processes", given.get("processes"), 1)
    concurrency = pick("concurrency", concurrency, None)
    mock = pick("mock", mock, False)
    prices = pick("prices", prices, None)
    # The cap holds over every run of the file: a resume may spend what the earlier runs left.
    spent = spent_usd(saved)
    total = float(saved.get("max_cost_total") or 0)
    if max_cost is not None:
        options.max_cost, cap_total = max_cost, (spent + max_cost if max_cost else 0.0)
    elif total:
        if total - spent <= 0:
            raise ValueError(f"the first run's --max-cost of ${total:.4f} is spent (${spent:.4f}); "
                             f"give this run a cap of its own with --max-cost USD")
        options.max_cost, cap_total = total - spent, total
        used.append(f"--max-cost {total - spent:.6f} (what is left of the first run's ${total:.4f})")
    else:
        options.max_cost, cap_total = 0.0, 0.0
    problems = options.problems()
    if problems:  # refused before anything is saved or submitted; a bad stored value is the file's
        stored = set(before.problems())
        mine = [p for p in problems if p not in stored]
        theirs = [p for p in problems if p in stored]
        raise OptionsError("; ".join(mine + ([f"{settings_path(output)} (the first run's settings) holds values "
                                              f"that cannot work: {'; '.join(theirs)}; give new ones here or "
                                              f"remove the file"] if theirs else [])))
    cfg = RunConfig(jobs=jobs, output=output, errors=errors, redis_url=redis_url, batch_id=None, endpoint=endpoint,
                    skip_invalid=skip_invalid, options=options, concurrency=concurrency, processes=processes,
                    mock=mock, grace=grace, only_missing=True, retry_failed=retry_failed, prices=prices,
                    redis_source=redis_source, cap_total=cap_total)
    return cfg, ", ".join(used)


def _quiet_worker_lines(cfg: RunConfig, stack: ExitStack) -> None:
    # At every verbosity a worker line's `batchrun resume ID` is completed for this run; only at
    # the default one are the info lines dropped (-v shows every line, -q what its level lets by).
    level = logging.getLogger("batchrun").getEffectiveLevel()
    worker_log = logging.getLogger("batchrun.worker")
    quiet = RunLogFilter(lambda bid, extra: _continue_command(cfg, bid, extra), quiet=level == logging.INFO)
    worker_log.addFilter(quiet)
    stack.callback(worker_log.removeFilter, quiet)


def _continue_command(cfg: RunConfig, bid: str, extra: list[str]) -> list[str]:
    """The command that continues this run where it stopped, as the user can paste it."""
    if cfg.redis.memory:
        # The in-process Redis is gone with this process: continue from the files, whose
        # sidecar keeps this run's settings.
        return hints.resume_files(cfg.jobs, cfg.output, cfg.errors, cfg.redis, mock=cfg.mock, extra=extra)
    kept: list[str] = []
    if cfg.endpoint != DEFAULT_ENDPOINT:
        kept += ["--endpoint", cfg.endpoint]
    if cfg.skip_invalid:
        kept += ["--skip-invalid"]
    if cfg.processes != 1:
        kept += ["--processes", str(cfg.processes)]
    if cfg.concurrency:
        kept += ["--concurrency", str(cfg.concurrency)]
    return hints.rerun(cfg.jobs, cfg.output, cfg.errors, bid, cfg.redis, mock=cfg.mock, extra=kept + extra)


def _print_resume(cfg: RunConfig, bid: str, errors_path: str, store: BatchStore | None = None) -> None:
    """The exact command that continues where this run stopped."""
    meta = store.meta(bid) if store is not None else {}
    capped = paused_at_cap(meta)
    command = _continue_command(cfg, bid, ["--max-cost", "USD"] if capped else [])
    click.echo(f"to finish the batch: {hints.command(command)}", err=True)
    note = cfg.redis.note()
    if note:
        click.echo(note, err=True)
    if cfg.redis.memory:
        click.echo(f"(it reuses this run's settings, which {settings_path(cfg.output)} keeps)", err=True)
        if capped:
            click.echo(f"(the resumed run's cap counts from zero: this run spent "
                       f"${float(meta.get('cost') or 0):.4f})", err=True)
    elif capped:
        click.echo("(give a cap above the old one)", err=True)

