"""The ``batchrun`` command: a thin shell over the library."""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from batchrun import __version__
from batchrun.state.connections import ENV_URL, check_url, connect, db_out_of_range, describe, is_memory, resolve_url
from batchrun.files.jobfile import JobFileError
from batchrun.settings import (MAX_CONCURRENCY, MAX_SHARD_SIZE, BatchOptions, Limits, OptionsError, WorkerSettings,
                               set_worker_settings)
from batchrun.ops.status import format_usd
from batchrun.state.meta import pause_kind_of
from batchrun.state.states import BatchState, PauseKind
from batchrun.state.store import BatchStore
from batchrun.urls import mask_url

log = logging.getLogger("batchrun")


# Libraries whose INFO and DEBUG lines only -vv shows (RQ sets its own loggers' levels, so each is named).
NOISY = ("httpx2", "httpx", "openai", "rq", "rq.worker", "rq.job", "rq.queue", "rq.scheduler", "rq.registry",
         "asyncio", "aiohttp.access")


def setup_logging(verbosity: int) -> None:
    """-q: warnings and errors only; -v: batchrun's own detail; -vv: every library's too."""
    level = logging.DEBUG if verbosity > 1 else logging.WARNING if verbosity < 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)  # also when logging was configured before (tests invoke main again)
    from batchrun.ops import progress

    progress.QUIET = verbosity < 0
    logging.getLogger("batchrun").setLevel(logging.DEBUG if verbosity == 1 else logging.NOTSET)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING if verbosity < 2 else logging.NOTSET)


def _check_redis_url(ctx, param, value):
    problem = check_url(value) if value else None
    if problem:
        raise click.BadParameter(problem, ctx=ctx, param=param)
    return value


class Number(click.FloatRange):
    """A FloatRange that also refuses NaN and the infinities (which pass its range checks)."""

    def convert(self, value, param, ctx):
        import math

        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


redis_option = click.option("--redis-url", envvar=ENV_URL, default=None, callback=_check_redis_url,
                            help=f"Redis that keeps the batches (env {ENV_URL}); `run` without one uses an "
                                 "in-process Redis.")


