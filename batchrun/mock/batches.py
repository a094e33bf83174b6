"""The mock's Batch API: /v1/files and /v1/batches in OpenAI's formats.

A remote batch's status follows the clock (MockConfig.batch_seconds from creation to its end):
validating for the first tenth, in_progress, finalizing for the last tenth, then completed (or
expired, with batch_expire_fraction). Its output and error files are made when it ends. A
batch over its model's enqueued-token limit (batch_queue_tokens) fails in validation with
OpenAI's ``token_limit_exceeded``, as the real service does.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field

from aiohttp import web

from batchrun.mock.config import MockConfig
from batchrun.mock.counting import measure, output_cap
from batchrun.mock.errors import SERVER_ERROR, invalid
from batchrun.mock.replies import completion_body, embeddings_body, reply_pieces, usage_body
from batchrun.mock.validation import validate

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


@dataclass
class MockFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def object(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None, "status_details": None}


@dataclass
class MockBatch:
    id: str
    endpoint: str
    input_file_id: str
    metadata: dict | None
    created: float
    lines: list[dict]  # the input file's lines
    model: str
    tokens: int  # enqueued tokens it counts against its model's limit
    problem: dict | None = None  # {code, message, line}: it fails in validation
    cancel_at: float | None = None
    status: str = "validating"
    ended: dict[str, float] = field(default_factory=dict)  # "completed_at" etc.
    output_file_id: str | None = None
    error_file_id: str | None = None
    done: int = 0
    failed: int = 0

    def object(self, seconds: float) -> dict:
        created = int(self.created)
        stamps = {name: None for name in ("in_progress_at", "finalizing_at", "completed_at", "failed_at",
                                          "expired_at", "cancelling_at", "cancelled_at")}
        if self.status not in ("validating", "failed"):
            stamps["in_progress_at"] = int(self.created + seconds * 0.1)
        if self.cancel_at is not None:
            stamps["cancelling_at"] = int(self.cancel_at)
        stamps.update({k: int(v) for k, v in self.ended.items()})
        total = len(self.lines) if self.status != "failed" else 0
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint,
                "errors": {"object": "list", "data": [self.problem]} if self.problem else None,
                "input_file_id": self.input_file_id, "completion_window": "24h", "status": self.status,
                "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": created, "expires_at": created + 86400, **stamps,
                "request_counts": {"total": total, "completed": self.done, "failed": self.failed},
                "metadata": self.metadata}


def answer(endpoint: str, body: dict, config: MockConfig) -> dict:
    """The body the live endpoint would answer to ``body`` (no limits, no faults)."""
    n = body.get("n") or 1
    prompts, prompt_tokens, _ = measure(endpoint, body, n, config)
    if endpoint == "embeddings":
        return embeddings_body(body, prompts, prompt_tokens)
    default = config.default_max_tokens
    if endpoint == "chat/completions":
        answers = [reply_pieces(endpoint, body, default)]
    else:
        answers = [reply_pieces(endpoint, {**body, "prompt": p}, default) for p in prompts]
    usage = usage_body(endpoint, prompt_tokens, sum(len(a) for a in answers) * n)
    return completion_body(endpoint, body, answers, n, output_cap(body, default), usage)


class MockBatchAPI:
    """Files and batches of one mock server (state in memory, in the event loop's thread)."""

    def __init__(self, config_of) -> None:
        self.config_of = config_of  # the server's current MockConfig (it may change at run time)
        self.files: dict[str, MockFile] = {}
        self.batches: dict[str, MockBatch] = {}
        self.created = 0  # batches created (tests: a reattached worker creates none)
        self.cancels = 0
        self.rng = random.Random(0)

    # files

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if purpose not in ("batch", "fine-tune", "assistants", "vision", "user_data", "evals"):
            return web.json_response(invalid(f"'{purpose}' is not a valid purpose.", "purpose"), status=400)
        if upload is None or not hasattr(upload, "file"):
            return web.json_response(invalid("'file' is a required property", "file"), status=400)
        f = MockFile("file-" + os.urandom(12).hex(), upload.filename or "upload", str(purpose),
                     upload.file.read(), int(time.time()))
        self.files[f.id] = f
        return web.json_response(f.object())

    async def file(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["file_id"])
        if f is None:
            return _no_such("file", request.match_info["file_id"])
        if request.path.endswith("/content"):
            return web.Response(body=f.data, content_type="application/octet-stream")
        return web.json_response(f.object())

    # batches

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response(invalid("We could not parse the JSON body of your request."), status=400)
        if body.get("endpoint") not in ENDPOINTS:
            return web.json_response(invalid(f"Invalid 'endpoint': expected one of {', '.join(ENDPOINTS)}.",
                                             "endpoint", "invalid_value"), status=400)
        if body.get("completion_window") != "24h":
            return web.json_response(invalid("Invalid 'completion_window': expected '24h'.",
                                             "completion_window", "invalid_value"), status=400)
        f = self.files.get(str(body.get("input_file_id")))
        if f is None or f.purpose != "batch":
            return web.json_response(invalid(f"Invalid 'input_file_id': '{body.get('input_file_id')}'.",
                                             "input_file_id", "invalid_value"), status=400)
        batch = self._new_batch(f, body)
        self.batches[batch.id] = batch
        self.created += 1
        return web.json_response(batch.object(self.config_of().batch_seconds))

    def _new_batch(self, f: MockFile, body: dict) -> MockBatch:
        config = self.config_of()
        endpoint = body["endpoint"]
        lines, problem, models, tokens = [], None, set(), 0
        for no, raw in enumerate(f.data.splitlines(), 1):
            try:
                line = json.loads(raw)
                req = line["body"]
                assert line["url"] == endpoint and isinstance(line["custom_id"], str)
                assert validate(endpoint.removeprefix("/v1/"), req) is None
            except (ValueError, KeyError, TypeError, AssertionError):
                problem = problem or {"code": "invalid_request", "line": no,
                                      "message": f"Line {no} is not a valid request for {endpoint}."}
                continue
            lines.append(line)
            models.add(req["model"])
            if config.batch_queue_tokens is not None:  # (counted only when there is a limit: it is slow)
                tokens += measure(endpoint.removeprefix("/v1/"), req, req.get("n") or 1, config).charge
        if len(models) > 1 and not problem:
            problem = {"code": "mismatched_model", "line": None,
                       "message": "The provided file contains requests for more than one model."}
        model = min(models) if models else ""
        limit = config.batch_queue_tokens
        if limit is not None and not problem:
            queued = sum(b.tokens for b in self.batches.values() if b.model == model and b.status in ACTIVE)
            if queued + tokens > limit:
                problem = {"code": "token_limit_exceeded", "line": None,
                           "message": f"Enqueued token limit reached for {model} in organization org-mock. "
                                      f"Limit: {limit:,} enqueued tokens. Please try again once some "
                                      f"in_progress batches have been completed."}
        return MockBatch("batch_" + os.urandom(12).hex(), endpoint, f.id, body.get("metadata"), time.time(),
                         lines, model, 0 if problem else tokens, problem)

    async def retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _no_such("batch", request.match_info["batch_id"])
        self.advance(batch)
        return web.json_response(batch.object(self.config_of().batch_seconds))

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _no_such("batch", request.match_info["batch_id"])
        self.advance(batch)
        if batch.status not in ("validating", "in_progress", "finalizing", "cancelling"):
            return web.json_response(invalid(f"Cannot cancel a batch with status '{batch.status}'."), status=409)
        if batch.cancel_at is None:
            batch.cancel_at, batch.status = time.time(), "cancelling"
            self.cancels += 1
        return web.json_response(batch.object(self.config_of().batch_seconds))

    async def list(self, request: web.Request) -> web.Response:
        try:
            limit = min(100, max(1, int(request.query.get("limit", 20))))
        except ValueError:
            return web.json_response(invalid("Invalid 'limit': expected an integer.", "limit"), status=400)
        ordered = sorted(self.batches.values(), key=lambda b: b.created, reverse=True)  # newest first
        after = request.query.get("after")
        if after:
            ids = [b.id for b in ordered]
            ordered = ordered[ids.index(after) + 1:] if after in ids else []
        page = ordered[:limit]
        seconds = self.config_of().batch_seconds
        for b in page:
            self.advance(b)
        data = [b.object(seconds) for b in page]
        return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None, "has_more": len(ordered) > limit})

    async def summary(self, request: web.Request) -> web.Response:
        """For tests: how many batches were created and cancelled, and each one's status."""
        for b in self.batches.values():
            self.advance(b)
        return web.json_response({"created": self.created, "cancels": self.cancels, "files": len(self.files),
                                  "batches": {b.id: b.status for b in self.batches.values()}})

    # the clock

    def advance(self, b: MockBatch) -> None:
        """Move ``b`` on to where the clock says it is; make its files when it ends."""
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return
        config = self.config_of()
        age = time.time() - b.created
        span = config.batch_seconds
        if b.cancel_at is not None:
            if time.time() - b.cancel_at >= min(0.5, span * 0.1):
                share = min(1.0, max(0.0, (b.cancel_at - b.created - span * 0.1) / max(span * 0.8, 1e-9)))
                self._end(b, "cancelled", share, "batch_cancelled", CANCELLED_MESSAGE)
            return
        if age < span * 0.1:
            return
        if b.problem:
            b.status, b.ended["failed_at"] = "failed", time.time()
            return
        if age < span * 0.9:
            b.status = "in_progress"
            b.done = int(len(b.lines) * (age - span * 0.1) / max(span * 0.8, 1e-9))
        elif age < span:
            b.status, b.done = "finalizing", len(b.lines)
        elif config.batch_expire_fraction is not None:
            self._end(b, "expired", config.batch_expire_fraction, "batch_expired", EXPIRED_MESSAGE)
        else:
            self._end(b, "completed", 1.0, "", "")

    def _end(self, b: MockBatch, status: str, share: float, code: str, message: str) -> None:
        config = self.config_of()
        endpoint = b.endpoint.removeprefix("/v1/")
        n_done = int(len(b.lines) * share)
        out, err = [], []
        for i, line in enumerate(b.lines):
            row = {"id": "batch_req_" + os.urandom(12).hex(), "custom_id": line["custom_id"]}
            if i >= n_done:
                err.append({**row, "response": None, "error": {"code": code, "message": message}})
            elif self.rng.random() < config.batch_error_rate:
                err.append({**row, "response": {"status_code": 500, "request_id": "req_" + os.urandom(8).hex(),
                                                "body": SERVER_ERROR}, "error": None})
            else:
                body = answer(endpoint, line["body"], config)
                out.append({**row, "response": {"status_code": 200, "request_id": "req_" + os.urandom(8).hex(),
                                                "body": body}, "error": None})
        b.output_file_id = self._store_lines(out, f"{b.id}_output.jsonl")
        b.error_file_id = self._store_lines(err, f"{b.id}_error.jsonl")
        b.done, b.failed = len(out), len(err)
        b.status, b.ended[f"{status}_at"] = status, time.time()

    def _store_lines(self, lines: list[dict], name: str) -> str | None:
        if not lines:
            return None
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        f = MockFile("file-" + os.urandom(12).hex(), name, "batch_output", data, int(time.time()))
        self.files[f.id] = f
        return f.id


def _no_such(kind: str, name: str) -> web.Response:
    return web.json_response(invalid(f"No such {kind}: '{name}'", code=None), status=404)


def add_routes(app: web.Application, config_of) -> MockBatchAPI:
    """Register /v1/files and /v1/batches (before the catch-all 404 route)."""
    api = MockBatchAPI(config_of)
    app.router.add_post("/v1/files", api.upload)
    app.router.add_get("/v1/files/{file_id}", api.file)
    app.router.add_get("/v1/files/{file_id}/content", api.file)
    app.router.add_post("/v1/batches", api.create)
    app.router.add_get("/v1/batches", api.list)
    app.router.add_get("/v1/batches/{batch_id}", api.retrieve)
    app.router.add_post("/v1/batches/{batch_id}/cancel", api.cancel)
    app.router.add_get("/_mock/batches", api.summary)
    return api
