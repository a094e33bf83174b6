"""The dashboard's web app (aiohttp): one page, the JSON it polls, /metrics, and the actions.

Every read goes through one ``Dashboard`` (snapshot.py) on a thread, at most once per
REFRESH_SECONDS whatever the number of open pages: what they are sent is that snapshot. With a
token, every route wants it (``Authorization: Bearer T``, or ``?token=T`` for the page's own
address), compared in constant time. Without one the server listens on a loopback address only
(server.py checks) and answers only requests addressed to one, so a web page on another site
cannot read it through a rebound DNS name. Actions are POSTs carrying the batch id again
(the confirmation the page asks for) in a header no other site can set without CORS.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from importlib import resources

import redis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from batchrun.dashboard.actions import Action, ActionRefused, act
from batchrun.dashboard.prometheus import fleet_registry
from batchrun.dashboard.snapshot import Dashboard
from batchrun.state.keys import BATCH_ID_RE

log = logging.getLogger("batchrun")

REFRESH_SECONDS = 1.0  # snapshots at most this often (the page polls every 2 s)
CONFIRM_HEADER = "X-Batchrun-Confirm"  # an action names its batch again here
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


class Snapshots:
    """The latest snapshot of each kind, refreshed on demand at most every REFRESH_SECONDS."""

    def __init__(self, dashboard: Dashboard):
        self.dashboard = dashboard
        self._lock = asyncio.Lock()
        self._cache: dict[str, tuple[float, object]] = {}

    async def get(self, name: str, make) -> object:
        async with self._lock:  # one refresh at a time: the Dashboard's caches are not thread-safe
            at, value = self._cache.get(name, (0.0, None))
            if value is None or time.monotonic() - at >= REFRESH_SECONDS:
                try:
                    value = await asyncio.to_thread(make)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    # kept too: the requests queued behind a refresh that waited out a hung Redis
                    # fail with it at once, instead of each waiting its own socket timeout in turn
                    value = exc
                self._cache[name] = (time.monotonic(), value)
                if len(self._cache) > 100:  # batch pages viewed long ago
                    self._cache = {name: self._cache[name]}
            if isinstance(value, BaseException):
                raise value
            return value


def _authorized(request: web.Request, token: str | None) -> bool:
    if token is None:
        return _host_name(request.host or "") in LOOPBACK_HOSTS
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    given = value if scheme.lower() == "bearer" else request.query.get("token", "")  # (RFC 7235: any case)
    # surrogateescape: a header of bytes that are not UTF-8 is a wrong token, not an exception
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape"))


def _host_name(host: str) -> str:
    """A Host header without its port ('[::1]:8765' -> '[::1]', 'localhost:80' -> 'localhost')."""
    return host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]


def _auth_middleware(token: str | None):
    @web.middleware
    async def check(request: web.Request, handler):
        if not _authorized(request, token):
            if token is None:
                raise web.HTTPForbidden(text="this dashboard answers only on a loopback address (127.0.0.1, "
                                             "localhost); start it with --token to reach it from elsewhere\n")
            raise web.HTTPUnauthorized(text="this dashboard needs its token: open it as /?token=TOKEN, or send "
                                            "'Authorization: Bearer TOKEN'\n", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


def _redis_middleware():
    """A Redis that is down or too slow answers 503 with a sentence (the page shows it and polls on),
    said once in the dashboard's log until Redis answers again, never as a traceback."""
    down = False

    @web.middleware
    async def check(request: web.Request, handler):
        nonlocal down
        try:
            response = await handler(request)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            text = redis_trouble(exc)
            if not down:
                log.warning("%s", text)
            down = True
            raise web.HTTPServiceUnavailable(text=text + "\n") from None
        down = False
        return response

    return check


def redis_trouble(exc: BaseException) -> str:
    return (f"cannot read Redis ({exc}); check that the server runs and --redis-url: the page tries again "
            "every few seconds")


def _json(data: object) -> web.Response:
    return web.Response(text=json.dumps(data), content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _batch_id(request: web.Request) -> str:
    batch_id = request.match_info["batch_id"]
    if not BATCH_ID_RE.match(batch_id):
        raise web.HTTPBadRequest(text=f"{batch_id[:130]!r} is not a batch id\n")
    return batch_id


async def page(request: web.Request) -> web.Response:
    html = resources.files("batchrun.dashboard").joinpath("page.html").read_text()
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})


async def overview(request: web.Request) -> web.Response:
    snapshots: Snapshots = request.app[SNAPSHOTS]
    return _json(await snapshots.get("overview", snapshots.dashboard.overview))


async def batch(request: web.Request) -> web.Response:
    snapshots: Snapshots = request.app[SNAPSHOTS]
    batch_id = _batch_id(request)
    try:
        data = await snapshots.get(f"batch:{batch_id}", lambda: snapshots.dashboard.batch_page(batch_id))
    except LookupError as exc:
        raise web.HTTPNotFound(text=f"{exc}\n")
    return _json(data)


async def action(request: web.Request) -> web.Response:
    snapshots: Snapshots = request.app[SNAPSHOTS]
    if not snapshots.dashboard.allow_actions:
        raise web.HTTPForbidden(text="actions are off: start the dashboard with --allow-actions to pause, "
                                     "resume or cancel batches from it\n")
    batch_id = _batch_id(request)
    what = Action.parse(request.match_info["action"])
    if what is None:
        raise web.HTTPNotFound(text="the actions are pause, resume and cancel\n")
    if request.headers.get(CONFIRM_HEADER) != batch_id:
        raise web.HTTPBadRequest(text=f"not confirmed: send the batch id again in the {CONFIRM_HEADER} header\n")
    try:
        message = await asyncio.to_thread(act, snapshots.dashboard.store, batch_id, what)
    except LookupError as exc:
        raise web.HTTPNotFound(text=f"{exc}\n")
    except ActionRefused as exc:
        raise web.HTTPConflict(text=f"{exc}\n")
    snapshots._cache.clear()  # the next poll shows the change
    return _json({"ok": True, "message": message})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    body = await asyncio.to_thread(generate_latest, registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


SNAPSHOTS = web.AppKey("snapshots", Snapshots)
REGISTRY = web.AppKey("registry", object)


def create_app(dashboard: Dashboard, token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[_auth_middleware(token), _redis_middleware()])
    app[SNAPSHOTS] = Snapshots(dashboard)
    app[REGISTRY] = fleet_registry(dashboard.store)
    app.router.add_get("/", page)
    app.router.add_get("/batch/{batch_id}", page)
    app.router.add_get("/api/overview", overview)
    app.router.add_get("/api/batch/{batch_id}", batch)
    app.router.add_post("/api/batch/{batch_id}/{action}", action)
    app.router.add_get("/metrics", metrics)
    return app