def batch_options(f):
    """Options stored with a batch (submit and run)."""
    opts = [
        click.option("--rpm", multiple=True, metavar="[MODEL=]N", help="Requests per minute (per model, or bare for all)."),
        click.option("--tpm", multiple=True, metavar="[MODEL=]N", help="Tokens per minute (per model, or bare for all)."),
        click.option("--max-attempts", type=click.IntRange(1), default=10, show_default=True,
                     help="Attempts per job before it goes to the errors file."),
        click.option("--backoff-base", type=Number(0), default=1.0, show_default=True,
                     help="First retry waits up to this many seconds (full jitter)."),
        click.option("--backoff-cap", type=Number(0, min_open=True), default=60.0, show_default=True,
                     help="Longest wait before a retry, in seconds; a server's longer wait hint is capped to "
                          "it (a 429 asking for longer pauses the batch)."),
        click.option("--give-up-after", type=Number(0, 86400, min_open=True), default=300.0,
                     show_default=True, metavar="S",
                     help="Pause the batch when the server has not answered (or only with 5xx) for S seconds."),
        click.option("--shard-size", type=click.IntRange(0, MAX_SHARD_SIZE), default=0,
                     help="Jobs per shard (the unit RQ hands to a worker), at most 1,000,000; default: a "
                          "quarter of the file, within 1,000 to 10,000."),
        click.option("--burst-seconds", type=Number(0), default=0.0, show_default=True,
                     help="Burst the budget allows, in seconds' worth of the limit; 0: what the server's "
                          "headers show (one second's worth until they do)."),
        click.option("--max-cost", type=Number(0), default=0.0, metavar="USD",
                     help="Hard spending cap: the batch pauses before a job could take it past this "
                          "(requests in flight counted at their worst case); 0: no cap."),
        click.option("--prices", type=click.Path(exists=True, dir_okay=False), default=None, envvar="BATCHRUN_PRICES",
                     help="TOML price table overriding the shipped one (env BATCHRUN_PRICES)."),
        click.option("--keep-days", type=Number(0, min_open=True), default=7.0, show_default=True,
                     help="Days a finished or cancelled batch's data stays in Redis."),
        click.option("--batch-id", default=None, help="Name the batch (default: a new id)."),
        click.option("--endpoint", default="/v1/chat/completions", show_default=True,
                     help="URL for lines that are bare request bodies."),
        click.option("--skip-invalid", is_flag=True, help="Submit the valid lines of a file that has invalid ones."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_options(rpm, tpm, max_attempts, backoff_base, backoff_cap, shard_size, burst_seconds, max_cost,
                 keep_days, give_up_after=300.0) -> BatchOptions:
    try:
        limits = Limits.parse(rpm, tpm)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _check_finite("--max-cost", max_cost)
    options = BatchOptions(max_attempts=max_attempts, backoff_base=backoff_base, backoff_cap=backoff_cap,
                           shard_size=shard_size, burst_seconds=burst_seconds, max_cost=max_cost, keep_days=keep_days,
                           give_up_seconds=give_up_after, limits=limits)
    problems = options.problems()
    if problems:
        raise click.UsageError("; ".join(problems))
    return options


# What the user may have typed for a stored batch option: (option, BatchOptions field).
_STORED = (("--max-attempts", "max_attempts"), ("--backoff-base", "backoff_base"), ("--backoff-cap", "backoff_cap"),
           ("--shard-size", "shard_size"), ("--burst-seconds", "burst_seconds"), ("--keep-days", "keep_days"),
           ("--give-up-after", "give_up_seconds"), ("--max-cost", "max_cost"))


def _show_limits(by_model: dict[str, int]) -> str:
    return " ".join(f"{m}={v}" if m != "*" else str(v) for m, v in sorted(by_model.items())) or "none"


def refuse_changed_settings(store: BatchStore, batch_id: str | None, options: BatchOptions, *,
                            cap_applies: bool) -> None:
    """A batch keeps the options it was submitted with: a new submit that gives other values
    for them is refused (rather than ignored), naming each. Options left at their defaults
    are not compared, so `run … --batch-id ID` (the printed resume command) still works.
    ``cap_applies``: the command gives an existing batch the new --max-cost (run does)."""
    if not batch_id or not store.exists(batch_id):
        return
    ctx = click.get_current_context()
    given = {name for name in ctx.params if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    stored = store.options(batch_id)
    changed = []
    for option, name in _STORED:
        if option[2:].replace("-", "_") not in given or (name == "max_cost" and cap_applies):
            continue
        if getattr(options, name) != getattr(stored, name):
            changed.append(f"{option} {getattr(options, name):g} (it has {getattr(stored, name):g})")
    for kind in ("rpm", "tpm"):
        mine = {m: e[kind] for m, e in options.limits.by_model.items() if kind in e}
        theirs = {m: e[kind] for m, e in stored.limits.by_model.items() if e.get(kind)}
        if kind in given and mine != theirs:
            changed.append(f"--{kind} {_show_limits(mine)} (it has {_show_limits(theirs)})")
    if changed:
        cap = f"; change its spending cap with: batchrun resume {batch_id} --max-cost USD" \
            if any(c.startswith("--max-cost") for c in changed) else ""
        raise click.UsageError(f"batch {batch_id} exists with other settings: {', '.join(changed)}; a batch keeps "
                               f"the settings it was submitted with: leave these options out to add jobs to it, "
                               f"or give a new --batch-id{cap}")


def _check_finite(name: str, value: float | None) -> None:
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{name} must be a number of dollars, not {value}")


def check_run(redis_url, processes, concurrency, grace, batch_id, options) -> None:
    """`run`'s options that cannot work together, refused before anything is written."""
    url = resolve_url(redis_url)
    if processes > 1 and is_memory(url):
        raise click.UsageError(f"--processes {processes} needs a shared Redis (--redis-url or {ENV_URL}): without "
                               f"one, `run` keeps its Redis inside its own process, with one in-process worker")
    worker_settings(concurrency, grace)
    if batch_id and not is_memory(url):
        refuse_changed_settings(BatchStore(connect(url)), batch_id, options, cap_applies=True)


def worker_settings(concurrency: int | None, grace: float) -> WorkerSettings:
    """This process's worker settings; an impossible one (from the environment too) is a usage error."""
    try:
        return WorkerSettings.from_env(concurrency=concurrency, grace_seconds=grace)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def open_store(redis_url: str | None) -> tuple[BatchStore, str]:
    """The shared Redis of the commands that work on batches kept there; without a configured
    one they would look into (or write to) an in-process Redis that ends with the command."""
    url = resolve_url(redis_url)
    if is_memory(url):
        command = click.get_current_context().info_name
        hint = "; for a one-machine run without Redis, use `batchrun run`" if command == "submit" else ""
        raise click.UsageError(f"no Redis is configured: `batchrun {command}` works on the batches a shared Redis "
                               f"keeps; pass --redis-url redis://HOST:6379/0 or set {ENV_URL}{hint}")
    return BatchStore(connect(url)), url


def fail(message: str, code: int = 1):
    click.echo(f"batchrun: {message}", err=True)
    sys.exit(code)


def load_config(path: str) -> dict:
    """A TOML config file as click's default_map: top-level keys apply to every command
    that has such an option, a [command] table to that command only."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise click.FileError(path, hint=exc.strerror) from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--config") from None
    problems = config_problems(path, data)
    if problems:
        raise click.BadParameter("; ".join(problems), param_hint="--config")
    shared = {k.replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}
    default_map = {}
    for name, command in main.commands.items():
        params = {p.name: p for p in command.params}
        # A top-level key goes to the commands whose option takes its value (`tpm = ["m=N"]` is
        # run's --tpm, not mock-server's single number).
        entry = {k: _config_value(params[k], v) for k, v in shared.items()
                 if k in params and _config_check(command, k, v) is None}
        entry.update({k.replace("-", "_"): _config_value(params[k.replace("-", "_")], v)
                      for k, v in data.get(name, {}).items()})
        default_map[name] = entry
    return default_map


def _config_value(param: click.Parameter, value):
    """A config value as its option takes it: a repeatable option also takes one string
    (split on spaces, as its environment variable is) or one number."""
    if param.multiple and isinstance(value, str):
        return value.split()
    if param.multiple and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    return value


def _config_check(command: click.Command, key: str, value) -> str | None:
    """Why ``command``'s option ``key`` refuses ``value`` (None: it takes it, or has no such option)."""
    param = next((p for p in command.params if p.name == key.replace("-", "_") and p.name != "help"), None)
    if param is None:
        return None
    try:
        with click.Context(command) as ctx:
            cast = param.type_cast_value(ctx, _config_value(param, value))
            if param.callback is not None:  # the checks an option makes in its callback (--redis-url's)
                param.callback(ctx, param, cast)
    except click.BadParameter as exc:
        return exc.message
    except (TypeError, ValueError) as exc:  # a value of the wrong kind (a list for a number)
        return f"not a value --{param.name.replace('_', '-')} takes ({exc})"
    return None


def config_problems(path: str, data: dict) -> list[str]:
    """Every mistake of a config file, each naming the file and the key: an unknown section or
    key (with the close match, if any), or a value its option would refuse."""
    import difflib

    def unknown(what: str, key: str, known) -> str:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        return f"{path}: unknown {what} {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")

    def check(where: str, command: click.Command, key: str, value) -> str | None:
        problem = _config_check(command, key, value)
        return None if problem is None else f"{path}, {where}{key} = {value!r}: {problem}"

    commands = main.commands
    option_names = {p.name for c in commands.values() for p in c.params if isinstance(p, click.Option)}
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in commands:
                out.append(unknown("section", f"[{key}]", [f"[{c}]" for c in commands]))
                continue
            mine = {p.name for p in commands[key].params if isinstance(p, click.Option)}
            for sub, v in value.items():
                if sub.replace("-", "_") not in mine:
                    out.append(unknown(f"key in [{key}]", sub, mine))
                else:
                    out.append(check(f"[{key}] ", commands[key], sub, v))
        elif key.replace("-", "_") not in option_names:
            out.append(unknown("key", key, option_names))
        else:  # a top-level key must fit one command that has it; the others do without it
            found = [check("", c, key, value) for c in commands.values()
                     if any(p.name == key.replace("-", "_") for p in c.params)]
            if all(found):
                out += found
    return list(dict.fromkeys(p for p in out if p))


# -q, -v (also -vv, -qq) may come after the subcommand, as users type them: `batchrun run … -q`.
_VERBOSITY_FLAGS = ("-q", "--quiet", "-v", "--verbose")


def _lift_verbosity(args: list[str]) -> list[str]:
    """args with every verbosity flag moved before the subcommand (none after a `--`, none that is
    an option's value). Short flags run together lose their leading q/v: `-qo X` is `-q` and `-o X`."""
    lifted, rest = [], []
    command: click.Command = main
    value_next = False  # the token is the value of the option before it
    for i, arg in enumerate(args):
        if value_next:
            rest.append(arg)
            value_next = False
            continue
        if arg == "--":
            rest += args[i:]
            break
        if arg in _VERBOSITY_FLAGS:
            lifted.append(arg)
            continue
        if len(arg) > 2 and arg[0] == "-" and arg[1] in "qv":
            keep = arg[1:].lstrip("qv")
            lifted.append(arg[:len(arg) - len(keep)])
            if not keep:
                continue
            arg = "-" + keep
        if command is main and arg in main.commands:
            command = main.commands[arg]
        value_next = _takes_value(command, arg)
        rest.append(arg)
    return lifted + rest


def _takes_value(command: click.Command, token: str) -> bool:
    """Whether the token after ``token`` is the value of one of ``command``'s options."""
    if not token.startswith("-") or token == "-":
        return False
    opts = {name: p for p in command.params if isinstance(p, click.Option) for name in p.opts + p.secondary_opts}

    def needs(p: click.Option) -> bool:
        return not p.is_flag and not p.count

    if token.startswith("--"):
        return token in opts and needs(opts[token])  # `--output=X` holds its value
    for j, ch in enumerate(token[1:], 1):  # -po: flags, then an option that takes the rest or the next token
        p = opts.get("-" + ch)
        if p is None:
            return False
        if needs(p):
            return j == len(token) - 1
    return False


class Group(click.Group):
    """Expected trouble becomes one sentence, not a stack trace."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, _lift_verbosity(list(args)))

    def invoke(self, ctx):
        import redis

        from batchrun.files.outputs import OutputFileError

        from batchrun.state import connections

        try:
            return super().invoke(ctx)
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:  # before ConnectionError
            fail(f"{describe(connections.last_url or '')} refused batchrun's credentials ({exc}); give the right "
                 f"user and password in --redis-url / {ENV_URL} (redis://USER:PASSWORD@HOST:6379/0)")
        except redis.InvalidResponse:
            fail(f"{describe(connections.last_url or '')} does not answer as a Redis server (another service on "
                 f"that port?); check the host and port in --redis-url / {ENV_URL}")
        except redis.exceptions.NoPermissionError as exc:
            fail(f"the Redis user of {describe(connections.last_url or '')} may not run what batchrun needs "
                 f"({exc}); give a user with these permissions in --redis-url / {ENV_URL}")
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            fail(f"cannot reach Redis ({exc}); check --redis-url / {ENV_URL} and that the server runs")
        except redis.ResponseError as exc:
            if not db_out_of_range(exc):
                raise
            fail(f"{describe(connections.last_url or '')} names a database this Redis server does not have (a Redis "
                 f"has 16 by default, 0 to 15): give another one in --redis-url / {ENV_URL}", 2)
        except OutputFileError as exc:
            fail(str(exc))


@click.group(cls=Group, context_settings={"auto_envvar_prefix": "BATCHRUN", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
@click.option("-v", "--verbose", count=True, help="Show each retry and more.")
@click.option("-q", "--quiet", count=True, help="Only warnings and errors.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, envvar="BATCHRUN_CONFIG",
              help="TOML file of option defaults (env BATCHRUN_CONFIG).")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int, config_path: str | None) -> None:
    """Run bulk OpenAI requests from JSONL files at the speed your rate limits allow.

    Every option can also come from the environment, as BATCHRUN_<COMMAND>_<OPTION>
    (e.g. BATCHRUN_WORKER_CONCURRENCY=200, BATCHRUN_SUBMIT_TPM="gpt-4o-mini=2000000"),
    or from a TOML file given with --config.
    """
    setup_logging(verbose - quiet)
    if config_path:
        ctx.default_map = load_config(config_path)


@main.command()
@click.argument("jobs", type=click.Path(exists=True, dir_okay=False))
@redis_option
@batch_options
def submit(jobs, redis_url, batch_id, endpoint, skip_invalid, prices, **kw):
    """Load JOBS (JSONL) into Redis and queue its shards; prints the batch id last."""
    options = make_options(**kw)
    store, url = open_store(redis_url)  # refuses the in-process Redis, which would end with this command
    refuse_changed_settings(store, batch_id, options, cap_applies=False)
    report = _submit(store, jobs, batch_id, endpoint, skip_invalid, options, prices)
    click.echo(f"{report.added} job(s) added to batch {report.batch_id} ({report.total} in all) on {describe(url)}")
    click.echo(report.batch_id)


def _submit(store, jobs, batch_id, endpoint, skip_invalid, options, prices):
    from batchrun.ops.submit import submit_file

    def on_skip(err):
        click.echo(f"skipped: {err}", err=True)

    try:
        return submit_file(store, jobs, batch_id=batch_id, options=options, endpoint=endpoint,
                           skip_invalid=skip_invalid, on_skip=on_skip, prices=prices)
    except JobFileError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(str(exc))


@main.command()
@redis_option
@click.option("--concurrency", "-c", type=click.IntRange(1, MAX_CONCURRENCY), default=None,
              help="Requests in flight per process (default 100, at most 10,000).")
@click.option("--processes", "-p", type=click.IntRange(1), default=1, show_default=True, help="Worker processes (supervised).")
@click.option("--burst", is_flag=True, help="Exit once no batch this Redis holds has work left (retries included).")
@click.option("--name", default=None, help="Worker name shown by `rq info`.")
@click.option("--grace", type=Number(0), default=30.0, show_default=True,
              help="On SIGTERM/Ctrl-C, seconds in-flight requests get to finish (a second signal stops at once).")
@click.option("--request-timeout", type=Number(0, min_open=True), default=None,
              help="Seconds one request may take, its answer or stream included (default 600; "
                   "or BATCHRUN_REQUEST_TIMEOUT).")
def worker(redis_url, concurrency, processes, burst, name, grace, request_timeout):
    """Run worker process(es) that send the queued batches' requests.

    OPENAI_API_KEY and OPENAI_BASE_URL are read from the environment.
    """
    from batchrun.runner.worker import make_worker, preload_encodings, run_pool

    url = resolve_url(redis_url)
    if is_memory(url):
        fail(f"a worker needs a shared Redis: pass --redis-url or set {ENV_URL} "
             "(or use `batchrun run`, which runs workers in process)", 2)
    if request_timeout is not None:  # through the environment, which the worker processes inherit
        os.environ["BATCHRUN_REQUEST_TIMEOUT"] = repr(request_timeout)
    settings = worker_settings(concurrency, grace)
    if not settings.api_key:
        fail("OPENAI_API_KEY is not set in this worker's environment; export it "
             "(it is read from the environment only, never stored in Redis)")
    if processes > 1:
        # The Redis URL (it may hold a password) goes through the environment, not the command line.
        os.environ[ENV_URL] = url
        argv = ["--processes", "1", "--grace", str(grace)] + (["--concurrency", str(concurrency)] if concurrency else [])
        argv += ["--burst"] if burst else []
        sys.exit(run_pool(argv, processes, burst=burst))
    set_worker_settings(settings)
    preload_encodings(freeze=True)
    redis = connect(url)
    w = make_worker(redis, burst=burst, name=name)
    log.info("worker %s on %s, sending to %s with %d in flight%s", w.name, describe(url), mask_url(settings.base_url),
             settings.concurrency, " (burst)" if burst else "")
    w.work(burst=burst, logging_level=logging.getLogger("rq.worker").getEffectiveLevel())  # as -v/-vv set it


@main.command()
@click.argument("batch_id")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Results JSONL.")
@click.option("--errors", type=click.Path(dir_okay=False), default=None, help="Errors JSONL (default: OUTPUT.errors.jsonl).")
@click.option("--follow", is_flag=True, help="Keep writing until the batch is finished.")
@redis_option
@click.pass_context
def collect(ctx, batch_id, output, errors, follow, redis_url):
    """Append BATCH_ID's results (and errors) that the files do not hold yet.

    Exit codes: 0 finished, 3 finished with errors, 4 not finished (paused, cancelled, or
    running without --follow), 1 an error, 2 a usage error.
    """
    import time

    from contextlib import nullcontext

    from batchrun.ops import hints
    from batchrun.ops.collect import UNSERVED_AFTER, UnservedWatch, collect as do_collect, default_errors_path
    from batchrun.exitcodes import for_state
    from batchrun.files.outputs import check_writable
    from batchrun.ops.progress import Progress

    store, url = open_store(redis_url)
    where = hints.RedisRef.of(url, hints.source_of(ctx))
    if not store.exists(batch_id):
        fail(f"no batch {batch_id!r} in this Redis")
    errors = errors or default_errors_path(output)
    for path in (output, errors):
        check_writable(path)
    shown = Progress(store, batch_id, total=int(store.meta(batch_id).get("total", 0))) if follow else nullcontext()
    watch = UnservedWatch(after=float(os.environ.get("BATCHRUN_UNSERVED_SECONDS") or UNSERVED_AFTER))
    told, last = {"paused": ""}, [0.0]

    def say(message: str) -> None:
        if progress is not None and getattr(progress, "bar", None) is not None:
            progress.bar.write(message, file=sys.stderr)
        else:
            click.echo(message, err=True)

    def on_progress(report) -> None:
        import redis

        progress.update()
        try:  # Redis going away is waited out by collect, which says so: these notes wait too
            if report.state == BatchState.PAUSED:
                reason = store.meta(batch_id).get("reason") or ""
                if reason != told["paused"]:
                    told["paused"] = reason
                    say(f"batch {batch_id} is paused: "
                        + hints.complete(reason, lambda bid, extra: hints.resume_batch(bid, where, extra)))
            if time.monotonic() - last[0] >= 2:  # counting costs a few Redis calls: not every poll
                last[0] = time.monotonic()
                idle = watch.update(store.counts(batch_id))
                if idle is not None:
                    say(hints.unserved(batch_id, idle, where))
        except (redis.ConnectionError, redis.TimeoutError):
            return

    with shown as progress:
        report = do_collect(store, batch_id, output, errors, follow=follow,
                            on_note=lambda m: click.echo(m, err=True),
                            on_progress=on_progress if follow else None)
    click.echo(f"{report.results_written} result(s) written to {output}, {report.errors_written} error(s) to {errors}"
               + (f"; {report.already_there} were already there" if report.already_there else "")
               + f"; batch is {report.state}")
    if report.other_there:
        click.echo(f"{report.other_there} outcome(s) of batch {batch_id} were not written: the files already hold "
                   f"another outcome for their custom_id (from another batch?); collect into another file to keep "
                   f"them", err=True)
    meta = store.meta(batch_id)
    if meta.get("state") == BatchState.PAUSED and not follow:
        click.echo(f"batch {batch_id} is paused: " + hints.complete(
            meta.get("reason") or "", lambda bid, extra: hints.resume_batch(bid, where, extra)), err=True)
    elif meta.get("state") not in (BatchState.FINISHED, BatchState.CANCELLED) and not follow:  # exit 4: what continues
        args = ["collect", batch_id, "-o", output] + (["--errors", errors] if errors != default_errors_path(output)
                                                      else []) + where.args() + ["--follow"]
        click.echo(f"batch {batch_id} is still running; follow it with: {hints.command(args)}"
                   + (f" {where.note()}" if where.note() else ""), err=True)
    sys.exit(for_state(meta.get("state", ""), int(meta.get("failed") or 0)))


@main.command()
@click.argument("jobs", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Results JSONL.")
@click.option("--errors", type=click.Path(dir_okay=False), default=None, help="Errors JSONL (default: OUTPUT.errors.jsonl).")
@redis_option
@batch_options
@click.option("--concurrency", "-c", type=click.IntRange(1, MAX_CONCURRENCY), default=None,
              help="Requests in flight per worker (default 100, at most 10,000).")
@click.option("--processes", "-p", type=click.IntRange(1), default=1, show_default=True,
              help="Local worker processes (with --redis-url; in-process Redis uses one in-process worker).")
@click.option("--mock", is_flag=True, help="Send to a built-in mock OpenAI server (no API key needed).")
@click.option("--grace", type=Number(0), default=30.0, show_default=True,
              help="On Ctrl-C, seconds in-flight requests get to finish (Ctrl-C again stops at once).")
@click.option("--request-timeout", type=Number(0, min_open=True), default=None,
              help="Seconds one request may take, its answer or stream included (default 600; "
                   "or BATCHRUN_REQUEST_TIMEOUT).")
@click.pass_context
def run(ctx, jobs, output, errors, redis_url, batch_id, endpoint, skip_invalid, concurrency, processes, mock, grace,
        prices, request_timeout, **kw):
    """Submit JOBS, run local workers and collect the results into OUTPUT, with progress.

    Jobs whose custom_id OUTPUT or its errors file already holds are not sent again.
    Exit codes: 0 finished, 3 finished with errors, 4 paused or work left, 130 interrupted,
    1 an error, 2 a usage error.
    """
    from batchrun.ops.hints import source_of
    from batchrun.ops.run import RunConfig, run_batch

    options = make_options(**kw)
    if request_timeout is not None:  # through the environment, which the worker processes inherit
        os.environ["BATCHRUN_REQUEST_TIMEOUT"] = repr(request_timeout)
    check_run(redis_url, processes, concurrency, grace, batch_id, options)
    cfg = RunConfig(jobs=jobs, output=output, errors=errors, redis_url=resolve_url(redis_url), batch_id=batch_id,
                    endpoint=endpoint, skip_invalid=skip_invalid, options=options,
                    concurrency=concurrency, processes=processes, mock=mock, grace=grace, prices=prices,
                    redis_source=source_of(ctx))
    try:
        sys.exit(run_batch(cfg))
    except (JobFileError, ValueError) as exc:
        fail(str(exc))


@main.command()
@click.argument("batch_id")
@redis_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object (fields documented in the README).")
@click.option("--watch", is_flag=True, help="Refresh every few seconds until the batch ends (Ctrl-C to stop watching).")
@click.option("--every", type=Number(0.2), default=2.0, show_default=True, help="Seconds between refreshes.")
@click.pass_context
def status(ctx, batch_id, redis_url, as_json, watch, every):
    """Where BATCH_ID's jobs are, its pace against the limits, its ETA and its cost."""
    import time

    from batchrun.ops import hints
    from batchrun.ops.collect import unserved_for
    from batchrun.ops.status import batch_status, describe as describe_status

    store, url = open_store(redis_url)
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                data = batch_status(store, batch_id)
            except LookupError as exc:
                fail(str(exc))
            if as_json:
                click.echo(json.dumps(data))
            else:
                if watch and tty:
                    click.clear()
                where = hints.RedisRef.of(url, hints.source_of(ctx))
                if data["reason"]:  # its command, as it works from here
                    data["reason"] = hints.complete(data["reason"],
                                                    lambda bid, extra: hints.resume_batch(bid, where, extra))
                click.echo("\n".join(describe_status(data)))
                idle = unserved_for(data)
                if idle is not None:
                    click.echo("  " + hints.unserved(batch_id, idle, where))
            if not watch or data["state"] in (BatchState.FINISHED, BatchState.CANCELLED):
                return
            time.sleep(every)
    except KeyboardInterrupt:  # stops watching; the batch goes on
        return


@main.command(name="list")
@redis_option
@click.option("-n", "--limit", type=click.IntRange(1), default=20, show_default=True, help="How many batches.")
def list_batches(redis_url, limit):
    """Recent batches, newest first, one line each."""
    import time

    store, _ = open_store(redis_url)
    ids = store.recent_batches(limit)
    if not ids:
        click.echo("no batch on this Redis")
    for bid in ids:
        m = store.meta(bid)
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(int(m.get("created", 0) or 0)))
        cost = float(m.get("cost", 0) or 0)
        click.echo(f"{bid}  {created}  {m.get('state', '?'):9}  {m.get('done', 0)}/{m.get('total', 0)} done, "
                   f"{m.get('failed', 0)} failed, {format_usd(cost)}  {m.get('source', '')}")


@main.command()
@click.argument("target")
@redis_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="With a JOBS file: the results file to complete.")
@click.option("--errors", type=click.Path(dir_okay=False), default=None, help="Errors JSONL (default: OUTPUT.errors.jsonl).")
@click.option("--retry-failed", is_flag=True, help="With a JOBS file: send again the jobs in the errors file too.")
@click.option("--mock", is_flag=True, help="With a JOBS file: send to the built-in mock server.")
@click.option("--concurrency", "-c", type=click.IntRange(1, MAX_CONCURRENCY), default=None,
              help="Requests in flight per worker (at most 10,000).")
