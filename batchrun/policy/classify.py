"""What a failed request means for the job and for the batch.

Pure functions: they look at a status, headers, body or exception and return a
:class:`Verdict`; they never sleep, count, or talk to Redis. The rules follow OpenAI's error codes
guide (https://platform.openai.com/docs/guides/error-codes) and the openai-python SDK's exceptions
(APIStatusError and its per-status subclasses, APIConnectionError, APITimeoutError, and APIError
for an error in the middle of a stream). Error bodies are read in errors.py, messages made in
messages.py.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Mapping

from batchrun.policy.backoff import wait_hint
from batchrun.policy.errors import QUOTA_CODES, ErrorFields, error_fields, quota_code, status_of_error
# Re-exported (QUOTA_CODES, KINDS, the verdict types and message hygiene): callers import them from here.
from batchrun.policy.messages import redact, redact_response, remember_secrets, secrets_of, sentence
from batchrun.policy.verdict import BATCH_ID_PLACEHOLDER, KINDS, Action, Verdict

__all__ = [
    "Action",
    "BATCH_ID_PLACEHOLDER",
    "KINDS",
    "QUOTA_CODES",
    "Verdict",
    "classify_answer",
    "classify_error_object",
    "classify_exception",
    "classify_response",
    "redact",
    "redact_response",
    "remember_secrets",
    "secrets_of",
    "stream_truncated_verdict",
]


def _quota_verdict(code: str, server_message: str) -> Verdict:
    return Verdict(
        Action.PAUSE,
        "quota",
        sentence(
            f"the API account has no quota left ({code})",
            server_message,
            f"fix billing, then run `batchrun resume {BATCH_ID_PLACEHOLDER}`",
        ),
    )


# --- rate limits ----------------------------------------------------------------------------

_TOKENS_IN_MESSAGE = re.compile(r"\((?:TPM|TPD)\)|tokens per (?:min|day)|token rate limit", re.I)
_REQUESTS_IN_MESSAGE = re.compile(
    r"\((?:RPM|RPD)\)|requests per (?:min|day)|call rate limit", re.I
)
_PER_DAY = re.compile(r"\((?:TPD|RPD)\)|per day", re.I)


def _limit_kind(fields: ErrorFields, headers: Mapping[str, str]) -> str | None:
    """Which limit a 429 hit: "tokens", "requests", or None when we cannot tell."""
    kind = fields.type.lower()
    for name in ("tokens", "requests"):
        if kind.startswith(name):  # "tokens", also older "tokens_usage_based"
            return name
    if _TOKENS_IN_MESSAGE.search(fields.message):
        return "tokens"
    if _REQUESTS_IN_MESSAGE.search(fields.message):
        return "requests"
    # Bare 429 (no body, Azure, proxies): the bucket that reads 0 remaining is the one we hit.
    empty = [
        name
        for name in ("tokens", "requests")
        if headers.get(f"x-ratelimit-remaining-{name}", "").strip() == "0"
    ]
    return empty[0] if len(empty) == 1 else None


def _rate_limit_verdict(fields: ErrorFields, headers: Mapping[str, str], now: float) -> Verdict:
    limit = _limit_kind(fields, headers)
    hint = wait_hint(headers, fields.message, now=now, limit_kind=limit)
    if limit is None:
        kind, summary = "rate_limit", "rate limited by the server (429)"
    else:
        period = "per day" if _PER_DAY.search(fields.message) else "per minute"
        kind, summary = f"rate_limit_{limit}", f"rate limited on {limit} {period} by the server"
    return Verdict(Action.RETRY, kind, sentence(summary, fields.message), hint, budget_exhausted=True)


# --- classify_response ----------------------------------------------------------------------

# status -> (kind, summary, advice) for client errors that only this request can fix.
_FAIL_STATUSES = {
    400: ("bad_request", "the server rejected the request as invalid (400)", "fix this request"),
    404: ("not_found", "not found (404)", "check the model name and the url"),
    413: ("request_too_large", "the request is too large (413)", "make it smaller"),
    422: ("unprocessable", "the server could not process the request (422)", "fix this request"),
}
# status -> (kind, summary, advice) for problems with the key: every job would fail alike.
_PAUSE_STATUSES = {
    401: (
        "auth",
        "the API key was refused (401)",
        f"set a valid OPENAI_API_KEY, then run `batchrun resume {BATCH_ID_PLACEHOLDER}`",
    ),
    403: (
        "permission",
        "the API key is not allowed to do this (403)",
        "give the key's project access to this model and endpoint (or use another key), "
        f"then run `batchrun resume {BATCH_ID_PLACEHOLDER}`",
    ),
}


def classify_response(
    status: int, headers: Mapping[str, str] | None, body: object, *, now: float
) -> Verdict:
    """Classify an HTTP error response. ``body`` is the parsed JSON, text, or None."""
    lower = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
    fields = error_fields(body)

    # A quota/billing error can arrive with any 4xx (429 in practice); retrying never helps.
    quota = quota_code(fields)
    if quota is not None and 400 <= status < 500:
        return _quota_verdict(quota, fields.message)

    if status == 429:
        if "request too large" in fields.message.lower():
            # Carries code rate_limit_exceeded, but it is larger than the limit itself.
            return Verdict(
                Action.FAIL,
                "request_too_large",
                sentence(
                    "the request is larger than the rate limit allows, so it can never be sent",
                    fields.message,
                    "shorten the prompt or lower max_tokens",
                ),
            )
        return _rate_limit_verdict(fields, lower, now)

    if status in _PAUSE_STATUSES:
        kind, summary, advice = _PAUSE_STATUSES[status]
        return Verdict(Action.PAUSE, kind, sentence(summary, fields.message, advice))

    if status in _FAIL_STATUSES:
        kind, summary, advice = _FAIL_STATUSES[status]
        return Verdict(Action.FAIL, kind, sentence(summary, fields.message, advice))

    # Transient: the same request may well succeed later. Honour the server's hint if any.
    hint = wait_hint(lower, fields.message, now=now)
    if status == 408:
        summary = "the server timed out waiting for the request (408)"
        return Verdict(Action.RETRY, "timeout", sentence(summary, fields.message), hint, circuit=True)
    if status == 409:
        summary = "the server reported a conflict (409)"
        return Verdict(Action.RETRY, "conflict", sentence(summary, fields.message), hint)
    if status >= 500:
        summary = f"the server failed ({status})"
        return Verdict(
            Action.RETRY, "server_error", sentence(summary, fields.message), hint, circuit=True
        )
    if 300 <= status < 400:
        # Redirects with a Location are followed before we see them; this one could not be.
        return Verdict(
            Action.FAIL,
            "unknown",
            sentence(
                f"the server answered with a redirect ({status}) that could not be followed",
                fields.message,
                "check the base URL (OPENAI_BASE_URL)",
            ),
        )
    return Verdict(Action.FAIL, "unknown", sentence(f"unexpected HTTP status {status}", fields.message))


# --- answers that are not results ------------------------------------------------------------

def classify_error_object(error: object, *, now: float, streamed: bool, fallback: str = "") -> Verdict:
    """An error that came inside an answer instead of a result: a Responses ``response.failed``
    or ``error`` event, a stream chunk holding ``error``, or a 200 whose body is an error. The
    verdict is that of the same error as an HTTP answer: a server error retries, a rate limit backs
    off, a quota error pauses the batch, an invalid request fails the job. ``error`` is the error
    object (or a body holding one, a string, None); ``fallback`` is said when it has no message."""
    fields = error_fields(error)
    message = fields.message or fallback or fields.code or fields.type
    status = status_of_error(fields)
    if status >= 500:
        if streamed:
            return Verdict(
                Action.RETRY,
                "stream_broken",
                sentence(
                    "the stream broke off with an error from the server",
                    message,
                    "the partial answer was discarded and the request will be sent again",
                ),
                circuit=True,
            )
        return Verdict(
            Action.RETRY,
            "server_error",
            sentence("the server answered with an error instead of a result", message,
                      "the request will be sent again"),
            circuit=True,
        )
    if status == 400:
        what = fields.code or fields.type or "invalid request"
        return Verdict(Action.FAIL, "bad_request",
                       sentence(f"the server rejected the request ({what})", message, "fix this request"))
    # Quota, auth, rate limits (and Azure's statuses): the same verdict and words as the HTTP answer.
    inner = {"message": message, "type": fields.type, "code": fields.code}
    return classify_response(status, {}, {"error": inner}, now=now)


def _not_a_result(summary: str, text: str, headers: Mapping[str, str] | None, now: float) -> Verdict:
    # A proxy's page, an empty or malformed body: the server's fault, which a retry may not meet.
    lower = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
    return Verdict(Action.RETRY, "server_error", sentence(summary, text, "the request will be sent again"),
                   wait_hint(lower, "", now=now), circuit=True)


# Where each endpoint's answer keeps its result.
_RESULT_FIELDS = {"/v1/chat/completions": "choices", "/v1/completions": "choices", "/v1/embeddings": "data",
                  "/v1/responses": "output"}


def classify_answer(url: str, headers: Mapping[str, str] | None, body: object, *, now: float) -> Verdict | None:
    """A 2xx answer: None when it is a result (to write as it is), else the verdict on it.

    ``body`` is the parsed JSON, or the text of a body that is not JSON ("" when empty). A result is
    a JSON object with the endpoint's result field (``choices``, ``data``, ``output``); a Responses
    answer whose status is ``completed`` or ``incomplete`` is one (incomplete is a normal, billed
    ending, e.g. at max_output_tokens). On the hot path: a result costs a few lookups."""
    field = _RESULT_FIELDS.get(url)
    if isinstance(body, Mapping):
        error = body.get("error")
        if url == "/v1/responses":
            status = body.get("status")
            if status == "failed":
                return classify_error_object(error, now=now, streamed=False, fallback="the response failed")
            if status in ("queued", "in_progress", "cancelled"):
                # A background response: it runs (and is paid) on the server; sending it again pays twice.
                return Verdict(Action.FAIL, "bad_request",
                               f"the response is {status}, not finished: batchrun does not poll background "
                               f"responses; remove \"background\": true from this request")
        if error:
            return classify_error_object(error, now=now, streamed=False)
        if body.get("object") == "error":  # vLLM's error shape: message, type and code at the top
            return classify_error_object(body, now=now, streamed=False)
        if field is not None and not isinstance(body.get(field), list):
            return _not_a_result(f"the server's answer has no {field}", "", headers, now)
        return None
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).decode("utf-8", "replace")
    if body is None or (isinstance(body, str) and not body.strip()):
        return _not_a_result("the server answered with an empty body", "", headers, now)
    if isinstance(body, str):
        return _not_a_result("the server's answer is not JSON", body, headers, now)
    return _not_a_result(f"the server's answer is JSON but not an object ({type(body).__name__})", "",
                         headers, now)


# --- classify_exception ---------------------------------------------------------------------

# Local file-system errors are OSErrors too, but they are bugs or setup problems, not the network.
_NOT_NETWORK_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def _transport_error_types() -> tuple[type[BaseException], ...]:
    """Network error classes of the HTTP stacks in use.

    Looked up in sys.modules: an exception of a class from a module that was never imported
    cannot exist, so there is nothing to import (and no hard dependency on any of them).
    """
    names = [
        ("httpx2", "TransportError"),  # openai v3's HTTP stack
        ("httpx", "TransportError"),  # openai v1/v2, and v3 when handed an httpx client
        ("anyio", "EndOfStream"),  # the SDK treats it as a connection error too
        ("anyio", "BrokenResourceError"),
        ("aiohttp", "ClientConnectionError"),
        ("aiohttp", "ClientPayloadError"),  # body cut off mid-transfer
    ]
    found = []
    for module_name, attr in names:
        cls = getattr(sys.modules.get(module_name), attr, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def _describe(exc: BaseException) -> str:
    """``ClassName: message`` — never a traceback."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _connection_verdict(exc: BaseException) -> Verdict:
    return Verdict(
        Action.RETRY,
        "connection",
        sentence("could not talk to the API", _describe(exc), "the request will be sent again"),
        circuit=True,
    )


