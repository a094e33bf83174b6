"""``batchrun run``: submit, local workers and collect in one command.

On the in-process Redis the workers are threads of this process; on a real
Redis they are ``batchrun worker --burst`` processes, and workers on other
machines may join.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import click

from batchrun.ops import hints

from batchrun.runner import shard
from batchrun.ops.collect import CollectReport, collect, default_errors_path
from batchrun.state.connections import connect, describe, is_memory
from batchrun.exitcodes import Exit, for_state
from batchrun.ops.progress import Progress, note
from batchrun.ops.resume import paused_at_cap, set_cap
from batchrun.settings import BatchOptions, WorkerSettings, set_worker_settings
from batchrun.state.jobcounts import jobs_left
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore
from batchrun.ops.submit import submit_file

log = logging.getLogger("batchrun")

DEFAULT_ENDPOINT = "/v1/chat/completions"


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


def run_batch(cfg: RunConfig) -> int:
    errors_path = cfg.errors or default_errors_path(cfg.output)
    sidecar = settings_path(cfg.output)
    settings = WorkerSettings.from_env(concurrency=cfg.concurrency, grace_seconds=cfg.grace)
    if not cfg.mock and not settings.api_key:
        raise click.ClickException("OPENAI_API_KEY is not set; export it, or try the mock server with --mock")
    # Every path is checked before anything is submitted: a batch must not start that
    # cannot write its results.
    _check_paths(cfg, errors_path, sidecar)
    # Jobs the files hold already are never sent again, by `run` as by `resume`: a second
    # run onto a complete output must not pay again for answers it would then drop.
    skip, prior_errors = _already_done(cfg, errors_path)
    if skip and not cfg.only_missing:
        again = hints.resume_files(cfg.jobs, cfg.output, cfg.errors, cfg.redis, mock=cfg.mock, extra=["--retry-failed"])
        note(f"{len(skip)} job(s) already in {cfg.output} or {errors_path} are not sent again"
             + (f"; to send the {prior_errors} failed one(s) again: {hints.command(again)}" if prior_errors
                else ""))
    written = [0, 0, 0]  # results, errors, outcomes the files held another one of
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
        report = submit_file(store, cfg.jobs, batch_id=cfg.batch_id, options=cfg.options, endpoint=cfg.endpoint,
                             skip_invalid=cfg.skip_invalid, skip_ids=skip, prices=cfg.prices,
                             on_skip=lambda e: click.echo(f"skipped: {e}", err=True))
        bid = report.batch_id
        # Only now (a refused run leaves no settings behind), and with the batch id: a rerun of
        # this command after a crash continues this batch instead of paying for its jobs again.
        saved = save_run_settings(cfg, sidecar, bid)
        stack.callback(lambda: record_spent(sidecar, saved, bid, store))
        note(f"batch {bid}: {report.total} job(s) on {describe(cfg.redis_url)}")

        workers = _start_workers(cfg, settings, store)
        stack.callback(workers.stop)
        progress = stack.enter_context(Progress(store, bid, total=report.total))

        def should_stop() -> bool:
            import redis

            try:
                state = store.meta(bid).get("state")
            except (redis.ConnectionError, redis.TimeoutError):
                state = None  # Redis away: collect waits it out, and so does this run
            return state == BatchState.PAUSED or not workers.alive()

        def collect_now(**kw) -> None:
            r = CollectReport()
            try:
                collect(store, bid, cfg.output, errors_path, on_note=lambda m: click.echo(m, err=True), report=r, **kw)
            finally:
                # Counted even when Ctrl-C cuts the collect short: what it wrote is in the files.
                written[0] += r.results_written
                written[1] += r.errors_written
                written[2] += r.other_there

        # SIGTERM (timeout, CI, `docker stop`) stops as the first Ctrl-C does: no paid answer is
        # dropped, and the command that continues is printed.
        stack.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, _interrupt))
        try:
            collect_now(follow=True, poll=0.3, on_progress=lambda r: progress.update(), should_stop=should_stop)
        except KeyboardInterrupt:
            progress.close()
            click.echo(f"\ninterrupted: requests in flight get up to {cfg.grace:.0f} s to finish "
                       f"(Ctrl-C again to stop at once; nothing finished is lost)", err=True)
            try:
                shard.STOP.set()
                workers.stop()
                collect_now()
            except KeyboardInterrupt:
                workers.abandon()
                click.echo("stopped at once; the jobs in flight come back to the queue as after a crash", err=True)
            counts = store.counts(bid)
            click.echo(_summary(cfg, errors_path, written, skip)
                       + f"; {jobs_left(counts)} job(s) not done", err=True)
            _print_resume(cfg, bid, errors_path, store)
            return Exit.INTERRUPTED
        if store.meta(bid).get("state") != BatchState.FINISHED:
            # Paused (quota, the spending cap): the requests in flight still land and were paid
            # for; wait for the workers to finish them, and write them too.
            workers.stop()
            collect_now()
        progress.close()
        store.expire_ended()  # a finished batch's keys start their --keep-days now

    meta = store.meta(bid)
    counts = store.counts(bid)
    click.echo(_summary(cfg, errors_path, written, skip)
               + (_held(cfg.output, errors_path) if skip else ""))
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


def _summary(cfg: RunConfig, errors_path: str, written: list[int], skip: set[str]) -> str:
    """What this command wrote (not what the batch holds: a rerun writes only what was missing)."""
    return (f"{written[0]} result(s) written to {cfg.output}, {written[1]} error(s) to {errors_path}"
            + (f"; {len(skip)} job(s) were there already" if skip else "")
            + (f"; {written[2]} outcome(s) of this batch were not written, as the files hold another outcome "
               f"for their custom_id (a job sent twice after a Redis rollback, or a race with another run)"
               if written[2] else ""))


def _check_paths(cfg: RunConfig, errors_path: str, sidecar: str) -> None:
    from batchrun.files.outputs import OutputFileError, check_writable

    named = {"-o": cfg.output, "--errors": errors_path, "the settings file": sidecar}
    jobs = os.path.realpath(cfg.jobs)
    seen: dict[str, str] = {}
    for what, path in named.items():
        real = os.path.realpath(path)
        if real == jobs or _same_file(path, cfg.jobs):  # samefile: a hard link too
            raise OutputFileError(f"{what} {path} is the jobs file itself; write the results to another file "
                                  f"(nothing was submitted)")
        if real in seen:
            raise OutputFileError(f"{what} {path} is also {seen[real]}; give them different files "
                                  f"(nothing was submitted)")
        seen[real] = f"{what} {path}"
        try:
            check_writable(path)
        except OutputFileError as exc:
            raise OutputFileError(f"{exc}; nothing was submitted") from None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False  # one of them does not exist (yet)


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


def _held(output: str, errors_path: str) -> str:
    """After a resume from the files, which already held earlier runs' lines: what they hold now."""
    from batchrun.files.outputs import iter_custom_ids

    results, errors = (sum(1 for _ in iter_custom_ids(p)) if os.path.exists(p) else 0 for p in (output, errors_path))
    return f"; the files now hold {results} result(s) and {errors} error(s) in all"