@click.option("--grace", type=Number(0), default=30.0, show_default=True, help="As for run.")
@click.option("--max-cost", type=Number(0), default=None, metavar="USD",
              help="New spending cap for the batch (a batch paused at its cap needs a higher one).")
@click.option("--prices", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TOML price file over the batch's price table (a batch paused for a missing price needs it).")
@click.option("--endpoint", default=None, help="With a JOBS file: as for run (default: the first run's).")
@click.option("--skip-invalid", is_flag=True, default=None, help="With a JOBS file: as for run (default: the first run's).")
@click.option("--rpm", multiple=True, metavar="[MODEL=]N", help="With a JOBS file: as for run (default: the first run's).")
@click.option("--tpm", multiple=True, metavar="[MODEL=]N", help="With a JOBS file: as for run (default: the first run's).")
@click.option("--max-attempts", type=click.IntRange(1), default=None, help="With a JOBS file: as for run.")
@click.option("--backoff-base", type=Number(0), default=None, help="With a JOBS file: as for run.")
@click.option("--backoff-cap", type=Number(0, min_open=True), default=None, help="With a JOBS file: as for run.")
@click.option("--burst-seconds", type=Number(0), default=None, help="With a JOBS file: as for run.")
@click.option("--processes", "-p", type=click.IntRange(1), default=None, help="With a JOBS file: as for run.")
@click.pass_context
def resume(ctx, target, redis_url, output, errors, retry_failed, mock, concurrency, grace, max_cost, prices, **given):
    """Continue a batch: TARGET is a BATCH_ID, or a JOBS file.

    \b
    batchrun resume BATCH_ID           queue again whatever is not done (after a crash, a pause,
                                       burst workers that left, a Redis restart with persistence)
    batchrun resume JOBS.jsonl -o OUT  when the Redis state is gone: run, as a new batch, only the
                                       custom_ids missing from OUT (and its errors file), appending
                                       to the same files, with the first run's settings (kept
                                       beside OUT) unless given here

    Exit codes as for run.
    """
    from pathlib import Path

    from batchrun.ops.hints import source_of

    _check_finite("--max-cost", max_cost)
    if not Path(target).is_file() and (output or target.endswith(".jsonl") or os.sep in target or "/" in target):
        # meant as a JOBS file (a batch id has no path in it), so the Redis is not the question
        what = "is a directory, not a jobs file" if Path(target).is_dir() else "no such file"
        fail(f"{target}: {what}; `resume JOBS.jsonl -o OUT` needs the jobs file of the first run "
             f"(a BATCH_ID takes no -o)", 2)
    if Path(target).is_file():
        if not output:
            fail("resume JOBS.jsonl needs -o RESULTS.jsonl: the results file to complete")
        from batchrun.ops.run import resume_config, run_batch

        try:
            cfg, used = resume_config(target, output, errors, given, max_cost=max_cost, prices=prices, mock=mock,
                                      concurrency=concurrency, grace=grace, retry_failed=retry_failed,
                                      redis_url=resolve_url(redis_url), redis_source=source_of(ctx))
        except OptionsError as exc:
            fail(str(exc), 2)
        except ValueError as exc:
            fail(str(exc))
        if used:
            from batchrun.ops import progress

            progress.note(f"resuming with the first run's settings: {used}")  # -q hides it
        try:
            sys.exit(run_batch(cfg))
        except (JobFileError, ValueError) as exc:
            fail(str(exc))
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value not in (None, (), False)]
    if named:
        fail(f"{', '.join(named)} apply to `resume JOBS -o OUT` only; a batch in Redis keeps the options it "
             f"was submitted with")
    from batchrun.ops import hints

    batch_id = target
    store, url = open_store(redis_url)
    if not store.exists(batch_id):
        fail(f"no batch {batch_id!r} in this Redis, and no file of that name")
    meta = store.meta(batch_id)
    if meta.get("state") == BatchState.CANCELLED:
        fail(f"batch {batch_id} was cancelled")
    if max_cost is None and pause_kind_of(meta) is PauseKind.COST_CAP:
        where = hints.RedisRef.of(url, source_of(ctx))
        fail(f"batch {batch_id} is paused at its spending cap; resume it with a higher one: "
             + hints.command(hints.resume_batch(batch_id, where, ["--max-cost", "USD"]))
             + (f" {where.note()}" if where.note() else ""))
    if max_cost is not None:
        committed = store.committed_cost(batch_id)
        if max_cost and max_cost <= committed:
            fail(f"batch {batch_id} has already spent or set aside ${committed:.4f}; a cap of ${max_cost:.4f} "
                 f"would pause it again at once (give more, or 0 for no cap)")
        store.set_max_cost(batch_id, max_cost)
        click.echo(f"batch {batch_id}: spending cap now " + (format_usd(max_cost) if max_cost else "none"))
    if prices:
        from batchrun.policy.pricing import PriceTable

        try:
            table = PriceTable.from_json(meta["prices"]).with_file(prices) if meta.get("prices") \
                else PriceTable.load(prices)
        except ValueError as exc:
            fail(str(exc))
        store.set_prices(batch_id, table.to_json())
        click.echo(f"batch {batch_id}: prices from {prices} added to its price table")
    n = store.resume(batch_id)
    click.echo(f"batch {batch_id} is running; {n} shard(s) with work left were queued for the workers")


