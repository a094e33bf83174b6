"""Options several commands share, their types, and the checks of what the user gave."""

from __future__ import annotations

import math
import time

import click

from batchrun.settings import MAX_CACHE_MB, MAX_KEEP_DAYS, MAX_SHARD_SIZE, VIAS, BatchOptions, Limits
from batchrun.state.cache import DEFAULT_MAX_MB
from batchrun.state.connections import ENV_URL, check_url
from batchrun.state.store import BatchStore


def _check_redis_url(ctx, param, value):
    problem = check_url(value) if value else None
    if problem:
        raise click.BadParameter(problem, ctx=ctx, param=param)
    return value


class Number(click.FloatRange):
    """A FloatRange that also refuses NaN and the infinities (which pass its range checks)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


redis_option = click.option("--redis-url", envvar=ENV_URL, default=None, callback=_check_redis_url,
                            help=f"Redis that keeps the batches (env {ENV_URL}); `run` without one uses an "
                                 "in-process Redis.")


class Duration(click.ParamType):
    """A duration: seconds, or a number with s, m, h or d (90s, 45m, 6h, 2d)."""

    name = "duration"
    UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        unit = self.UNITS.get(text[-1:], None)
        number = text[:-1] if unit else text
        try:
            seconds = float(number) * (unit or 1)
        except ValueError:
            self.fail(f"{value!r} is not a duration; give seconds or a number with s, m, h or d (6h)", param, ctx)
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(f"{value!r} must be a duration above 0", param, ctx)
        return seconds


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
        click.option("--priority", default="normal", show_default=True, metavar="high|normal|low|WEIGHT",
                     help="The batch's share of a fleet and a budget shared with other batches: high (weight 4), "
                          "normal (1), low (only what the others leave) or a weight; `batchrun priority` changes it."),
        click.option("--via", type=click.Choice(VIAS), default="live", show_default=True,
                     help="How the jobs are sent: live requests, or OpenAI's Batch API (/v1/batches: half "
                          "price, done within 24 hours)."),
        click.option("--resend-via", type=click.Choice(("live", "batch-api")), default="live", show_default=True,
                     help="With --via batch-api: where lines a remote batch expired or failed are sent "
                          "again (one attempt each)."),
        click.option("--deadline", type=Duration(), default=None, metavar="DURATION",
                     help="With --via auto: the batch should end within this (90s, 45m, 6h, 2d); what the "
                          "budget cannot send live by then goes through the Batch API."),
        click.option("--no-cache", is_flag=True,
                     help="Send every request, even one the response cache holds or another line repeats."),
        click.option("--refresh", is_flag=True,
                     help="Send again what the response cache holds, and store the new answers."),
        click.option("--cache-ttl", type=Number(0, MAX_KEEP_DAYS), default=0.0, metavar="DAYS",
                     help="Days a stored answer serves later runs (default: --keep-days)."),
        click.option("--cache-max-mb", type=Number(0, MAX_CACHE_MB, min_open=True), default=DEFAULT_MAX_MB,
                     show_default=True, metavar="MB",
                     help="Size bound of the response cache (compressed); the answers nearest their expiry go first."),
        click.option("--batch-id", default=None, help="Name the batch (default: a new id)."),
        click.option("--endpoint", default="/v1/chat/completions", show_default=True,
                     help="URL for lines that are bare request bodies."),
        click.option("--skip-invalid", is_flag=True, help="Submit the valid lines of a file that has invalid ones."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def make_options(rpm, tpm, max_attempts, backoff_base, backoff_cap, shard_size, burst_seconds, max_cost,
                 keep_days, give_up_after=300.0, priority="normal", via="live", resend_via="live",
                 deadline=None, no_cache=False, refresh=False, cache_ttl=0.0, cache_max_mb=DEFAULT_MAX_MB) -> BatchOptions:
    try:
        limits = Limits.parse(rpm, tpm)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    check_finite("--max-cost", max_cost)
    options = BatchOptions(max_attempts=max_attempts, backoff_base=backoff_base, backoff_cap=backoff_cap,
                           shard_size=shard_size, burst_seconds=burst_seconds, max_cost=max_cost, keep_days=keep_days,
                           give_up_seconds=give_up_after, limits=limits, priority=priority or "normal", via=via,
                           resend_via=resend_via, deadline_seconds=deadline or 0.0, cache=0 if no_cache else 1,
                           cache_refresh=time.time() if refresh else 0.0, cache_ttl_days=cache_ttl, cache_max_mb=cache_max_mb)
    if no_cache and refresh:
        raise click.UsageError("--refresh stores new answers in the response cache, which --no-cache bypasses: "
                               "give one of them")
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
    for option, name in (("--via", "via"), ("--resend-via", "resend_via")):
        if name in given and getattr(options, name) != getattr(stored, name):
            changed.append(f"{option} {getattr(options, name)} (it has {getattr(stored, name)})")
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


def check_finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{name} must be a number of dollars, not {value}")


# `run` and `worker`: the one place its words live.
request_timeout_option = click.option(
    "--request-timeout", type=Number(0, min_open=True), default=None,
    help="Seconds one request may take, its answer or stream included (default 600; or BATCHRUN_REQUEST_TIMEOUT).")
