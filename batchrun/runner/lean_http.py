"""The lean HTTP path under the official AsyncOpenAI client: the hot path of every worker.

Thousands of requests a second go through one process, so the SDK's per-request work is
trimmed where it repeats itself, while every request still goes through
``AsyncOpenAI.request``: its headers and auth, its error mapping (``APIStatusError`` and
subclasses with ``.status_code``, ``.response`` and ``.body``, ``APIConnectionError``,
``APITimeoutError``) and its stream class.

* ``LeanAsyncOpenAI._build_request``: the first plain JSON POST to a path is built by the SDK
  itself; later ones reuse its URL, headers and timeouts (they do not change from one request
  to the next) with only the body serialised. Anything else (query parameters, extra headers,
  files, retries) takes the SDK's own path.
* The HTTP client is an ``httpx2.AsyncClient`` over aiohttp (the SDK's own
  ``DefaultAioHttpClient`` idea, with a leaner transport): httpx2's default connection pool
  scans every pooled connection on each request, which at 200+ connections cost more than the
  request itself. ``LeanHttpClient.send`` goes straight to the transport for a request that
  needs no auth flow, and lets httpx2 handle the rest (redirects included).

The SDK internals this leans on are named in ``openai_private``; tests/test_sdk_contract.py
checks that the requests sent are the SDK's own.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import time
from typing import Any

import aiohttp
import httpx2
from openai import AsyncOpenAI, NotGiven
from yarl import URL

from batchrun.runner.openai_private import FinalRequestOptions, openapi_dumps


class LeanAsyncOpenAI(AsyncOpenAI):
    """AsyncOpenAI whose plain JSON POSTs reuse the URL, headers and timeouts the SDK built for the
    first request to the same path. The result is the request the SDK would build: same URL, same
    headers in the same order, same timeouts, same body bytes (``openapi_dumps``).

    Only while nothing a request's headers depend on can differ: no idempotency header (OpenAI's
    client has none), the same auth (``security``) and no per-request options; an auth provider
    that sets headers per request takes the SDK's own path."""

    def _idempotency_key(self) -> str:
        # The SDK makes one per request (uuid4, ~2 µs); the same shape from a pool of random bytes.
        return f"stainless-python-retry-{_random_uuid()}"

    @property
    def user_agent(self) -> str:
        return f"{AsyncOpenAI.__name__}/Python {self._version}"  # the SDK's, not this subclass's name

    def _build_request(self, options: FinalRequestOptions, *, retries_taken: int = 0) -> httpx2.Request:
        if not (retries_taken == 0 and self._idempotency_header is None and _plain_post(options)):
            return super()._build_request(options, retries_taken=retries_taken)
        templates = self.__dict__.setdefault("_batchrun_requests", {})
        template = templates.get(options.url)
        if template is None or template[0] != options.security or template[1] != self.api_key:
            request = super()._build_request(options, retries_taken=retries_taken)
            if request.headers.get("content-length") is None or "transfer-encoding" in request.headers:
                return request  # not a plain body after all: no template
            headers = httpx2.Headers([(k, v) for k, v in request.headers.raw if k.lower() != b"content-length"])
            templates[options.url] = (dict(options.security), self.api_key, request.url, headers,
                                      headers.encoding, request.extensions)
            return request
        _, _, url, headers, encoding, extensions = template
        content = openapi_dumps(options.json_data)
        # stream= rather than content=: the headers are complete already (httpx2 would otherwise
        # look each default header up again); Content-Length goes last, where httpx2 puts it.
        request = httpx2.Request("POST", url, headers=headers, stream=httpx2.ByteStream(content),
                                 extensions=extensions)
        request.headers.encoding = encoding
        request.headers["Content-Length"] = str(len(content))
        request.read()
        return request


_uuid_pool: list[str] = []
os.register_at_fork(after_in_child=_uuid_pool.clear)  # a forked worker draws its own


def _random_uuid() -> str:
    """A random (version 4) UUID string, from os.urandom drawn 256 at a time."""
    if not _uuid_pool:
        block = bytearray(os.urandom(16 * 256))
        for i in range(0, len(block), 16):
            block[i + 6] = (block[i + 6] & 0x0F) | 0x40  # version 4
            block[i + 8] = (block[i + 8] & 0x3F) | 0x80  # RFC 4122 variant
            h = block[i:i + 16].hex()
            _uuid_pool.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return _uuid_pool.pop()