@main.command()
@click.argument("batch_id")
@redis_option
def cancel(batch_id, redis_url):
    """Stop sending BATCH_ID's requests; what is done stays collectable."""
    store, _ = open_store(redis_url)
    if not store.exists(batch_id):
        fail(f"no batch {batch_id!r} in this Redis")
    store.set_state(batch_id, BatchState.CANCELLED, "cancelled by the user")
    click.echo(f"batch {batch_id} cancelled; in-flight requests finish, nothing new is sent")


@main.command()
@click.argument("batch_id")
@redis_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def purge(batch_id, redis_url, yes):
    """Remove BATCH_ID and everything it keeps in Redis (collect its results first)."""
    store, _ = open_store(redis_url)
    meta = store.meta(batch_id)
    if not meta:
        fail(f"no batch {batch_id!r} in this Redis")
    pending = int(meta.get("total", 0)) - int(meta.get("done", 0)) - int(meta.get("failed", 0))
    if not yes:
        what = f"batch {batch_id} ({meta.get('state')}, {meta.get('done', 0)} results, {meta.get('failed', 0)} errors" \
               + (f", {pending} jobs not done" if pending else "") + ")"
        if not click.confirm(f"Remove {what} from Redis? Results not collected yet are lost", default=False):
            fail("nothing removed")
    n = store.purge(batch_id)
    click.echo(f"batch {batch_id} purged ({n} keys removed)")


