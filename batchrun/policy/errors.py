"""Reading the error objects servers send: the message, type and code of any body shape, and what
those mean (a quota code, the HTTP status an error object would come with).

Pure functions, used by classify.py to judge errors; they decide nothing themselves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["QUOTA_CODES", "ErrorFields", "error_fields", "quota_code", "status_of_error"]

# Billing and quota errors: the type is "insufficient_quota" (stable), the code may be any of these
# (seen from OpenAI). Retrying cannot help with any of them: the account has to be fixed first.
QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    }
)


@dataclass(frozen=True)
class ErrorFields:
    message: str = ""
    type: str = ""
    code: str = ""


def error_fields(body: object) -> ErrorFields:
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
                return ErrorFields(message=stripped)
        else:
            return ErrorFields(message=stripped)
    if not isinstance(body, Mapping):
        return ErrorFields()

    inner = body.get("error")
    if isinstance(inner, Mapping):
        body = inner
    elif isinstance(inner, str) and inner:
        description = body.get("error_description") or body.get("message") or inner
        return ErrorFields(message=str(description), code=inner)

    def text(key: str) -> str:
        value = body.get(key)
        return "" if value is None else str(value)

    message = text("message")
    if text("code") == "content_filter":  # Azure: which categories tripped the filter, not just that it did
        categories = filtered_categories(body.get("innererror"))
        if categories:
            message = f"{message.rstrip('. ')} (content filter: {categories})"
    return ErrorFields(message=message, type=text("type"), code=text("code"))


def filtered_categories(inner: object) -> str:
    """Azure's ``innererror.content_filter_result`` as 'violence (high), hate (medium)': the categories
    it filtered, with their severity ('' when it names none)."""
    result = inner.get("content_filter_result") if isinstance(inner, Mapping) else None
    if not isinstance(result, Mapping):
        return ""
    return ", ".join(f"{name} ({v.get('severity')})" if v.get("severity") else str(name)
                     for name, v in result.items() if isinstance(v, Mapping) and v.get("filtered"))


def quota_code(fields: ErrorFields) -> str | None:
    """The quota code of a billing error, or None when it is not one."""
    # Key on the type (stable); the code is often more specific, so show it when it is known.
    if fields.code in QUOTA_CODES:
        return fields.code
    if fields.type in QUOTA_CODES:
        return fields.type
    return None


_RATE_LIMIT_TYPES = ("tokens", "requests", "rate_limit")
_AUTH_CODES = frozenset({"invalid_api_key", "invalid_authentication", "authentication_error"})
# Codes of errors that only a change to the request can fix (Responses API `response.failed`
# codes, chat and Azure codes), beyond the invalid_* and image_* families.
_REQUEST_CODES = frozenset({"context_length_exceeded", "content_filter", "content_policy_violation",
                            "empty_image_file", "failed_to_download_image", "unsupported_image_media_type",
                            "string_above_max_length", "model_not_found"})
_HTTP_CODE = re.compile(r"[1-5][0-9][0-9]")


def status_of_error(fields: ErrorFields) -> int:
    """The HTTP status the same error would come with, had it not come inside a 200."""
    code, type_ = fields.code.lower(), fields.type.lower()
    if quota_code(fields) is not None:
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
