"""`submit` (load a file into a shared Redis) and `run` (submit, local workers, collect)."""

from __future__ import annotations

import os
import sys

import click

from batchrun.cli.helpers import fail, open_store, worker_settings
from batchrun.cli.options import (Number, batch_options, make_options, redis_option, refuse_changed_settings,
                                  request_timeout_option)
from batchrun.files.jobfile import JobFileError
from batchrun.settings import MAX_CONCURRENCY
from batchrun.state.connections import ENV_URL, connect, describe, is_memory, resolve_url
from batchrun.state.store import BatchStore


@click.command()
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


@click.command()
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
@request_timeout_option
@click.pass_context
def run(ctx, jobs, output, errors, redis_url, batch_id, endpoint, skip_invalid, concurrency, processes, mock, grace,
        prices, request_timeout, **kw):
    """Submit JOBS, run local workers and collect the results into OUTPUT, with progress.

    Jobs whose custom_id OUTPUT or its errors file already holds are not sent again.
    Exit codes: 0 finished, 3 finished with errors, 4 paused or work left, 130 interrupted,
    1 an error, 2 a usage error.
    """
    from batchrun.cli.helpers import source_of
    from batchrun.cli.run import RunConfig, run_batch

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


def check_run(redis_url, processes, concurrency, grace, batch_id, options) -> None:
    """`run`'s options that cannot work together, refused before anything is written."""
    url = resolve_url(redis_url)
    if processes > 1 and is_memory(url):
        raise click.UsageError(f"--processes {processes} needs a shared Redis (--redis-url or {ENV_URL}): without "
                               f"one, `run` keeps its Redis inside its own process, with one in-process worker")
    worker_settings(concurrency, grace)
    if batch_id and not is_memory(url):
        refuse_changed_settings(BatchStore(connect(url)), batch_id, options, cap_applies=True)
