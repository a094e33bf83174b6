"""What a failed request means: HTTP responses and exceptions from the openai SDK."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import openai
import pytest

from batchrun.policy.classify import (
    KINDS,
    QUOTA_CODES,
    Action,
    Verdict,
    classify_exception,
    classify_response,
    stream_truncated_verdict,
)

NOW = 1_700_000_000.0
URL = "https://api.openai.com/v1/chat/completions"

# --- 429 bodies seen from OpenAI and Azure -------------------------------------------------


def _err(message, type_=None, code=None, param=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


TPM_84MS = _err(
    "Rate limit reached for gpt-4o-mini in organization org-x on tokens per min (TPM): "
    "Limit 200000, Used 195869, Requested 4412. Please try again in 84ms. "
    "Visit https://platform.openai.com/account/rate-limits to learn more.",
    "tokens",
    "rate_limit_exceeded",
)
RPM_4S = _err(
    "Rate limit reached for gpt-4o-mini in organization org-x on requests per min (RPM): "
    "Limit 15, Used 15, Requested 1. Please try again in 4s. "
    "Visit https://platform.openai.com/account/rate-limits to learn more.",
    "requests",
    "rate_limit_exceeded",
)
TPM_1M2S = _err(
    "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): "
    "Limit 30000, Used 29000, Requested 3000. Please try again in 1m2.5s. "
    "Visit https://platform.openai.com/account/rate-limits to learn more.",
    "tokens",
    "rate_limit_exceeded",
)
TPM_6S = _err(
    "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): "
    "Limit 30000, Used 27000, Requested 6189. Please try again in 6.379s. "
    "Visit https://platform.openai.com/account/rate-limits to learn more.",
    "tokens",
    "rate_limit_exceeded",
)
RPD = _err(
    "Rate limit reached for gpt-4o-mini in organization org-x on requests per day (RPD): "
    "Limit 10000, Used 10000, Requested 1. Please try again in 8.64s.",
    "requests",
    "rate_limit_exceeded",
)
TOO_LARGE = _err(
    "Request too large for gpt-4o in organization org-x on tokens per min (TPM): "
    "Limit 30000, Requested 34307. The input or output tokens must be reduced in order to run "
    "successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
    "tokens",
    "rate_limit_exceeded",
)
QUOTA = _err(
    "You exceeded your current quota, please check your plan and billing details.",
    "insufficient_quota",
    "insufficient_quota",
)
AZURE_7S = {
    "error": {
        "code": "429",
        "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API "
        "version 2024-02-01 have exceeded call rate limit of your current OpenAI S0 pricing tier. "
        "Please retry after 7 seconds. Please go here: https://aka.ms/oai/quotaincrease if you "
        "would like to further increase the default rate limit.",
    }
}
AZURE_TOKENS = {
    "error": {
        "code": "429",
        "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API "
        "version 2024-02-01 have exceeded token rate limit of your current OpenAI S0 pricing "
        "tier. Please retry after 2 seconds.",
    }
}


def quota_body(code):
    return _err(f"Billing problem ({code}).", "insufficient_quota", code)


# --- classify_response ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, headers, body, action, kind, hint, budget, circuit",
    [
        # rate limits: retry, budget empty for everybody, hint from the message first
        (429, {}, TPM_84MS, Action.RETRY, "rate_limit_tokens", 0.084, True, False),
        (429, {"X-RateLimit-Reset-Tokens": "6m0s"}, TPM_84MS, Action.RETRY, "rate_limit_tokens", 0.084, True, False),
        (429, {}, RPM_4S, Action.RETRY, "rate_limit_requests", 4.0, True, False),
        (429, {}, TPM_1M2S, Action.RETRY, "rate_limit_tokens", 62.5, True, False),
        (429, {}, TPM_6S, Action.RETRY, "rate_limit_tokens", 6.379, True, False),
        (429, {}, RPD, Action.RETRY, "rate_limit_requests", 8.64, True, False),
        # kind from the message when the type is missing
        (429, {}, {"error": {"message": TPM_84MS["error"]["message"]}}, Action.RETRY, "rate_limit_tokens", 0.084, True, False),
        (429, {}, {"error": {"message": RPM_4S["error"]["message"]}}, Action.RETRY, "rate_limit_requests", 4.0, True, False),
        # Azure: code "429", wait in words, headers too
        (429, {}, AZURE_7S, Action.RETRY, "rate_limit_requests", 7.0, True, False),
        (429, {"Retry-After-Ms": "7000", "Retry-After": "7"}, AZURE_7S, Action.RETRY, "rate_limit_requests", 7.0, True, False),
        (429, {}, AZURE_TOKENS, Action.RETRY, "rate_limit_tokens", 2.0, True, False),
        # no body at all
        (429, {}, None, Action.RETRY, "rate_limit", None, True, False),
        (429, {"Retry-After": "3"}, "", Action.RETRY, "rate_limit", 3.0, True, False),
        (429, {"retry-after": formatdate(NOW + 20, usegmt=True)}, None, Action.RETRY, "rate_limit", 20.0, True, False),
        # no body: the reset header of the bucket that reads 0 remaining
        (
            429,
            {"X-RateLimit-Remaining-Tokens": "0", "x-ratelimit-remaining-requests": "59",
             "x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-reset-requests": "1s"},
            None, Action.RETRY, "rate_limit_tokens", 360.0, True, False,
        ),
        # reset header for the kind named in the body when the message has no wait
        (
            429,
            {"x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-reset-requests": "1s"},
            _err("Rate limit reached on tokens per min (TPM).", "tokens", "rate_limit_exceeded"),
            Action.RETRY, "rate_limit_tokens", 360.0, True, False,
        ),
        (
            429,
            {"x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-reset-requests": "-1"},
            _err("Rate limit reached on requests per min (RPM).", "requests", "rate_limit_exceeded"),
            Action.RETRY, "rate_limit_requests", None, True, False,
        ),
        # can never succeed
        (429, {}, TOO_LARGE, Action.FAIL, "request_too_large", None, False, False),
        (413, {}, "Payload Too Large", Action.FAIL, "request_too_large", None, False, False),
        # quota: pause, keyed on the type; also on the code alone
        (429, {"retry-after": "20"}, QUOTA, Action.PAUSE, "quota", None, False, False),
        (429, {}, _err("no money", None, "credit_balance_exhausted"), Action.PAUSE, "quota", None, False, False),
        (429, {}, _err("no money", "insufficient_quota", None), Action.PAUSE, "quota", None, False, False),
        # key problems: pause
        (401, {}, _err("Incorrect API key provided: sk-proj-****abcd.", "invalid_request_error", "invalid_api_key"), Action.PAUSE, "auth", None, False, False),
        (403, {}, _err("Country, region, or territory not supported", "request_forbidden", "unsupported_country_region_territory"), Action.PAUSE, "permission", None, False, False),
        # this request is wrong: fail it
        (400, {}, _err("This model's maximum context length is 128000 tokens.", "invalid_request_error", "context_length_exceeded", "messages"), Action.FAIL, "bad_request", None, False, False),
        (404, {}, _err("The model `gpt-9` does not exist", "invalid_request_error", "model_not_found"), Action.FAIL, "not_found", None, False, False),
        (422, {}, {"detail": "unprocessable"}, Action.FAIL, "unprocessable", None, False, False),
        (402, {}, None, Action.FAIL, "unknown", None, False, False),
        (418, {}, "I'm a teapot", Action.FAIL, "unknown", None, False, False),
        # transient: retry, honouring hints
        (408, {}, None, Action.RETRY, "timeout", None, False, True),
        (409, {"retry-after": "1"}, None, Action.RETRY, "conflict", 1.0, False, False),
        (500, {}, _err("The server had an error while processing your request.", "server_error"), Action.RETRY, "server_error", None, False, True),
        (502, {}, "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>", Action.RETRY, "server_error", None, False, True),
        (503, {"Retry-After": "30"}, _err("The engine is currently overloaded, please try again later.", "server_error"), Action.RETRY, "server_error", 30.0, False, True),
        (529, {"retry-after-ms": "250"}, None, Action.RETRY, "server_error", 0.25, False, True),
    ],
)
def test_classify_response(status, headers, body, action, kind, hint, budget, circuit):
    v = classify_response(status, headers, body, now=NOW)
    assert (v.action, v.kind, v.budget_exhausted, v.circuit) == (action, kind, budget, circuit)
    assert v.hint == (None if hint is None else pytest.approx(hint))
    assert v.message and "\n" not in v.message


@pytest.mark.parametrize("code", sorted(QUOTA_CODES))
def test_every_quota_code_pauses(code):
    v = classify_response(429, {}, quota_body(code), now=NOW)
    assert (v.action, v.kind, v.budget_exhausted) == (Action.PAUSE, "quota", False)
    assert f"({code})" in v.message
    assert "batchrun resume BATCH_ID" in v.message


def test_quota_type_with_any_code_pauses():
    # key on the type: a new code under insufficient_quota must still pause
    body = _err("Billing problem.", "insufficient_quota", "some_new_billing_code")
    v = classify_response(429, {}, body, now=NOW)
    assert (v.action, v.kind) == (Action.PAUSE, "quota")
    assert "(insufficient_quota)" in v.message


@pytest.mark.parametrize(
    "body",
    [TPM_84MS, TPM_84MS["error"], json.dumps(TPM_84MS), json.dumps(TPM_84MS).encode()],
    ids=["full-body", "inner-error", "json-text", "json-bytes"],
)
def test_body_shapes(body):
    v = classify_response(429, {}, body, now=NOW)
    assert (v.kind, v.hint) == ("rate_limit_tokens", pytest.approx(0.084))


@pytest.mark.parametrize(
    "status, body, expected",
    [
        (
            429,
            TPM_84MS,
            "rate limited on tokens per minute by the server: Rate limit reached for gpt-4o-mini "
            "in organization org-x on tokens per min (TPM): Limit 200000, Used 195869, "
            "Requested 4412. Please try again in 84ms. "
            "Visit https://platform.openai.com/account/rate-limits to learn more.",
        ),
        (
            429,
            QUOTA,
            "the API account has no quota left (insufficient_quota): You exceeded your current "
            "quota, please check your plan and billing details; fix billing, then run "
            "`batchrun resume BATCH_ID`",
        ),
        (
            401,
            _err("Incorrect API key provided: sk-proj-****abcd.", "invalid_request_error", "invalid_api_key"),
            "the API key was refused (401): Incorrect API key provided: sk-proj-****abcd; "
            "set a valid OPENAI_API_KEY, then run `batchrun resume BATCH_ID`",
        ),
        (502, "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
         "the server failed (502): 502 Bad Gateway nginx"),
        (429, None, "rate limited by the server (429)"),
    ],
)
def test_messages(status, body, expected):
    assert classify_response(status, {}, body, now=NOW).message == expected


@pytest.mark.parametrize(
    "secret",
    # Fake keys, assembled here so that no key-shaped string sits in the repository.
    ["sk-" + "abcdefghijklmnopqrstuvwxyz012345", "sk-" + "proj-AbC_dEf-1234567890abcdefXYZ", "Bearer abcdefghijklmnop"],
)
def test_messages_never_carry_a_key(secret):
    body = _err(f"Incorrect API key provided: {secret}. Find yours at …", "invalid_request_error")
    v = classify_response(401, {}, body, now=NOW)
    assert secret not in v.message and "[redacted]" in v.message
    exc = RuntimeError(f"failed with key {secret}")
    assert secret not in classify_exception(exc, now=NOW).message


def test_long_server_messages_are_bounded():
    v = classify_response(500, {}, "x" * 10_000, now=NOW)
    assert len(v.message) < 600


def test_verdict_rejects_unknown_kind():
    with pytest.raises(ValueError):
        Verdict(Action.RETRY, "rate-limit", "typo")
    assert len(KINDS) == 17


def test_stream_truncated_verdict():
    v = stream_truncated_verdict()
    assert (v.action, v.kind, v.hint, v.budget_exhausted) == (Action.RETRY, "stream_truncated", None, False)
    assert v.message == (
        "the stream ended without a finish_reason; the partial answer was discarded "
        "and the request will be sent again"
    )


# --- classify_exception: SDK exceptions built the way the SDK builds them --------------------

_CLIENT = openai.OpenAI(api_key="sk-test-not-a-real-key", base_url="http://127.0.0.1:9/v1", max_retries=0)


def status_error(status, body, headers=None):
    """Exactly what the SDK raises: its own _make_status_error_from_response on a response."""
    request = httpx2.Request("POST", URL)
    kwargs = {"json": body} if isinstance(body, dict) else {"content": body or b""}
    response = httpx2.Response(status, request=request, headers=headers or {}, **kwargs)
    return _CLIENT._make_status_error_from_response(response)


@pytest.mark.parametrize(
    "status, body, headers, exc_type, action, kind, hint",
    [
        (429, TPM_84MS, {"X-RateLimit-Reset-Tokens": "6m0s"}, openai.RateLimitError, Action.RETRY, "rate_limit_tokens", 0.084),
        (429, RPM_4S, None, openai.RateLimitError, Action.RETRY, "rate_limit_requests", 4.0),
        (429, AZURE_7S, {"Retry-After": "7"}, openai.RateLimitError, Action.RETRY, "rate_limit_requests", 7.0),
        (429, QUOTA, None, openai.RateLimitError, Action.PAUSE, "quota", None),
        (429, TOO_LARGE, None, openai.RateLimitError, Action.FAIL, "request_too_large", None),
        (429, None, {"retry-after": "2"}, openai.RateLimitError, Action.RETRY, "rate_limit", 2.0),
        (401, _err("Incorrect API key provided", "invalid_request_error", "invalid_api_key"), None, openai.AuthenticationError, Action.PAUSE, "auth", None),
        (403, _err("forbidden"), None, openai.PermissionDeniedError, Action.PAUSE, "permission", None),
        (400, _err("bad", "invalid_request_error"), None, openai.BadRequestError, Action.FAIL, "bad_request", None),
        (404, _err("no such model"), None, openai.NotFoundError, Action.FAIL, "not_found", None),
        (409, _err("conflict"), None, openai.ConflictError, Action.RETRY, "conflict", None),
        (422, _err("unprocessable"), None, openai.UnprocessableEntityError, Action.FAIL, "unprocessable", None),
        (500, _err("oops", "server_error"), None, openai.InternalServerError, Action.RETRY, "server_error", None),
        (503, b"upstream connect error", {"retry-after": "5"}, openai.InternalServerError, Action.RETRY, "server_error", 5.0),
        (418, _err("teapot"), None, openai.APIStatusError, Action.FAIL, "unknown", None),
    ],
)
def test_sdk_status_errors(status, body, headers, exc_type, action, kind, hint):
    exc = status_error(status, body, headers)
    assert type(exc) is exc_type
    if isinstance(body, dict):
        assert exc.body == body["error"]  # the SDK unwraps "error": the shape we must handle
    v = classify_exception(exc, now=NOW)
    assert (v.action, v.kind) == (action, kind)
    assert v.hint == (None if hint is None else pytest.approx(hint))


def test_sdk_status_error_built_by_hand_with_full_body():
    # Some callers build exceptions themselves and pass the whole body: same verdict.
    request = httpx2.Request("POST", URL)
    response = httpx2.Response(429, request=request, headers={"x-ratelimit-reset-tokens": "6m0s"}, json=TPM_84MS)
    for body in (TPM_84MS, TPM_84MS["error"]):
        exc = openai.RateLimitError("Error code: 429", response=response, body=body)
        v = classify_exception(exc, now=NOW)
        assert (v.action, v.kind, v.hint, v.budget_exhausted) == (
            Action.RETRY, "rate_limit_tokens", pytest.approx(0.084), True,
        )


def _raised_from(exc, cause):
    try:
        try:
            raise cause
        except BaseException as inner:
            raise exc from inner
    except BaseException as outer:
        return outer


REQUEST = httpx2.Request("POST", URL)


@pytest.mark.parametrize(
    "exc, action, kind, circuit",
    [
        (openai.APITimeoutError(request=REQUEST), Action.RETRY, "timeout", True),
        (_raised_from(openai.APIConnectionError(request=REQUEST), httpx2.ConnectError("refused")), Action.RETRY, "connection", True),
        (openai.APIConnectionError(request=REQUEST), Action.RETRY, "connection", True),
        # an "error" event in the middle of a stream
        (openai.APIError("The server had an error", REQUEST, body={"message": "The server had an error", "type": "server_error"}), Action.RETRY, "stream_broken", True),
        (openai.APIError("An error occurred during streaming", REQUEST, body=None), Action.RETRY, "stream_broken", True),
        (openai.APIError("quota", REQUEST, body={"message": "quota", "type": "insufficient_quota"}), Action.PAUSE, "quota", False),
        # transport errors that escaped the SDK
        (asyncio.TimeoutError(), Action.RETRY, "connection", True),
        (TimeoutError("timed out"), Action.RETRY, "connection", True),
        (ConnectionResetError(104, "Connection reset by peer"), Action.RETRY, "connection", True),
        (BrokenPipeError(), Action.RETRY, "connection", True),
        (OSError(101, "Network is unreachable"), Action.RETRY, "connection", True),
        (socket.gaierror(-2, "Name or service not known"), Action.RETRY, "connection", True),
        (ssl.SSLError("handshake failed"), Action.RETRY, "connection", True),
        (httpx2.ReadTimeout("read timed out"), Action.RETRY, "connection", True),
        (httpx2.RemoteProtocolError("peer closed connection without sending complete message body"), Action.RETRY, "connection", True),
        (httpx2.ConnectError("refused"), Action.RETRY, "connection", True),
        # local problems and bugs are not the network
        (FileNotFoundError(2, "No such file or directory"), Action.FAIL, "unknown", False),
        (ValueError("bad value"), Action.FAIL, "unknown", False),
        (KeyError("choices"), Action.FAIL, "unknown", False),
        (openai.OpenAIError("misconfigured"), Action.FAIL, "unknown", False),
        # the worker is stopping: the job must run again
        (asyncio.CancelledError(), Action.RETRY, "unknown", False),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else None,
)
def test_exceptions(exc, action, kind, circuit):
    v = classify_exception(exc, now=NOW)
    assert (v.action, v.kind, v.circuit) == (action, kind, circuit)
    assert v.hint is None
    assert "Traceback" not in v.message and "\n" not in v.message


def test_unknown_exception_message_names_class_and_message():
    v = classify_exception(ValueError("bad value\nsecond line"), now=NOW)
    assert v.message == "unexpected error: ValueError: bad value second line"


def test_connection_error_message_names_the_cause():
    exc = _raised_from(openai.APIConnectionError(request=REQUEST), httpx2.ConnectError("[Errno 111] Connection refused"))
    v = classify_exception(exc, now=NOW)
    assert "ConnectError: [Errno 111] Connection refused" in v.message


# --- against a real local HTTP server (the SDK's own HTTP stack, no mocks) -------------------


class _Handler(BaseHTTPRequestHandler):
    """The request's `model` picks the scenario."""

    scenarios = {
        "tpm": (429, {"x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-remaining-tokens": "0"}, TPM_84MS),
        "quota": (429, {}, QUOTA),
        "azure": (429, {"retry-after-ms": "7000", "retry-after": "7"}, AZURE_7S),
        "bare429": (429, {"Retry-After": "3"}, None),
        "auth": (401, {}, _err("Incorrect API key provided: sk-test****-key.", "invalid_request_error", "invalid_api_key")),
        "html502": (502, {"content-type": "text/html"}, "<html><body><h1>502 Bad Gateway</h1></body></html>"),
    }

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["content-length"])))
        model = request["model"]
        if model == "slow":
            time.sleep(1.0)
        if model == "stream_error":
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}
            error = {"error": {"message": "The server had an error while processing your request.", "type": "server_error"}}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(error)}\n\n".encode())
            return
        status, headers, body = self.scenarios.get(model, (500, {}, None))
        payload = b"" if body is None else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
        self.send_response(status)
        headers = {"content-type": "application/json", **headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def server_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _call(base_url, model, *, timeout=5.0, stream=False):
    client = openai.OpenAI(api_key="sk-test-not-a-real-key", base_url=base_url, max_retries=0, timeout=timeout)
    try:
        result = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=stream
        )
        if stream:
            for _ in result:
                pass
    except Exception as exc:  # noqa: BLE001 - the point is to see what the SDK raises
        return exc
    finally:
        client.close()
    raise AssertionError("the call should have failed")