def _plain_post(options: FinalRequestOptions) -> bool:
    """A POST of a JSON object and nothing else (no per-request headers, query, files or timeout)."""
    return (options.method == "post" and type(options.json_data) is dict and options.files is None
            and options.content is None and options.extra_json is None and not options.params
            and isinstance(options.headers, NotGiven) and isinstance(options.timeout, NotGiven)
            and options.follow_redirects is None)


class LeanHttpClient(httpx2.AsyncClient):
    """An ``httpx2.AsyncClient`` over aiohttp whose ``send`` skips httpx2's auth and redirect
    machinery when there is nothing for it to do (no auth, no redirect); otherwise it is httpx2's.
    Cookies are kept by the aiohttp session, as a browser-like client would."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("transport", AiohttpTransport())
        super().__init__(**kwargs)
        self._lean_transport = kwargs["transport"]

    async def send(self, request: httpx2.Request, *, stream: bool = False, auth: Any = httpx2.USE_CLIENT_DEFAULT,
                   follow_redirects: Any = httpx2.USE_CLIENT_DEFAULT) -> httpx2.Response:
        # Credentials in the URL (https://user:token@gateway/v1) go through httpx2's auth, which
        # sends them as Basic auth in place of the API key's header, as the SDK's own client does.
        if auth is not httpx2.USE_CLIENT_DEFAULT or self.auth is not None or self.is_closed \
                or request.url.userinfo or self._transport_for_url(request.url) is not self._lean_transport:
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        started = time.perf_counter()
        response = await self._lean_transport.handle_async_request(request)
        response.request = request
        follow = self.follow_redirects if follow_redirects is httpx2.USE_CLIENT_DEFAULT else follow_redirects
        if follow and response.has_redirect_location:
            # Rare (a base URL behind a redirect): httpx2 follows it from here, as it would have (a
            # 3xx without a Location is an answer like any other, for the SDK to raise).
            next_request = self._build_redirect_request(request, response)
            await response.aclose()
            return await super().send(next_request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        response.default_encoding = self._default_encoding
        try:
            if not stream:
                await response.aread()
                response.elapsed = datetime.timedelta(seconds=time.perf_counter() - started)
            return response
        except BaseException:
            await response.aclose()
            raise


# aiohttp errors as the httpx2 errors the SDK turns into APITimeoutError / APIConnectionError.
def _map_error(exc: BaseException, request: httpx2.Request) -> BaseException:
    if isinstance(exc, (aiohttp.ConnectionTimeoutError,)):
        return httpx2.ConnectTimeout(str(exc) or "connect timeout", request=request)
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return httpx2.ReadTimeout(str(exc) or "read timeout", request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx2.ConnectError(str(exc), request=request)
    if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return httpx2.ReadError(str(exc) or type(exc).__name__, request=request)
    if isinstance(exc, aiohttp.ClientError):
        return httpx2.RemoteProtocolError(str(exc) or type(exc).__name__, request=request)
    return exc


# Failures to open a connection (refused, DNS, TLS handshake, connect timeout): nothing was sent.
_NOT_CONNECTED = (httpx2.ConnectError, httpx2.ConnectTimeout, aiohttp.ClientConnectorError,
                  aiohttp.ConnectionTimeoutError, ConnectionRefusedError, socket.gaierror)
_TRANSPORT = (httpx2.TransportError, aiohttp.ClientError, OSError)


def may_have_reached_server(exc: BaseException) -> bool:
    """Could the request that raised ``exc`` have been received (and billed) by the server?

    False only when the first transport error in the exception chain (the SDK's
    APIConnectionError wraps httpx2's, which wraps aiohttp's) is a failure to connect; any other
    error (a reset, a read timeout, a broken stream, an unknown exception) may have come after the
    request went out."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, _NOT_CONNECTED):
            return False
        if isinstance(exc, _TRANSPORT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return True


MAX_BODY_BYTES = 256 << 20  # an answer's body at most (a result must fit in one Redis value)


class _AiohttpStream(httpx2.AsyncByteStream):
    __slots__ = ("_response", "_request", "_transport")

    def __init__(self, response: aiohttp.ClientResponse, request: httpx2.Request, transport: "AiohttpTransport"):
        self._response = response
        self._request = request
        self._transport = transport

    async def __aiter__(self):
        size = 0
        try:
            async for chunk in self._response.content.iter_any():
                size += len(chunk)
                if size > MAX_BODY_BYTES:  # a stream that never ends must not fill the memory
                    raise httpx2.ReadError(f"the answer is larger than {MAX_BODY_BYTES >> 20} MB, "
                                           f"batchrun's bound", request=self._request)
                self._transport.heard_at = time.monotonic()
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _map_error(exc, self._request) from exc

    async def aclose(self) -> None:
        self._response.release()


_timeout_scope = getattr(asyncio, "timeout", None)


def _env_proxy(url: URL) -> tuple:
    """(proxy URL, auth) the environment gives for ``url``, or (None, None). aiohttp's trust_env
    would look this up on every request."""
    from aiohttp.helpers import get_env_proxy_for_url

    try:
        return get_env_proxy_for_url(url)
    except LookupError:
        return None, None


class AiohttpTransport(httpx2.AsyncBaseTransport):
    """httpx2 requests sent with one aiohttp session (keep-alive pool, C HTTP parser).

    The body is passed as bytes; content decoding (gzip) is left to httpx2, as with its own
    transport, so a response reads the same either way."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}
        self._proxies: dict[str, tuple] = {}  # HTTP(S)_PROXY / NO_PROXY, read once per URL (as httpx2 does)
        self._timeouts: dict[tuple, aiohttp.ClientTimeout] = {}
        self.heard_at = 0.0  # time.monotonic() when the server last sent anything (a head, body bytes)

    def _open(self) -> aiohttp.ClientSession:
        # No connection limit of its own: the runner bounds the requests in flight.
        # The same CA store as the SDK's own transport.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ssl=httpx2.create_ssl_context())
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              skip_auto_headers=("User-Agent",))
        return self._session

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        session = self._session or self._open()
        raw_url = str(request.url)
        url = self._urls.get(raw_url)
        if url is None:
            if len(self._urls) > 100:
                self._urls.clear()
                self._proxies.clear()
            url = URL(raw_url, encoded=True)
            if url.raw_user is not None or url.raw_password is not None:
                url = url.with_user(None)  # already in the Authorization header; aiohttp refuses both
            self._urls[raw_url] = url
            self._proxies[raw_url] = _env_proxy(url)
        proxy, proxy_auth = self._proxies[raw_url]
        t = request.extensions.get("timeout") or {}
        key = (t.get("connect"), t.get("read"), t.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(sock_connect=key[0], sock_read=key[1],
                                                                  connect=key[2])
        try:
            data = request.content
        except httpx2.RequestNotRead:
            data = await request.aread()
        # aiohttp has no write timeout: bound sending the body and getting the answer's head by
        # the sum of the phases' timeouts, so a server that never reads the body cannot hang us.
        phases = [v for v in (t.get("connect"), t.get("write"), t.get("read"), t.get("pool")) if v is not None]
        sending = session._request(request.method, url, headers=request.headers.multi_items(), data=data or None,
                                   allow_redirects=False, timeout=timeout, compress=False, proxy=proxy,
                                   proxy_auth=proxy_auth)
        try:
            if not phases:
                response = await sending
            elif _timeout_scope is not None:  # Python 3.11+: no extra task per request
                async with _timeout_scope(sum(phases)):
                    response = await sending
            else:
                response = await asyncio.wait_for(sending, sum(phases))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _map_error(exc, request) from exc
        self.heard_at = time.monotonic()
        return httpx2.Response(response.status, headers=response.raw_headers,
                               stream=_AiohttpStream(response, request, self), request=request,
                               extensions={"http_version": b"HTTP/1.1",
                                           "reason_phrase": (response.reason or "").encode()})

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def heard_at(client: AsyncOpenAI) -> float:
    """time.monotonic() when the client's server last sent anything back (0.0: not yet, or not known)."""
    return getattr(getattr(client._client, "_lean_transport", None), "heard_at", 0.0)
