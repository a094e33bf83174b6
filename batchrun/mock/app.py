"""The aiohttp application: routes, and the request handling that ties the other modules together."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import time
from typing import NamedTuple

from aiohttp import web

from batchrun.mock.batches import add_routes as add_batch_routes
from batchrun.mock import responses_api
from batchrun.mock.config import HTTP_FAULTS, MODELS, MockConfig
from batchrun.mock.counting import encoding, measure, output_cap
from batchrun.mock.errors import BAD_JSON, MISSING_KEY, invalid
from batchrun.mock.faults import draw_fault, http_fault_reply
from batchrun.mock.limits import RateLimiter, ceil_ms
from batchrun.mock.replies import (completion_body, embeddings_body, model_object, reply_pieces, request_digest,
                                   usage_body)
from batchrun.mock.stats import Stats
from batchrun.mock.streaming import events_to_send, send_stream, stream_events
from batchrun.mock.validation import validate

MOCK_DIGEST = web.RequestKey("mock_digest", str)  # for the request log
MOCK_WAIT = web.ResponseKey("mock_wait", float)


class MockOpenAI:
    """State and request handlers of one mock server; lives in the event loop's thread."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.limiter = RateLimiter(config)
        self.stats = Stats()
        self.rng = random.Random(config.seed)

    def configure(self, config: MockConfig) -> None:
        if config.seed != self.config.seed:
            self.rng = random.Random(config.seed)
        self.config = self.limiter.config = config

    def reset(self) -> None:
        self.stats = Stats()
        self.limiter.buckets.clear()
        self.rng = random.Random(self.config.seed)

    # responses

    def _headers(self, key: str | None, model: str | None) -> dict[str, str]:
        headers = self.limiter.headers(key, model)
        headers["x-request-id"] = "req_" + os.urandom(16).hex()
        return headers

    def _json(self, status: int, payload: dict, headers: dict[str, str]) -> web.Response:
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
        return web.Response(
            body=json.dumps(payload).encode(),
            status=status,
            headers=headers,
            content_type="application/json",
        )

    def _rate_limited(self, payload: dict, headers: dict[str, str], wait: float | None) -> web.Response:
        if wait is not None and self.config.retry_after_header:
            headers["retry-after-ms"] = str(ceil_ms(wait))
            headers["retry-after"] = str(math.ceil(ceil_ms(wait) / 1000))  # whole seconds
        response = self._json(429, payload, headers)
        response[MOCK_WAIT] = wait  # for the request log
        return response

    # request handling

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every POST /v1/{chat/completions,completions,embeddings} comes through here."""
        if not self.config.log_requests:
            return await self._handle(request)
        arrived = time.time()
        response = await self._handle(request)
        digest = request.get(MOCK_DIGEST)
        self.stats.log.append([arrived, digest, response.status, response.get(MOCK_WAIT)])
        return response

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.stats.requests += 1
        endpoint = request.match_info["endpoint"]
        key = _bearer_key(request)
        if key is None:
            return self._json(401, MISSING_KEY, self._headers(None, None))
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return self._json(400, BAD_JSON, self._headers(None, None))
        if self.config.log_requests:
            request[MOCK_DIGEST] = request_digest(body)
        problem = validate(endpoint, body)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        if problem:
            return self._json(400, problem, self._headers(key, model))

        n = body.get("n") or 1
        prompts, prompt_tokens, charge = measure(endpoint, body, n, self.config)
        refusal = self.limiter.admit(key, model, charge)
        if refusal is not None:
            self.stats.rate_limited["too_large" if refusal.too_large else refusal.kind] += 1
            self.stats.refused()
            wait = None if refusal.too_large else refusal.wait
            return self._rate_limited(refusal.body(model), self._headers(key, model), wait)
        self.stats.admitted(charge)

        stream = bool(body.get("stream")) and endpoint != "embeddings"
        fault = draw_fault(self.rng, self.config.error_rates, stream)
        if fault:
            self.stats.faults[fault] += 1
        if fault in HTTP_FAULTS:
            return self._http_fault(fault, key, model)
        if endpoint == "embeddings":
            payload = embeddings_body(body, prompts, prompt_tokens)
            return self._json(200, payload, self._headers(key, model))
        if endpoint == "responses":
            return await self._responses(request, body, prompt_tokens, stream, fault, key)

        cap = output_cap(body, self.config.default_max_tokens)
        if endpoint == "chat/completions":
            answers = [reply_pieces(endpoint, body, self.config.default_max_tokens)]
        else:  # one answer per prompt
            default = self.config.default_max_tokens
            answers = [reply_pieces(endpoint, {**body, "prompt": p}, default) for p in prompts]
        usage = usage_body(endpoint, prompt_tokens, sum(len(a) for a in answers) * n)
        self.stats.completion_tokens += usage["completion_tokens"]
        if stream:
            return await self._stream(request, endpoint, body, answers, n, cap, usage, fault, key)
        delay = self.config.latency_ms + self.config.latency_per_token_ms * usage["completion_tokens"]
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        payload = completion_body(endpoint, body, answers, n, cap, usage)
        return self._json(200, payload, self._headers(key, model))

    def _http_fault(self, fault: str, key: str, model: str) -> web.Response:
        headers = self._headers(key, model)
        reply = http_fault_reply(fault, model, self.config, self.rng)
        if reply.wait is not None:
            return self._rate_limited(reply.payload, headers, reply.wait)
        return self._json(reply.status, reply.payload, headers)

    async def _stream(
        self,
        request: web.Request,
        endpoint: str,
        body: dict,
        answers: list[list[str]],
        n: int,
        cap: int,
        usage: dict,
        fault: str | None,
        key: str,
    ) -> web.StreamResponse:
        config = self.config
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        events = stream_events(endpoint, body, answers, n, cap, usage, include_usage)
        sent = events_to_send(events, fault)

        # Headers go out with the first token, as OpenAI's do: after the time to first token.
        if config.latency_ms > 0:
            await asyncio.sleep(config.latency_ms / 1000)
        response = web.StreamResponse(status=200, headers=self._headers(key, body["model"]))
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        self.stats.by_status[200] = self.stats.by_status.get(200, 0) + 1
        spread = config.latency_per_token_ms * usage["completion_tokens"] / 1000
        per_event = spread / max(len(events.content), 1)
        await send_stream(request, response, sent, per_event, disconnect=fault == "stream_disconnect")
        return response

    async def _responses(self, request: web.Request, body: dict, prompt_tokens: int, stream: bool,
                         fault: str | None, key: str) -> web.StreamResponse:
        """POST /v1/responses (mock/responses_api.py), plain or streamed."""
        config = self.config
        cap = output_cap(body, config.default_max_tokens)
        pieces = reply_pieces("responses", body, config.default_max_tokens)
        usage = responses_api.usage_body(prompt_tokens, len(pieces))
        self.stats.completion_tokens += len(pieces)
        if config.latency_ms > 0:  # the time to the first token (a plain answer: to the whole answer)
            await asyncio.sleep((config.latency_ms + (0 if stream else config.latency_per_token_ms * len(pieces)))
                                / 1000)
        if not stream:
            return self._json(200, responses_api.response_body(body, pieces, cap, usage), self._headers(key, body["model"]))
        head, content, tail = responses_api.stream_events(body, pieces, cap, usage)
        response = web.StreamResponse(status=200, headers=self._headers(key, body["model"]))
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        self.stats.by_status[200] = self.stats.by_status.get(200, 0) + 1
        per_event = config.latency_per_token_ms / 1000
        await send_stream(request, response, responses_api.events_to_send(head, content, tail, fault), per_event,
                          disconnect=fault == "stream_disconnect")
        return response

    # the other endpoints

    async def models(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        if _bearer_key(request) is None:
            return self._json(401, MISSING_KEY, self._headers(None, None))
        name = request.match_info.get("model")
        if name is not None:
            return self._json(200, model_object(name), self._headers(None, None))
        payload = {"object": "list", "data": [model_object(m) for m in MODELS]}
        return self._json(200, payload, self._headers(None, None))

    async def not_found(self, request: web.Request) -> web.Response:
        self.stats.requests += 1
        payload = invalid(f"Invalid URL ({request.method} {request.path})")
        return self._json(404, payload, self._headers(None, None))

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.snapshot())

    async def post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def post_config(self, request: web.Request) -> web.Response:
        try:
            self.configure(dataclasses.replace(self.config, **await request.json()))
        except (TypeError, ValueError) as exc:
            return web.json_response(invalid(str(exc)), status=400)
        return web.json_response(dataclasses.asdict(self.config))


def _bearer_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, key = auth.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


MOCK_KEY = web.AppKey("mock", MockOpenAI)


def create_app(config: MockConfig) -> web.Application:
    """The aiohttp application of a mock server with ``config``."""
    mock = MockOpenAI(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)  # bulk embedding inputs are large
    app[MOCK_KEY] = mock
    app.router.add_post("/v1/{endpoint:chat/completions|completions|embeddings|responses}", mock.handle)
    app.router.add_get("/v1/models", mock.models)
    app.router.add_get("/v1/models/{model}", mock.models)
    app.router.add_get("/_mock/stats", mock.get_stats)
    app.router.add_post("/_mock/reset", mock.post_reset)
    app.router.add_post("/_mock/config", mock.post_config)
    add_batch_routes(app, lambda: mock.config)  # /v1/files, /v1/batches (mock/batches.py)
    app.router.add_route("*", "/{tail:.*}", mock.not_found)

    async def warm_up(app: web.Application) -> None:
        encoding("gpt-4o-mini")  # load o200k now, not during the first timed request

    app.on_startup.append(warm_up)
    return app


class Serving(NamedTuple):
    """An application being served."""

    runner: web.AppRunner  # its cleanup() stops serving
    port: int  # the port bound (a free one when asked for port 0)


async def start_app(app: web.Application, host: str, port: int) -> Serving:
    """Serve ``app`` on host:port."""
    # No access log: per-request logging would cost more than the request itself.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return Serving(runner, runner.addresses[0][1])