@pytest.mark.parametrize(
    "model, action, kind, hint",
    [
        ("tpm", Action.RETRY, "rate_limit_tokens", 0.084),
        ("quota", Action.PAUSE, "quota", None),
        ("azure", Action.RETRY, "rate_limit_requests", 7.0),
        ("bare429", Action.RETRY, "rate_limit", 3.0),
        ("auth", Action.PAUSE, "auth", None),
        ("html502", Action.RETRY, "server_error", None),
    ],
)
def test_real_sdk_against_local_server(server_url, model, action, kind, hint):
    v = classify_exception(_call(server_url, model), now=time.time())
    assert (v.action, v.kind) == (action, kind)
    assert v.hint == (None if hint is None else pytest.approx(hint))
    assert "sk-test-not-a-real-key" not in v.message


def test_real_sdk_stream_error_event(server_url):
    exc = _call(server_url, "stream_error", stream=True)
    assert type(exc) is openai.APIError
    v = classify_exception(exc, now=NOW)
    assert (v.action, v.kind, v.circuit) == (Action.RETRY, "stream_broken", True)
    assert "The server had an error while processing your request" in v.message


def test_real_sdk_timeout(server_url):
    exc = _call(server_url, "slow", timeout=0.2)
    assert isinstance(exc, openai.APITimeoutError)
    assert classify_exception(exc, now=NOW).kind == "timeout"


