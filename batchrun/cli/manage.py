"""Managing batches and budgets a Redis keeps: `cancel`, `purge`, `limits`."""

from __future__ import annotations

import json

import click

from batchrun.remote.start import cancel_upstream
from batchrun.cli.helpers import fail, open_store
from batchrun.cli.options import redis_option
from batchrun.state.jobcounts import jobs_left
from batchrun.state.states import BatchState


@click.command()
@click.argument("batch_id")
@redis_option
def cancel(batch_id, redis_url):
    """Stop sending BATCH_ID's requests; what is done stays collectable."""
    store, _ = open_store(redis_url)
    if not store.exists(batch_id):
        fail(f"no batch {batch_id!r} in this Redis")
    store.set_state(batch_id, BatchState.CANCELLED, "cancelled by the user")
    click.echo(f"batch {batch_id} cancelled; in-flight requests finish, nothing new is sent")
    remote = cancel_upstream(store, batch_id)  # --via batch-api: a worker cancels them upstream
    if remote:
        click.echo(f"{remote} remote batch(es) at the Batch API are being cancelled by a worker; what they had "
                   f"finished is recorded (see `batchrun status {batch_id}`)")


@click.command()
@click.argument("batch_id")
@redis_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def purge(batch_id, redis_url, yes):
    """Remove BATCH_ID and everything it keeps in Redis (collect its results first)."""
    store, _ = open_store(redis_url)
    meta = store.meta(batch_id)
    if not meta:
        fail(f"no batch {batch_id!r} in this Redis")
    pending = jobs_left(meta)
    if not yes:
        what = f"batch {batch_id} ({meta.get('state')}, {meta.get('done', 0)} results, {meta.get('failed', 0)} errors" \
               + (f", {pending} jobs not done" if pending else "") + ")"
        if not click.confirm(f"Remove {what} from Redis? Results not collected yet are lost", default=False):
            fail("nothing removed")
    n = store.purge(batch_id)
    click.echo(f"batch {batch_id} purged ({n} keys removed)")


@click.command()
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
