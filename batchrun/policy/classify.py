"""What a failed request means for the job and for the batch.

Pure functions: they look at a status, headers, body or exception and return a
:class:`Verdict`; they never sleep, count, or talk to Redis. Rules follow
/work/shared/REFERENCE.md (429 bodies, quota codes, SDK exceptions).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from batchrun.policy.backoff import wait_hint
from batchrun.urls import _SECRET_PARAM  # mask_url's rule of which query values are secret

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


class Action(str, Enum):
    RETRY = "retry"  # requeue the job with backoff
    FAIL = "fail"  # fail this job, do not retry it
    PAUSE = "pause"  # no job can succeed: pause the batch, never mark the job failed


KINDS = frozenset(
    {
        "rate_limit_tokens",
        "rate_limit_requests",
        "rate_limit",
        "request_too_large",
        "quota",
        "auth",
        "permission",
        "bad_request",
        "not_found",
        "unprocessable",
        "timeout",
        "conflict",
        "server_error",
        "connection",
        "stream_broken",
        "stream_truncated",
        "unknown",
    }
)

# Retrying cannot help with any of these: the account has to be fixed first.
QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    }
)

BATCH_ID_PLACEHOLDER = "BATCH_ID"
"""Appears in PAUSE messages ("run `batchrun resume BATCH_ID`"); the caller knows the real id."""


@dataclass(frozen=True)
class Verdict:
    action: Action
    kind: str
    message: str
    hint: float | None = None  # seconds the server asked us to wait
    budget_exhausted: bool = False  # rate budget empty for everyone sharing it: fleet cooldown
    circuit: bool = False  # upstream unhealthy: counts toward the circuit breaker

    def __post_init__(self) -> None:
        if self.kind not in KINDS:  # catch typos here rather than in dashboards
            raise ValueError(f"unknown verdict kind {self.kind!r}")


# --- message hygiene ------------------------------------------------------------------------

_SECRETS = re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}|(?i:\bbearer\s+)[A-Za-z0-9._~+/=\-]{8,}|(?i:\bbasic\s+)\S+")
_TAGS = re.compile(r"<[^>]{0,200}>")
_SPACES = re.compile(r"\s+")
_MAX_SERVER_MESSAGE = 500
_MIN_SECRET = 4  # shorter "secrets" would garble every message and hide nothing
_KNOWN_SECRETS: set[str] = set()  # the credentials this process sends (remember_secrets), longest first


def secrets_of(api_key: str | None, base_url: str | None) -> set[str]:
    """The credentials a worker sends, as a server may echo them back: the API key, the base URL's
    user name and password (and the Basic header they make), its secret query values; each also
    percent-encoded."""
    found = {api_key or ""}
    if base_url:
        try:
            parts = urlsplit(base_url)
            user, password = parts.username, parts.password
        except ValueError:
            parts, user, password = None, None, None
        if password is not None:
            found.add(unquote(password))
            basic = base64.b64encode(f"{unquote(user or '')}:{unquote(password)}".encode()).decode()
            found.update({basic, basic.rstrip("=")})
        elif user:
            found.add(unquote(user))  # a lone user name in a URL is usually a token (as mask_url says)
        if parts is not None:
            found.update(v for k, v in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_PARAM.search(k))
    found |= {quote(x, safe="") for x in found}
    return {x for x in found if len(x) >= _MIN_SECRET}


def remember_secrets(api_key: str | None, base_url: str | None) -> None:
    """Redact these credentials from every message from now on (a worker calls it with its settings)."""
    _KNOWN_SECRETS.update(secrets_of(api_key, base_url))


def redact(text: str) -> str:
    """``text`` without the credentials this process sends, nor anything shaped like a key
    (sk-…, Bearer …, Basic …): what a server or a proxy may echo back."""
    # The SDK puts no key in its messages, but a proxy or a server that echoes its request might.
    for secret in sorted(_KNOWN_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return _SECRETS.sub("[redacted]", text)


_redact = redact


def redact_response(response: dict | None) -> dict | None:
    """A failed answer ({status_code, request_id, body}) with every string in its body redacted, for
    the errors file: an error body that echoes the request's credentials is not the user's data."""
    if response is None:
        return None

    def clean(value):
        if isinstance(value, str):
            return redact(value)
        if isinstance(value, dict):
            return {redact(str(k)) if isinstance(k, str) else k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value
    return {**response, "body": clean(response.get("body"))}


def _clean(text: str) -> str:
    """Server text on one line, bounded: proxies send whole HTML pages."""
    text = text.strip()
    if text.startswith("<"):
        text = _TAGS.sub(" ", text)
    text = _SPACES.sub(" ", _redact(text)).strip()
    if len(text) > _MAX_SERVER_MESSAGE:
        text = text[: _MAX_SERVER_MESSAGE - 1].rstrip() + "…"
    return text


def _sentence(summary: str, server_message: str, advice: str = "") -> str:
    """``summary: server message; advice`` — skipping the parts that are empty."""
    text = summary
    server_message = _clean(server_message)
    if server_message:
        text += ": " + (server_message.rstrip(" .") if advice else server_message)
    if advice:
        text += "; " + advice
    return _redact(text)


# --- reading error bodies -------------------------------------------------------------------


@dataclass(frozen=True)
class _ErrorFields:
    message: str = ""
    type: str = ""
    code: str = ""


def _error_fields(body: object) -> _ErrorFields:
    """Pull message/type/code out of any error body shape we meet.

    ``{"error": {...}}`` from the wire, the inner ``{...}`` (the SDK stores ``body["error"]`` in
    ``APIStatusError.body``), ``{"error": "invalid_grant", "error_description": ...}`` (OAuth),
    plain text or an HTML page from a proxy, or nothing.
    """
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).decode("utf-8", "replace")
    if isinstance(body, str):
        stripped = body.strip()
        if stripped.startswith("{"):  # JSON handed over unparsed
            try:
                body = json.loads(stripped)
            except ValueError:
                return _ErrorFields(message=stripped)
        else:
            return _ErrorFields(message=stripped)
    if not isinstance(body, Mapping):
        return _ErrorFields()

    inner = body.get("error")
    if isinstance(inner, Mapping):
        body = inner
    elif isinstance(inner, str) and inner:
        description = body.get("error_description") or body.get("message") or inner
        return _ErrorFields(message=str(description), code=inner)

    def text(key: str) -> str:
        value = body.get(key)
        return "" if value is None else str(value)

    return _ErrorFields(message=text("message"), type=text("type"), code=text("code"))


def _quota_code(fields: _ErrorFields) -> str | None:
    # Key on the type (stable); the code is often more specific, so show it when it is known.
    if fields.code in QUOTA_CODES:
        return fields.code
    if fields.type in QUOTA_CODES:
        return fields.type
    return None


def _quota_verdict(code: str, server_message: str) -> Verdict:
    return Verdict(
        Action.PAUSE,
        "quota",
        _sentence(
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


def _limit_kind(fields: _ErrorFields, headers: Mapping[str, str]) -> str | None:
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


def _rate_limit_verdict(fields: _ErrorFields, headers: Mapping[str, str], now: float) -> Verdict:
    limit = _limit_kind(fields, headers)
    hint = wait_hint(headers, fields.message, now=now, limit_kind=limit)
    if limit is None:
        kind, summary = "rate_limit", "rate limited by the server (429)"
    else:
        period = "per day" if _PER_DAY.search(fields.message) else "per minute"
        kind, summary = f"rate_limit_{limit}", f"rate limited on {limit} {period} by the server"
    return Verdict(Action.RETRY, kind, _sentence(summary, fields.message), hint, budget_exhausted=True)


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
    fields = _error_fields(body)

    # A quota/billing error can arrive with any 4xx (429 in practice); retrying never helps.
    quota = _quota_code(fields)
    if quota is not None and 400 <= status < 500:
        return _quota_verdict(quota, fields.message)

    if status == 429:
        if "request too large" in fields.message.lower():
            # Carries code rate_limit_exceeded, but it is larger than the limit itself.
            return Verdict(
                Action.FAIL,
                "request_too_large",
                _sentence(
                    "the request is larger than the rate limit allows, so it can never be sent",
                    fields.message,
                    "shorten the prompt or lower max_tokens",
                ),
            )
        return _rate_limit_verdict(fields, lower, now)

    if status in _PAUSE_STATUSES:
        kind, summary, advice = _PAUSE_STATUSES[status]
        return Verdict(Action.PAUSE, kind, _sentence(summary, fields.message, advice))

    if status in _FAIL_STATUSES:
        kind, summary, advice = _FAIL_STATUSES[status]
        return Verdict(Action.FAIL, kind, _sentence(summary, fields.message, advice))

    # Transient: the same request may well succeed later. Honour the server's hint if any.
    hint = wait_hint(lower, fields.message, now=now)
    if status == 408:
        summary = "the server timed out waiting for the request (408)"
        return Verdict(Action.RETRY, "timeout", _sentence(summary, fields.message), hint, circuit=True)
    if status == 409:
        summary = "the server reported a conflict (409)"
        return Verdict(Action.RETRY, "conflict", _sentence(summary, fields.message), hint)
    if status >= 500:
        summary = f"the server failed ({status})"
        return Verdict(
            Action.RETRY, "server_error", _sentence(summary, fields.message), hint, circuit=True
        )
    if 300 <= status < 400:
        # Redirects with a Location are followed before we see them; this one could not be.
        return Verdict(
            Action.FAIL,
            "unknown",
            _sentence(
                f"the server answered with a redirect ({status}) that could not be followed",
                fields.message,
                "check the base URL (OPENAI_BASE_URL)",
            ),
        )
    return Verdict(Action.FAIL, "unknown", _sentence(f"unexpected HTTP status {status}", fields.message))


# --- answers that are not results ------------------------------------------------------------

_RATE_LIMIT_TYPES = ("tokens", "requests", "rate_limit")
_AUTH_CODES = frozenset({"invalid_api_key", "invalid_authentication", "authentication_error"})
# Codes of errors that only a change to the request can fix (Responses API `response.failed`
# codes, chat and Azure codes), beyond the invalid_* and image_* families.
_REQUEST_CODES = frozenset({"context_length_exceeded", "content_filter", "content_policy_violation",
                            "empty_image_file", "failed_to_download_image", "unsupported_image_media_type",
                            "string_above_max_length", "model_not_found"})
_HTTP_CODE = re.compile(r"[1-5][0-9][0-9]")


def _status_of_error(fields: _ErrorFields) -> int:
    """The HTTP status the same error would come with, had it not come inside a 200."""
    code, type_ = fields.code.lower(), fields.type.lower()
    if _quota_code(fields) is not None:
        return 429
    if code in _AUTH_CODES or type_ in _AUTH_CODES:
        return 401
    if code == "rate_limit_exceeded" or type_.startswith(_RATE_LIMIT_TYPES):
        return 429
    if _HTTP_CODE.fullmatch(code) and 400 <= int(code) < 600:  # Azure puts the status in the code
        return int(code)
    if (type_ == "invalid_request_error" or code in _REQUEST_CODES
            or code.startswith(("invalid_", "image_"))):
        return 400
    return 500  # server_error, vector_store_timeout, anything unknown: the server's fault


def classify_error_object(error: object, *, now: float, streamed: bool, fallback: str = "") -> Verdict:
    """An error that came inside an answer instead of a result: a Responses ``response.failed``
    or ``error`` event, a stream chunk holding ``error``, or a 200 whose body is an error. The
    verdict is that of the same error as an HTTP answer: a server error retries, a rate limit backs
    off, a quota error pauses the batch, an invalid request fails the job. ``error`` is the error
    object (or a body holding one, a string, None); ``fallback`` is said when it has no message."""
    fields = _error_fields(error)
    message = fields.message or fallback or fields.code or fields.type
    status = _status_of_error(fields)
    if status >= 500:
        if streamed:
            return Verdict(
                Action.RETRY,
                "stream_broken",
                _sentence(
                    "the stream broke off with an error from the server",
                    message,
                    "the partial answer was discarded and the request will be sent again",
                ),
                circuit=True,
            )
        return Verdict(
            Action.RETRY,
            "server_error",
            _sentence("the server answered with an error instead of a result", message,
                      "the request will be sent again"),
            circuit=True,
        )
    if status == 400:
        what = fields.code or fields.type or "invalid request"
        return Verdict(Action.FAIL, "bad_request",
                       _sentence(f"the server rejected the request ({what})", message, "fix this request"))
    # Quota, auth, rate limits (and Azure's statuses): the same verdict and words as the HTTP answer.
    inner = {"message": message, "type": fields.type, "code": fields.code}
    return classify_response(status, {}, {"error": inner}, now=now)


def _not_a_result(summary: str, text: str, headers: Mapping[str, str] | None, now: float) -> Verdict:
    # A proxy's page, an empty or malformed body: the server's fault, which a retry may not meet.
    lower = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
    return Verdict(Action.RETRY, "server_error", _sentence(summary, text, "the request will be sent again"),
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
        _sentence("could not talk to the API", _describe(exc), "the request will be sent again"),
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
            _sentence(
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
    return Verdict(Action.FAIL, "unknown", _sentence("unexpected error", _describe(exc)))


def _classify_openai(openai: object, exc: BaseException, now: float) -> Verdict | None:
    APIError = getattr(openai, "APIError", None)
    if APIError is None or not isinstance(exc, APIError):
        return None

    if isinstance(exc, openai.APIStatusError):  # type: ignore[attr-defined]
        # exc.body is the inner "error" object (the SDK unwraps it); _error_fields takes both.
        return classify_response(exc.status_code, exc.response.headers, exc.body, now=now)

    if isinstance(exc, openai.APITimeoutError):  # type: ignore[attr-defined]  (before its base)
        return Verdict(
            Action.RETRY,
            "timeout",
            _sentence("the request timed out", "", "it will be sent again"),
            circuit=True,
        )
    if isinstance(exc, openai.APIConnectionError):  # type: ignore[attr-defined]
        cause = exc.__cause__ or exc.__context__
        detail = _describe(cause) if cause is not None else str(exc.message)
        return Verdict(
            Action.RETRY,
            "connection",
            _sentence("could not talk to the API", detail, "the request will be sent again"),
            circuit=True,
        )
    if isinstance(exc, openai.APIResponseValidationError):  # type: ignore[attr-defined]
        # A 2xx whose body does not match the schema: not a broken stream, and not transient.
        return Verdict(
            Action.FAIL,
            "unknown",
            _sentence(f"the API returned an unexpected response ({exc.status_code})", exc.message),
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