def test_real_sdk_connection_refused():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exc = _call(f"http://127.0.0.1:{port}/v1", "any")
    assert type(exc) is openai.APIConnectionError
    v = classify_exception(exc, now=NOW)
    assert (v.action, v.kind, v.circuit) == (Action.RETRY, "connection", True)


# --- answers that are not results, and errors inside answers --------------------------------

from batchrun.policy.classify import classify_answer, classify_error_object  # noqa: E402

CHAT_URL = "/v1/chat/completions"
SERVER_ERROR_OBJ = {"message": "The server had an error while processing your request.", "type": "server_error"}


@pytest.mark.parametrize(
    "error, action, kind, budget",
    [
        (SERVER_ERROR_OBJ, Action.RETRY, "server_error", False),
        ({"code": "server_error", "message": "boom"}, Action.RETRY, "server_error", False),
        ({"code": "vector_store_timeout", "message": "slow"}, Action.RETRY, "server_error", False),
        (None, Action.RETRY, "server_error", False),
        ("upstream overloaded", Action.RETRY, "server_error", False),
        (QUOTA["error"], Action.PAUSE, "quota", False),
        ({"code": "insufficient_quota", "message": "no money"}, Action.PAUSE, "quota", False),
        (TPM_84MS["error"], Action.RETRY, "rate_limit_tokens", True),
        ({"code": "rate_limit_exceeded", "message": "slow down"}, Action.RETRY, "rate_limit", True),
        (TOO_LARGE["error"], Action.FAIL, "request_too_large", False),
        ({"code": "invalid_prompt", "message": "flagged"}, Action.FAIL, "bad_request", False),
        ({"code": "image_too_large", "message": "big"}, Action.FAIL, "bad_request", False),
        ({"type": "invalid_request_error", "message": "bad"}, Action.FAIL, "bad_request", False),
        ({"code": "invalid_api_key", "message": "Incorrect API key provided"}, Action.PAUSE, "auth", False),
        ({"code": "429", "message": "Please retry after 7 seconds."}, Action.RETRY, "rate_limit", True),
        ({"code": "503", "message": "busy"}, Action.RETRY, "server_error", False),
    ],
)
def test_an_error_inside_an_answer_gets_the_verdict_of_the_same_error_as_an_http_answer(error, action, kind, budget):
    v = classify_error_object(error, now=NOW, streamed=False)
    assert (v.action, v.kind, v.budget_exhausted) == (action, kind, budget)
    streamed = classify_error_object(error, now=NOW, streamed=True)
    # Streamed, the same verdict; a server error is named for the stream it broke.
    assert (streamed.action, streamed.hint, streamed.budget_exhausted) == (v.action, v.hint, v.budget_exhausted)
    assert streamed.kind == ("stream_broken" if kind == "server_error" else kind)
    if error:  # the same error as a 200's body
        assert classify_answer(CHAT_URL, {}, {"error": error}, now=NOW) == v