@main.command()
@redis_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def limits(redis_url, as_json):
    """Each shared budget: configured limit, learnt limit, burst, calibration and what is available now."""
    from batchrun.state.limiter import describe_budgets

    store, _ = open_store(redis_url)
    budgets = describe_budgets(store)
    if as_json:
        click.echo(json.dumps(budgets))
        return
    if not budgets:
        click.echo("no budget in use on this Redis yet")
    for b in budgets:
        click.echo(f"{b['model']} (endpoint {b['endpoint']}, key {b['key_fingerprint']}):")
        for kind in ("tpm", "rpm"):
            click.echo(f"  {kind.upper()}: configured {b['configured_' + kind] or '-'}, learnt "
                       f"{b['learnt_' + kind] or '-'}; burst {b['burst_' + kind]:.0f}; available now "
                       f"{b['available_' + kind]:.0f}" + (" (queued requests owe this)" if b['available_' + kind] < 0
                                                           else ""))
        click.echo(f"  the server charges {b['charge_ratio']:.3f} x our input estimate (learnt)"
                   + (f"; cooling down {b['cooldown_seconds']:.1f} s" if b["cooldown_seconds"] else ""))


@main.command()
@click.argument("jobs", type=click.Path(exists=True, dir_okay=False))
@click.option("--rpm", multiple=True, metavar="[MODEL=]N", help="Requests per minute (per model, or bare for all).")
@click.option("--tpm", multiple=True, metavar="[MODEL=]N", help="Tokens per minute (per model, or bare for all).")
@click.option("--typical-output", type=click.IntRange(0), default=None, metavar="N",
              help="Typical tokens per answer: adds a typical output and cost to the bounds.")
