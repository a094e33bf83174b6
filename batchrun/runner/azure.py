"""Azure OpenAI endpoints: the ``api-key`` header, deployment paths and the v1 path.

With ``deployments`` an Azure endpoint sends a model's requests to
``{base_url}/openai/deployments/{deployment}/chat/completions?api-version=…`` (the deployment
replaces the model); without, to the v1 surface ``{base_url}/openai/v1/…``, where the body's
``model`` is the deployment's name (a model without a deployment goes under its own name).
The key goes in ``api-key`` only (no ``Authorization: Bearer``). Azure's 429s (``"code": "429"``,
"Please retry after N seconds", ``retry-after-ms``) and remaining-* headers are read by the
classifier and the limiter as OpenAI's are; its content-filter 400 is a request error (not retried).
"""

from __future__ import annotations

from urllib.parse import urlencode

from batchrun.endpoints import Endpoint
from batchrun.runner.lean_http import LeanAsyncOpenAI
from batchrun.runner.sender import make_client
from batchrun.settings import WorkerSettings


class LeanAzureOpenAI(LeanAsyncOpenAI):
    """The lean client, authenticating as Azure OpenAI does: the key in the ``api-key`` header."""

    def _auth_headers(self, security) -> dict[str, str]:  # noqa: ARG002 (the SDK's signature)
        return {"api-key": self.api_key} if self.api_key and self.api_key != "unset" else {}

    def _validate_headers(self, headers, custom_headers) -> None:  # no Authorization is expected
        return None


def azure_base_url(endpoint: Endpoint, deployment: str) -> str:
    """The client's base URL for a deployment ('' : the v1 path), its api-version as the query."""
    root = endpoint.base_url.rstrip("/")
    if root.endswith("/openai/v1") or root.endswith("/openai"):  # given with the path already
        root = root.rsplit("/openai", 1)[0]
    if deployment:
        return f"{root}/openai/deployments/{deployment}?{urlencode({'api-version': endpoint.api_version})}"
    version = endpoint.api_version  # (a dated one is for deployment paths: the v1 path takes none)
    v1_query = version and version != "v1" and not endpoint.deployment_paths
    return f"{root}/openai/v1" + (f"?{urlencode({'api-version': version})}" if v1_query else "")


def make_azure_client(endpoint: Endpoint, settings: WorkerSettings, deployment: str) -> LeanAzureOpenAI:
    from dataclasses import replace

    return make_client(replace(settings, base_url=azure_base_url(endpoint, deployment)), cls=LeanAzureOpenAI)


def azure_body(endpoint: Endpoint, body: dict) -> dict:
    """The v1 path names the deployment as the model; a deployment path ignores it (left as it is)."""
    model = body.get("model")
    deployment = endpoint.deployments.get(model) if isinstance(model, str) else None
    if deployment and not endpoint.deployment_paths:
        return {**body, "model": deployment}
    return body