def test_an_error_inside_an_answer_keeps_the_hint_and_says_what_to_do():
    v = classify_error_object(TPM_84MS["error"], now=NOW, streamed=True)
    assert v.hint == pytest.approx(0.084)
    v = classify_error_object(QUOTA["error"], now=NOW, streamed=True)
    assert "batchrun resume BATCH_ID" in v.message
    v = classify_error_object({"code": "invalid_prompt", "message": "Invalid prompt."}, now=NOW, streamed=True)
    assert v.message == "the server rejected the request (invalid_prompt): Invalid prompt; fix this request"


@pytest.mark.parametrize(
    "url, headers, body, verdict",
    [
        (CHAT_URL, {}, {"choices": [], "usage": None}, None),
        ("/v1/embeddings", {}, {"data": []}, None),
        ("/v1/responses", {}, {"status": "incomplete", "output": []}, None),
        ("/v1/responses", {}, {"status": "completed", "output": []}, None),
        ("/v1/moderations", {}, {"results": []}, None),  # no shape known: any object is a result
        (CHAT_URL, {}, "<html>Warming up</html>", (Action.RETRY, "server_error", "the server's answer is not JSON: Warming up")),
        (CHAT_URL, {"Retry-After": "5"}, "", (Action.RETRY, "server_error", "the server answered with an empty body")),
        (CHAT_URL, {}, None, (Action.RETRY, "server_error", "the server answered with an empty body")),
        (CHAT_URL, {}, b"\xff\xfe", (Action.RETRY, "server_error", "the server's answer is not JSON")),
        (CHAT_URL, {}, [1], (Action.RETRY, "server_error", "the server's answer is JSON but not an object (list)")),
        (CHAT_URL, {}, 3, (Action.RETRY, "server_error", "the server's answer is JSON but not an object (int)")),
        (CHAT_URL, {}, {"id": "x"}, (Action.RETRY, "server_error", "the server's answer has no choices")),
        ("/v1/responses", {}, {"status": "failed", "error": None}, (Action.RETRY, "server_error", "the response failed")),
        ("/v1/responses", {}, {"status": "in_progress", "output": []}, (Action.FAIL, "bad_request", "background")),
    ],
)
def test_classify_answer(url, headers, body, verdict):
    v = classify_answer(url, headers, body, now=NOW)
    if verdict is None:
        assert v is None
        return
    assert (v.action, v.kind) == verdict[:2] and verdict[2] in v.message
    assert v.circuit == (v.kind == "server_error")
    if headers:
        assert v.hint == pytest.approx(5.0)