def classify_exception(exc: BaseException, *, now: float) -> Verdict:
    """Classify an exception raised while sending a request (openai SDK or transport)."""
    openai = sys.modules.get("openai")  # not imported: it cannot have raised anything
    if openai is not None:
        verdict = _classify_openai(openai, exc, now)
        if verdict is not None:
            return verdict

    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
        # The worker is stopping, not the request failing: the job must run again.
        return Verdict(
            Action.RETRY,
            "unknown",
            sentence(
                f"the request was interrupted ({type(exc).__name__}) before it finished",
                "",
                "it will be sent again",
            ),
        )
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return _connection_verdict(exc)
    if isinstance(exc, OSError) and not isinstance(exc, _NOT_NETWORK_OS_ERRORS):
        return _connection_verdict(exc)  # socket.gaierror, ssl.SSLError, ENETUNREACH, ...
    if isinstance(exc, _transport_error_types()):
        return _connection_verdict(exc)
    return Verdict(Action.FAIL, "unknown", sentence("unexpected error", _describe(exc)))


def _classify_openai(openai: object, exc: BaseException, now: float) -> Verdict | None:
    APIError = getattr(openai, "APIError", None)
    if APIError is None or not isinstance(exc, APIError):
        return None

    if isinstance(exc, openai.APIStatusError):  # type: ignore[attr-defined]
        # exc.body is the inner "error" object (the SDK unwraps it); error_fields takes both.
        return classify_response(exc.status_code, exc.response.headers, exc.body, now=now)

    if isinstance(exc, openai.APITimeoutError):  # type: ignore[attr-defined]  (before its base)
        return Verdict(
            Action.RETRY,
            "timeout",
            sentence("the request timed out", "", "it will be sent again"),
            circuit=True,
        )
    if isinstance(exc, openai.APIConnectionError):  # type: ignore[attr-defined]
        cause = exc.__cause__ or exc.__context__
        detail = _describe(cause) if cause is not None else str(exc.message)
        return Verdict(
            Action.RETRY,
            "connection",
            sentence("could not talk to the API", detail, "the request will be sent again"),
            circuit=True,
        )
    if isinstance(exc, openai.APIResponseValidationError):  # type: ignore[attr-defined]
        # A 2xx whose body does not match the schema: not a broken stream, and not transient.
        return Verdict(
            Action.FAIL,
            "unknown",
            sentence(f"the API returned an unexpected response ({exc.status_code})", exc.message),
        )

    # Any other APIError: an "error" event in the middle of a stream.
    return classify_error_object(exc.body, now=now, streamed=True, fallback=str(exc.message))


def stream_truncated_verdict() -> Verdict:
    """A stream that ended without a finish_reason: the SDK raises nothing, so we say it."""
    # circuit stays False: the cut may be ours (cancellation, proxy idle timeout), not the API's.
    return Verdict(
        Action.RETRY,
        "stream_truncated",
        "the stream ended without a finish_reason; "
        "the partial answer was discarded and the request will be sent again",
    )
