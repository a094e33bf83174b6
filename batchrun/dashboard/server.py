"""Serving the dashboard: the bind address checked against the token rule, then the app run
until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import ipaddress
import signal

from aiohttp import web

from batchrun.dashboard.app import create_app
from batchrun.dashboard.snapshot import Dashboard
from batchrun.state.store import BatchStore

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MIN_TOKEN_CHARS = 16


class DashboardSetupError(ValueError):
    """The options cannot make a safe dashboard: the message says which and why."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_setup(host: str, token: str | None) -> None:
    """Raises DashboardSetupError when binding to ``host`` with ``token`` would be unsafe."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise DashboardSetupError(f"--token must be at least {MIN_TOKEN_CHARS} characters long (a random one: "
                                  "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")
    if token is None and not is_loopback(host):
        raise DashboardSetupError(f"--host {host} lets other machines reach the dashboard: give a --token too "
                                  "(or keep the default --host 127.0.0.1)")


async def serve(store: BatchStore, host: str, port: int, *, token: str | None = None,
                allow_actions: bool = False, on_ready=None) -> None:
    """Run the dashboard until SIGINT/SIGTERM; ``on_ready(port)`` is called once it listens."""
    check_setup(host, token)
    app = create_app(Dashboard(store, allow_actions=allow_actions), token)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        if on_ready:
            on_ready(runner.addresses[0][1])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