@click.option("--prices", "prices_path", type=click.Path(dir_okay=False), default=None,
              help="TOML price file whose models replace or extend the shipped table (env BATCHRUN_PRICES).")
@click.option("--endpoint", default="/v1/chat/completions", show_default=True,
              help="URL for lines that are bare request bodies.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def estimate(jobs, rpm, tpm, typical_output, prices_path, endpoint, as_json):
    """Count JOBS' tokens; show its cost range and the shortest time your limits allow.

    Nothing is sent and no Redis is needed. Invalid lines are listed and skipped.
    """
    from batchrun.ops.estimate import estimate_file, render_text
    from batchrun.policy.pricing import PriceTable

    try:
        limits = Limits.parse(rpm, tpm)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        prices = PriceTable.load(prices_path)
        report = estimate_file(jobs, endpoint=endpoint, limits=limits, typical_output=typical_output, prices=prices)
    except ValueError as exc:  # a bad price file or --endpoint: the message says which and why
        fail(str(exc))
    if not report.jobs:
        for err in report.errors[:20]:
            click.echo(f"skipped: {err}", err=True)
        fail(f"{jobs} has no job to estimate ({'no valid line' if report.invalid_lines else 'it is empty'})")
    unused = sorted(limits.models() - {m.model for m in report.models})
    if unused:  # as submit refuses it: a typo in a model's name
        fail(f"{jobs}: no job uses {', '.join(map(repr, unused))}, so its limit would never apply; the file's "
             f"models are {', '.join(repr(m.model) for m in report.models)} (check the name in --rpm/--tpm "
             f"MODEL=N)")  # about the file, as run and submit say it: exit 1
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    shown = report.errors[:20]
    for err in shown:
        click.echo(f"skipped: {err}", err=True)
    if report.invalid_lines > len(shown):
        click.echo(f"skipped: ... and {report.invalid_lines - len(shown):,} more invalid lines", err=True)
    click.echo(render_text(report))


def _add_mock_server() -> None:
    from batchrun.mock.server import mock_server_command

    main.add_command(mock_server_command)


_add_mock_server()