def _apply_new_cap(store: BatchStore, bid: str, max_cost: float) -> None:
    """`run --batch-id ID --max-cost N` on a batch that exists: N becomes its cap, and a batch
    paused at its old cap runs again."""
    meta = store.meta(bid)
    if not max_cost or float(meta.get("max_cost") or 0) == max_cost:
        return
    set_cap(store, bid, max_cost)  # CapTooLow (a ValueError) when it would pause the batch again at once
    if paused_at_cap(meta):
        store.resume(bid)


def _already_done(cfg: RunConfig, errors_path: str) -> tuple[set[str], int]:
    """custom_ids the output files hold (results, and errors unless they are to be retried),
    and how many of them are errors."""
    from pathlib import Path

    from batchrun.files.outputs import read_custom_ids, repair_truncated_tail

    for path in (cfg.output, errors_path):
        repaired = repair_truncated_tail(path) if Path(path).exists() else None
        if repaired:
            note(repaired)
    done = read_custom_ids(cfg.output)
    failed: set[str] = set()
    if cfg.retry_failed and Path(errors_path).exists() and Path(errors_path).stat().st_size:
        kept = f"{errors_path}.previous"
        os.replace(errors_path, kept)  # their new outcome goes to a fresh errors file
        note(f"the errors of the previous run are sent again; the old errors file is now {kept}")
    else:
        failed = read_custom_ids(errors_path) - done
    return done | failed, len(failed)


