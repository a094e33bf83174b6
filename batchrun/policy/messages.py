"""The words of a verdict: server text made safe to show and store (no credentials, one line,
bounded) and put into one sentence with batchrun's summary and advice.
"""

from __future__ import annotations

import base64
import re
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from batchrun.urls import _SECRET_PARAM  # mask_url's rule of which query values are secret

__all__ = ["redact", "redact_response", "remember_secrets", "secrets_of", "sentence"]

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


def _one_line(text: str) -> str:
    """Server text on one line, bounded: proxies send whole HTML pages."""
    text = text.strip()
    if text.startswith("<"):
        text = _TAGS.sub(" ", text)
    text = _SPACES.sub(" ", redact(text)).strip()
    if len(text) > _MAX_SERVER_MESSAGE:
        text = text[: _MAX_SERVER_MESSAGE - 1].rstrip() + "…"
    return text


def sentence(summary: str, server_message: str, advice: str = "") -> str:
    """``summary: server message; advice`` — skipping the parts that are empty."""
    text = summary
    server_message = _one_line(server_message)
    if server_message:
        text += ": " + (server_message.rstrip(" .") if advice else server_message)
    if advice:
        text += "; " + advice
    return redact(text)
