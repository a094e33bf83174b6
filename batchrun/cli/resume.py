"""`resume`: continue a batch in Redis (a new cap, new prices), or a jobs file's run from its outputs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from batchrun.cli.helpers import fail, open_store, source_of
from batchrun.cli.options import Number, check_finite, redis_option
from batchrun.ops import hints
from batchrun.settings import MAX_CONCURRENCY
from batchrun.text import format_usd
from batchrun.state.states import BatchState


@click.command()
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
    check_finite("--max-cost", max_cost)
    if not Path(target).is_file() and (output or target.endswith(".jsonl") or os.sep in target or "/" in target):
        # meant as a JOBS file (a batch id has no path in it), so the Redis is not the question
        what = "is a directory, not a jobs file" if Path(target).is_dir() else "no such file"
        fail(f"{target}: {what}; `resume JOBS.jsonl -o OUT` needs the jobs file of the first run "
             f"(a BATCH_ID takes no -o)", 2)
    if Path(target).is_file():
        if not output:
            fail("resume JOBS.jsonl needs -o RESULTS.jsonl: the results file to complete")
        _resume_files(ctx, target, output, errors, given, max_cost=max_cost, prices=prices, mock=mock,
                      concurrency=concurrency, grace=grace, retry_failed=retry_failed, redis_url=redis_url)
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value not in (None, (), False)]
    if named:
        fail(f"{', '.join(named)} apply to `resume JOBS -o OUT` only; a batch in Redis keeps the options it "
             f"was submitted with")
    _resume_batch(ctx, target, redis_url, max_cost, prices)


def _resume_files(ctx, jobs: str, output: str, errors: str | None, given: dict, *, redis_url: str | None,
                  **kw) -> None:
    """`resume JOBS -o OUT`: a new batch of the jobs OUT lacks, with the first run's settings; exits."""
    from batchrun.files.jobfile import JobFileError
    from batchrun.ops import progress
    from batchrun.cli.run import resume_config, run_batch
    from batchrun.settings import OptionsError
    from batchrun.state.connections import resolve_url

    try:
        cfg, used = resume_config(jobs, output, errors, given, redis_url=resolve_url(redis_url),
                                  redis_source=source_of(ctx), **kw)
    except OptionsError as exc:
        fail(str(exc), 2)
    except ValueError as exc:
        fail(str(exc))
    if used:
        progress.note(f"resuming with the first run's settings: {used}")  # -q hides it
    try:
        sys.exit(run_batch(cfg))
    except (JobFileError, ValueError) as exc:
        fail(str(exc))


def _resume_batch(ctx, batch_id: str, redis_url: str | None, max_cost: float | None, prices: str | None) -> None:
    """`resume BATCH_ID`: its work queued again, with a new cap or price file if given."""
    from batchrun.ops.resume import CapTooLow, merged_prices, paused_at_cap, set_cap
    from batchrun.remote.start import enqueue_remote, sends_remote

    store, url = open_store(redis_url)
    if not store.exists(batch_id):
        fail(f"no batch {batch_id!r} in this Redis, and no file of that name")
    meta = store.meta(batch_id)
    if meta.get("state") == BatchState.CANCELLED:
        fail(f"batch {batch_id} was cancelled")
    if max_cost is None and paused_at_cap(meta):
        where = hints.RedisRef.of(url, source_of(ctx))
        fail(f"batch {batch_id} is paused at its spending cap; resume it with a higher one: "
             + hints.command(hints.resume_batch(batch_id, where, ["--max-cost", "USD"]))
             + (f" {where.note()}" if where.note() else ""))
    if max_cost is not None:
        try:
            set_cap(store, batch_id, max_cost)
        except CapTooLow as exc:
            fail(f"{exc} (give more, or 0 for no cap)")
        click.echo(f"batch {batch_id}: spending cap now " + (format_usd(max_cost) if max_cost else "none"))
    if prices:
        try:
            table = merged_prices(meta.get("prices"), prices)
        except ValueError as exc:
            fail(str(exc))
        store.set_prices(batch_id, table.to_json())
        click.echo(f"batch {batch_id}: prices from {prices} added to its price table")
    n = store.resume(batch_id)
    if sends_remote(store.meta(batch_id)):
        enqueue_remote(store, batch_id)  # its remote batches go on (those the cap held back too)
    click.echo(f"batch {batch_id} is running; {n} shard(s) with work left were queued for the workers")
