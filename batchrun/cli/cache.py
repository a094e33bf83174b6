"""`batchrun cache stats` and `batchrun cache clear [--older-than DAYS]`."""

from __future__ import annotations

import click

from batchrun.cli.options import Number, redis_option


@click.group("cache")
def cache_group() -> None:
    """The response cache: answers kept so that an identical request is not sent (and paid) again.

    With a Redis configured (--redis-url or BATCHRUN_REDIS_URL) it is that Redis's; without one,
    the file under BATCHRUN_CACHE_DIR (default $XDG_CACHE_HOME/batchrun or ~/.cache/batchrun).
    """


@cache_group.command("stats")
@redis_option
def stats(redis_url) -> None:
    """How many answers the cache holds, how big, how old."""
    from batchrun.ops.cache import describe_stats, storage_for

    for line in describe_stats(storage_for(redis_url).stats()):
        click.echo(line)


@cache_group.command("clear")
@redis_option
@click.option("--older-than", type=Number(0), default=None, metavar="DAYS",
              help="Remove only the answers stored more than DAYS days ago (fractions allowed: 0.5).")
def clear(redis_url, older_than) -> None:
    """Remove the cache's answers (all, or those older than --older-than)."""
    from batchrun.ops.cache import storage_for

    storage = storage_for(redis_url)
    removed = storage.clear(None if older_than is None else older_than * 86400)
    what = f" stored more than {older_than:g} day(s) ago" if older_than is not None else ""
    click.echo(f"removed {removed:,} answer{'s' if removed != 1 else ''}{what} from the response cache "
               f"({storage.where})")