def test_a_redirect_that_was_not_followed_fails_the_job_and_names_the_base_url():
    v = classify_response(302, {}, "moved", now=NOW)
    assert (v.action, v.kind) == (Action.FAIL, "unknown") and "OPENAI_BASE_URL" in v.message


# --- properties (hypothesis): any answer gets a verdict, never an exception ----------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=300, deadline=None)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15,
)
VOCAB = st.sampled_from(sorted(QUOTA_CODES) + ["rate_limit_exceeded", "tokens", "requests", "server_error",
                                                 "invalid_request_error", "invalid_prompt", "invalid_api_key",
                                                 "429", "500", "400", "401", "", "x"])
ERROR_OBJECTS = st.fixed_dictionaries({}, optional={"message": st.text(max_size=200) | JSON_VALUES,
                                                    "type": VOCAB | JSON_VALUES, "code": VOCAB | JSON_VALUES,
                                                    "param": JSON_VALUES})
HEADER_NAMES = st.sampled_from(["retry-after", "Retry-After-Ms", "x-ratelimit-reset-tokens",
                                "x-ratelimit-reset-requests", "x-ratelimit-remaining-tokens",
                                "x-ratelimit-remaining-requests", "content-type"]) | st.text(max_size=10)
HEADERS = st.dictionaries(HEADER_NAMES, st.text(max_size=30), max_size=6)
BODIES = (st.none() | st.binary(max_size=200) | st.text(max_size=200) | JSON_VALUES
          | st.builds(lambda e: {"error": e}, ERROR_OBJECTS | JSON_VALUES)
          | st.builds(lambda v: json.dumps(v), JSON_VALUES))
