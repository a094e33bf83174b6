"""The shard runner's sentences: what an event, an outage or a wait is called in logs and pauses."""

from __future__ import annotations

import socket
import ssl
import time
from urllib.parse import urlsplit

import aiohttp

from batchrun.policy.classify import BATCH_ID_PLACEHOLDER
from batchrun.urls import mask_url


def event_phrase(kind: str) -> str:
    return {
        "rate_limit_tokens": "rate limited (TPM)",
        "rate_limit_requests": "rate limited (RPM)",
        "rate_limit": "rate limited",
        "server_error": "server error",
        "stream_broken": "stream broke mid-way",
        "stream_truncated": "stream ended without a finish_reason",
        "day_limit": "the per-day limit (rpd/tpd) of every endpoint serving the model is spent",
        "day_too_small": "a request needs more tokens than what is left of today's tpd on every endpoint serving it",
    }.get(kind, kind.replace("_", " "))


def outage_cause(kind: str, status: int | None, error: BaseException | None) -> str:
    """What an outage-like failure is, in a few words: "connection refused", "DNS lookup failed",
    "TLS failed", "timed out", "HTTP 503"..."""
    if status is not None:
        return f"HTTP {status}"
    if kind == "stream_broken":
        return "streams broke off"
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        # aiohttp's connector errors hold the socket's error aside, not as a cause.
        for e in (error, getattr(error, "os_error", None), getattr(error, "certificate_error", None)):
            if isinstance(e, ConnectionRefusedError):
                return "connection refused"
            if isinstance(e, (socket.gaierror, aiohttp.ClientConnectorDNSError)):
                return "DNS lookup failed"
            if isinstance(e, (ssl.SSLError, ssl.CertificateError, aiohttp.ClientSSLError)):
                return "TLS failed"
        error = error.__cause__ or error.__context__
    return "timed out" if kind == "timeout" else "connection failed"


def v1_suggestion(base_url: str) -> str | None:
    """For a 404: the sentence that says a base URL lacks /v1, or None when it has it."""
    path = urlsplit(base_url).path.rstrip("/")
    if path.endswith("/v1") or "/deployments/" in path:  # Azure's deployment URLs have no /v1
        return None
    masked = mask_url(base_url.rstrip("/"))
    return f"the base URL {masked} has no /v1: did you mean OPENAI_BASE_URL={masked}/v1?"


def human_wait(seconds: float) -> str:
    """86400 -> "24 h 0 min"; 432 -> "7 min 12 s"; 4.2 -> "4.2 s"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def gave_up_sentence(base_url: str, cause: str, down_for: float, give_up_seconds: float) -> str:
    """Why a batch whose server has been down ``down_for`` seconds (failing with ``cause``) paused."""
    what = (f"has answered only with server errors ({cause}) for {down_for:.0f} s" if cause.startswith("HTTP")
            else f"has not answered for {down_for:.0f} s ({cause})")
    return (f"the API at {mask_url(base_url)} {what}, past --give-up-after "
            f"{give_up_seconds:g} s, so the batch is paused rather than waiting for ever; no job failed. "
            f"Check OPENAI_BASE_URL and that the server is up, then run `batchrun resume {BATCH_ID_PLACEHOLDER}`")


def long_wait_sentence(message: str, hint: float, cap: float) -> str:
    """Why a batch whose budget is empty for ``hint`` seconds, longer than the backoff cap, paused."""
    after = ""
    if hint < 366 * 86400:  # a far-future date says nothing a clock time would add
        after = time.strftime(" after %H:%M UTC (%Y-%m-%d)", time.gmtime(time.time() + hint))
    return (f"{message.rstrip(' .')}; the server asks to wait {human_wait(hint)}, longer than the "
            f"--backoff-cap of {cap:g} s, so the batch is paused; no job failed. "
            f"Run `batchrun resume {BATCH_ID_PLACEHOLDER}`{after}, when the limit has reset")