def settings_path(output: str) -> str:
    """The file beside OUT that keeps a run's settings, so that `resume JOBS -o OUT` repeats them."""
    p = Path(output)
    stem = p.name[:-len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return str(p.with_name(stem + ".batchrun.json"))


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


def save_run_settings(cfg: RunConfig, path: str, batch_id: str | None = None) -> dict:
    """Write the settings a resume repeats (never the Redis URL nor any key: they may hold secrets)."""
    previous = load_run_settings(path) if cfg.only_missing else None
    saved = {
        "jobs": cfg.jobs, "endpoint": cfg.endpoint, "skip_invalid": cfg.skip_invalid,
        "options": cfg.options.to_fields(), "concurrency": cfg.concurrency, "processes": cfg.processes,
        "grace": cfg.grace, "mock": cfg.mock, "prices": cfg.prices,
        "max_cost_total": cfg.options.max_cost if cfg.cap_total is None else cfg.cap_total,
        # USD each batch of this file spent: a resume's cap is what the first run's cap leaves.
        "spent_usd": dict((previous or {}).get("spent_usd") or {}),
    }
    if batch_id and not cfg.redis.memory:
        saved["batch_id"] = batch_id  # the batch a rerun of this command continues
    _write_json(path, saved)
    return saved


def load_run_settings(path: str) -> dict | None:
    from batchrun.files.outputs import OutputFileError

    try:
        with open(path) as f:
            text = f.read()
        if not text.strip():
            return None  # made empty by the check that the path is writable
        data = json.loads(text)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise OutputFileError(f"{path}: cannot read the first run's settings ({exc}); "
                              f"remove it and give the options again") from None
    if not isinstance(data, dict) or not isinstance(data.get("options"), dict):
        raise OutputFileError(f"{path}: not a batchrun settings file; remove it and give the options again")
    return data


def record_spent(path: str, saved: dict, bid: str, store: BatchStore) -> None:
    import redis

    try:
        saved["spent_usd"][bid] = float(store.meta(bid).get("cost") or 0)
    except (redis.ConnectionError, redis.TimeoutError):
        return  # Redis is gone: the next run counts from what it knows
    _write_json(path, saved)


def spent_usd(saved: dict) -> float:
    return sum(float(v) for v in (saved.get("spent_usd") or {}).values())


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # whole or not at all


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


class _RunLogFilter(logging.Filter):
    """Worker lines in `run` at the default verbosity: warnings and the one-line retry
    summaries (what is happening, when it retries) show, the rest is the progress display's.
    A line that carries a `batchrun resume ID` command is completed for this run, or dropped
    (``complete`` None) where the run prints it completed itself."""

    def __init__(self, complete=None, *, quiet: bool = True):
        super().__init__()
        self.complete = complete
        self.quiet = quiet  # drop the info lines; under -v (and -q) the level alone decides

    def filter(self, record: logging.LogRecord) -> bool:
        if self.quiet and record.levelno < logging.WARNING and record.funcName != "_summarise":
            return False
        message = record.getMessage()
        if hints.has_command(message):
            if self.complete is None:
                return False
            record.msg, record.args = hints.complete(message, self.complete), ()
        return True


def _quiet_worker_lines(cfg: RunConfig, stack: ExitStack) -> None:
    # At every verbosity a worker line's `batchrun resume ID` is completed for this run; only at
    # the default one are the info lines dropped (-v shows every line, -q what its level lets by).
    level = logging.getLogger("batchrun").getEffectiveLevel()
    worker_log = logging.getLogger("batchrun.worker")
    quiet = _RunLogFilter(lambda bid, extra: _continue_command(cfg, bid, extra), quiet=level == logging.INFO)
    worker_log.addFilter(quiet)
    stack.callback(worker_log.removeFilter, quiet)


def _worker_log_mode() -> str:
    level = logging.getLogger("batchrun").getEffectiveLevel()
    return "verbose" if level < logging.INFO else "quiet" if level > logging.INFO else "summaries"


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
    from batchrun.runner.worker import make_worker, preload_encodings

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
    cmd = [sys.executable, "-m", "batchrun.ops.run", _worker_log_mode(), "worker", "--burst", "--grace", str(cfg.grace)]
    if cfg.concurrency:
        cmd += ["--concurrency", str(cfg.concurrency)]
    for _ in range(cfg.processes):
        # Own session: a Ctrl-C at the terminal reaches `run` only, which stops them once, gracefully.
        workers.procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    return workers


if __name__ == "__main__":
    # A local worker process of `run` on a real Redis: `python -m batchrun.ops.run MODE worker …`. In
    # "summaries" mode it shows warnings and the retry summaries, as the in-process worker does;
    # `run` prints pause messages itself, with the command that works from there.
    from batchrun.cli.main import main

    from batchrun.runner.worker import watch_parent

    mode, args = sys.argv[1], sys.argv[2:]
    # `run` killed (SIGKILL, OOM): this worker must not go on sending its batch unwatched. It
    # stops as on SIGTERM (requests in flight get the grace, the rest stays queued), and a
    # rerun of the same command continues that batch.
    watch_parent(os.getppid(), lambda: os.kill(os.getpid(), signal.SIGTERM))
    if mode == "summaries":
        # The process runs quiet (-q: RQ's own lines too); only its worker logger says more.
        logging.getLogger("batchrun.worker").setLevel(logging.INFO)
    # At every verbosity: a pause line's `batchrun resume ID` is dropped, `run` prints the command itself.
    logging.getLogger("batchrun.worker").addFilter(_RunLogFilter(quiet=mode == "summaries"))
    main(args=(["-v"] if mode == "verbose" else ["-q"]) + args, prog_name="batchrun")