URLS = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]) | st.text(max_size=10)


def _sane(v: Verdict) -> None:
    assert isinstance(v, Verdict) and v.action in Action and v.kind in KINDS
    assert isinstance(v.message, str) and v.message and "\n" not in v.message and len(v.message) < 1200
    assert v.hint is None or v.hint >= 0


@PROPERTY
@given(status=st.integers(0, 999), headers=HEADERS, body=BODIES)
def test_any_http_answer_gets_a_verdict(status, headers, body):
    _sane(classify_response(status, headers, body, now=NOW))


@PROPERTY
@given(url=URLS, headers=HEADERS, body=BODIES | st.builds(lambda s, e: {"status": s, "error": e, "output": []},
                                                         st.sampled_from(["failed", "incomplete", "completed",
                                                                          "queued", "in_progress", "cancelled"]),
                                                         ERROR_OBJECTS | st.none()))
def test_any_2xx_answer_is_a_result_or_gets_a_verdict(url, headers, body):
    v = classify_answer(url, headers, body, now=NOW)
    if v is not None:
        _sane(v)
    else:
        assert isinstance(body, dict) and not body.get("error")


@PROPERTY
@given(error=ERROR_OBJECTS | JSON_VALUES | st.binary(max_size=50), fallback=st.text(max_size=30))
def test_any_error_inside_an_answer_gets_the_same_verdict_streamed_or_not(error, fallback):
    plain = classify_error_object(error, now=NOW, streamed=False, fallback=fallback)
    streamed = classify_error_object(error, now=NOW, streamed=True, fallback=fallback)
    _sane(plain)
    _sane(streamed)
    assert (plain.action, plain.hint, plain.budget_exhausted, plain.circuit) == \
        (streamed.action, streamed.hint, streamed.budget_exhausted, streamed.circuit)


