"""`priority`: change a batch's share of the fleet and of its budgets, running or not."""

from __future__ import annotations

import click

from batchrun.cli.helpers import fail, open_store
from batchrun.cli.options import redis_option


@click.command()
@click.argument("batch_id")
@click.argument("priority", metavar="high|normal|low|WEIGHT")
@redis_option
def priority(batch_id, priority, redis_url):
    """Give BATCH_ID a new priority: high (weight 4), normal (1), low (only what the other batches
    leave) or a weight. Its runners apply it within seconds, to workers and budgets alike."""
    from batchrun.ops.priority import NoSuchBatch, set_priority, when_it_applies

    store, _ = open_store(redis_url)
    try:
        old, new = set_priority(store, batch_id, priority)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="PRIORITY") from None
    except NoSuchBatch as exc:
        fail(str(exc))
    click.echo(f"batch {batch_id}: priority {new.describe()} (was {old.describe()}); {when_it_applies(store, batch_id)}")
