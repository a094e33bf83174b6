"""What every command does the same way: fail with one sentence, open the shared Redis."""

from __future__ import annotations

import sys

import click

from batchrun.settings import WorkerSettings
from batchrun.state.connections import ENV_URL, connect, is_memory, resolve_url
from batchrun.state.store import BatchStore
from batchrun.ops.hints import RedisSource


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


def source_of(ctx, param: str = "redis_url") -> RedisSource:
    """How the user gave ``--redis-url`` to this click command."""
    from click.core import ParameterSource

    found = ctx.get_parameter_source(param)
    if found is ParameterSource.ENVIRONMENT:
        return RedisSource.ENVIRONMENT
    if found is ParameterSource.DEFAULT_MAP:
        return RedisSource.CONFIG
    return RedisSource.COMMAND_LINE