@PROPERTY
@given(error=ERROR_OBJECTS)
def test_an_error_inside_an_answer_pauses_fails_or_retries_as_its_http_twin(error):
    """The twin of an error object is the HTTP answer with the status its type or code names."""
    v = classify_error_object(error, now=NOW, streamed=True)
    fields = {k: str(error.get(k) or "") for k in ("type", "code")}
    if fields["type"] in QUOTA_CODES or fields["code"] in QUOTA_CODES:
        assert (v.action, v.kind) == (Action.PAUSE, "quota")
    elif v.action is Action.RETRY and v.budget_exhausted:
        assert v.kind.startswith("rate_limit")
    elif v.action is Action.RETRY:  # a 5xx (or a 408/409 an Azure-style code names)
        assert v.kind in ("stream_broken", "timeout", "conflict")
    twin = classify_response(429 if v.budget_exhausted else 500, {}, {"error": error}, now=NOW)
    if v.action is Action.RETRY:
        assert (twin.action, twin.budget_exhausted) == (Action.RETRY, v.budget_exhausted)


@PROPERTY
@given(status=st.integers(300, 599), headers=HEADERS, body=st.binary(max_size=200) | BODIES.filter(lambda b: isinstance(b, (dict, list))))
def test_any_sdk_status_error_gets_a_verdict(status, headers, body):
    headers = {k: v for k, v in headers.items() if k.isascii() and k.isprintable() and k.strip() and ":" not in k
               and v.isascii() and v.isprintable()}
    request = httpx2.Request("POST", URL)
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    try:
        response = httpx2.Response(status, request=request, headers=headers, **kwargs)
    except Exception:  # a header httpx2 itself refuses: no such answer can reach us
        return
    _sane(classify_exception(_CLIENT._make_status_error_from_response(response), now=NOW))


