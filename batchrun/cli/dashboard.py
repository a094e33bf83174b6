"""`dashboard`: the fleet in a web page, and /metrics for Prometheus."""

from __future__ import annotations

import asyncio
import errno

import click

from batchrun.cli.helpers import fail, open_store
from batchrun.cli.options import redis_option
from batchrun.state.connections import describe


@click.command()
@redis_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; any but a loopback one needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free one).")
@click.option("--token", default=None, metavar="TOKEN",
              help="Every request must carry it (Authorization: Bearer TOKEN, or ?token=TOKEN); env "
                   "BATCHRUN_DASHBOARD_TOKEN keeps it out of the process list.")
@click.option("--allow-actions", is_flag=True, help="Offer pause, resume and cancel on the page (each confirmed).")
def dashboard(redis_url, host, port, token, allow_actions):
    """Serve a live web page of the batches, budgets, workers and errors this Redis holds, and
    /metrics (Prometheus). It only reads Redis: workers do no extra work for it."""
    from batchrun.dashboard.server import DashboardSetupError, check_setup, serve

    try:
        check_setup(host, token)
    except DashboardSetupError as exc:
        raise click.UsageError(str(exc)) from None
    store, url = open_store(redis_url)
    store.redis.ping()  # an unreachable Redis is said now, in the group's words, not at the first page

    def ready(bound: int) -> None:
        where = f"[{host}]" if ":" in host else host
        page = f"http://{where}:{bound}/" + ("?token=…" if token else "")
        click.echo(f"dashboard of {describe(url)} on {page} (metrics at /metrics"
                   + ("; actions on" if allow_actions else "") + "); Ctrl-C stops it", err=True)

    try:
        asyncio.run(serve(store, host, port, token=token, allow_actions=allow_actions, on_ready=ready))
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            fail(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host", 2)
        raise
