"""Every private name of the openai SDK (v3) that batchrun uses, imported in this one place.

They are not the SDK's public API, so an upgrade may move or change them; that is why
pyproject.toml keeps openai below its next major version and why tests/test_sdk_contract.py
sends every request shape both through the SDK's public path and through batchrun's lean path
and compares what arrives (method, URL, headers, body): a change that breaks the lean path fails
that test, not a batch.

Besides these imports, the lean path relies on private members, also pinned by that test:
``AsyncOpenAI._build_request`` (overridden), ``._idempotency_key`` (overridden),
``._idempotency_header``, ``._version`` and ``._client``; ``AsyncStream._iter_events``;
and httpx2's ``AsyncClient._transport_for_url``, ``._build_redirect_request`` and
``._default_encoding``.
"""

from openai._compat import model_copy
from openai._httpx2 import request_exceptions, timeout_exceptions
from openai._models import FinalRequestOptions
from openai._streaming import SSEDecoder
from openai._streaming_cleanup import drain_response_async
from openai._utils._json import openapi_dumps

__all__ = ["FinalRequestOptions", "SSEDecoder", "drain_response_async", "model_copy", "openapi_dumps",
           "request_exceptions", "timeout_exceptions"]
