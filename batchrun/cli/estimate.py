"""`estimate`: a file's tokens, cost range and shortest time, with nothing sent."""

from __future__ import annotations

import json

import click

from batchrun.cli.helpers import fail
from batchrun.cli.options import redis_option
from batchrun.settings import VIAS, Limits


@click.command()
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
@click.option("--via", type=click.Choice(VIAS), default="live", show_default=True,
              help="batch-api: also the cost through OpenAI's Batch API (half price, done within 24 hours).")
@redis_option
@click.option("--no-cache", is_flag=True, help="Do not look in the response cache for lines it would serve.")
def estimate(jobs, rpm, tpm, typical_output, prices_path, endpoint, as_json, via, redis_url, no_cache):
    """Count JOBS' tokens; show its cost range and the shortest time your limits allow.

    Nothing is sent and no Redis is needed. Invalid lines are listed and skipped.
    """
    from batchrun.cli.estimate_text import batch_api_costs, render_text
    from batchrun.ops.cache import estimate_coverage
    from batchrun.ops.estimate import estimate_file
    from batchrun.settings import WorkerSettings
    from batchrun.policy.pricing import PriceTable

    try:
        limits = Limits.parse(rpm, tpm)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        prices = PriceTable.load(prices_path)
        coverage = None if no_cache else estimate_coverage(redis_url, WorkerSettings.from_env().base_url, prices)
        report = estimate_file(jobs, endpoint=endpoint, limits=limits, typical_output=typical_output, prices=prices,
                               coverage=coverage)
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
        data = {**report.to_dict(), "cache": coverage.to_dict() if coverage else None}
        if via == "batch-api":
            data["batch_api"] = batch_api_costs(report)
        click.echo(json.dumps(data))
        return
    shown = report.errors[:20]
    for err in shown:
        click.echo(f"skipped: {err}", err=True)
    if report.invalid_lines > len(shown):
        click.echo(f"skipped: ... and {report.invalid_lines - len(shown):,} more invalid lines", err=True)
    click.echo(render_text(report, via))
    for line in coverage.lines() if coverage else []:
        click.echo(line)