# --- credentials a server echoes back (review finding 5) ----------------------------------------

from batchrun.policy.classify import redact, redact_response, remember_secrets, secrets_of  # noqa: E402

AZURE_KEY = "azkey0123456789abcdef0123456789ab"  # no sk- prefix, as Azure's and gateways' keys
CRED_URL = "http://user:pa55word@127.0.0.1:9/v1?api-key=qsecret42&api-version=2024-10-21"
BASIC = "dXNlcjpwYTU1d29yZA=="  # base64 of user:pa55word, the Authorization: Basic the URL makes


def test_the_credentials_of_a_worker_are_its_key_password_basic_header_and_secret_query_values():
    found = secrets_of(AZURE_KEY, CRED_URL)
    assert {AZURE_KEY, "pa55word", BASIC, "qsecret42"} <= found
    assert "user" not in found and "2024-10-21" not in found  # a user name beside a password, a version: no secret
    assert secrets_of(None, "http://tok3n-alone@host/v1") == {"tok3n-alone"}
    assert secrets_of("", "not a url at all [") == set()


def test_echoed_credentials_are_redacted_from_messages_and_error_bodies():
    remember_secrets(AZURE_KEY, CRED_URL)
    echo = f"you sent authorization 'Basic {BASIC}' and api-key {AZURE_KEY} to /v1?api-key=qsecret42 (pa55word)"
    v = classify_response(400, {}, _err(echo, "invalid_request_error"), now=NOW)
    for secret in (AZURE_KEY, BASIC, "dXNlcjpwYTU1d29yZA", "qsecret42", "pa55word"):
        assert secret not in v.message
    assert "[redacted]" in v.message and "you sent authorization" in v.message
    response = redact_response({"status_code": 400, "request_id": "r", "body": {"error": {"message": echo,
                                                                                        "list": [echo, 3]}}})
    assert AZURE_KEY not in json.dumps(response) and BASIC not in json.dumps(response)
    assert response["status_code"] == 400 and response["body"]["error"]["list"][1] == 3
    assert redact("Authorization: Basic Zm9vOmJhcg== rest") == "Authorization: [redacted] rest"


_SECRET_TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", min_size=4,
                       max_size=40)


@settings(max_examples=200, deadline=None)
@given(key=_SECRET_TEXT, password=_SECRET_TEXT, before=st.text(max_size=30), after=st.text(max_size=30))
def test_any_configured_key_or_password_echoed_anywhere_is_redacted(key, password, before, after):
    import batchrun.policy.messages as messages  # the known secrets live with redact

    known = set(messages._KNOWN_SECRETS)
    try:
        remember_secrets(key, f"https://user:{password}@gateway.example/v1")
        for secret in (key, password):
            v = classify_response(400, {}, _err(f"{before}{secret}{after}", "invalid_request_error"), now=NOW)
            assert secret not in v.message
            body = redact_response({"status_code": 400, "body": {"m": [before + secret]}})["body"]
            assert secret not in body["m"][0]
    finally:  # random "secrets" ("0000") must not redact other tests' messages
        messages._KNOWN_SECRETS.clear()
        messages._KNOWN_SECRETS.update(known)
