"""The Batch API calls batchrun makes (/v1/files, /v1/batches), through the official SDK.

Every call is bounded (a timeout, two SDK retries; none for a create, which is not idempotent); what fails comes back as one of three
exceptions the runner acts on: the model's queue is full (wait), the upstream refused the
request for good (say why), or it could not be reached now (try again at the next poll).
"""

from __future__ import annotations

import openai

from batchrun.policy.messages import redact, remember_secrets
from batchrun.policy.remote_lines import is_queue_full

CALL_TIMEOUT = 120.0  # seconds per call (uploads and downloads of up to 200 MB included)
FIND_PAGES = 20  # batches listed (100 a page) when looking for one created before a crash


class RemoteError(Exception):
    """A Batch API call that failed; the message is a sentence for the user."""


class QueueFull(RemoteError):
    """The model's enqueued-token limit is reached: create again once capacity frees."""


class Refused(RemoteError):
    """The upstream refused the request for good (a 4xx other than 429)."""


class KeyRefused(RemoteError):
    """The API key was refused (401) or may not do this (403): every call would fail alike."""


class Unavailable(RemoteError):
    """The upstream could not be reached or answered 5xx/429: try again later."""


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return redact(str(body.get("message") or exc.message))


class RemoteClient:
    def __init__(self, base_url: str, api_key: str, key_env: str = "OPENAI_API_KEY"):
        self.base_url, self.key_env = base_url, key_env  # (the variable named in a sentence; never the key)
        remember_secrets(api_key, base_url)  # a server may echo them (a bare token, no sk-): messages hide them
        self.sdk = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=2, timeout=CALL_TIMEOUT)

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except openai.APIStatusError as exc:
            message = _message(exc)
            code = (exc.body or {}).get("code") if isinstance(exc.body, dict) else None
            if exc.status_code == 400 and is_queue_full(code, message):
                raise QueueFull(f"{what}: {message}") from None
            if exc.status_code in (401, 403):
                raise KeyRefused(f"{what}: HTTP {exc.status_code}: {message}") from None
            if exc.status_code in (408, 409, 429) or exc.status_code >= 500:
                raise Unavailable(f"{what}: HTTP {exc.status_code}: {message}") from None
            raise Refused(f"{what}: HTTP {exc.status_code}: {message}") from None
        except openai.APIError as exc:  # connection errors, timeouts
            raise Unavailable(f"{what}: {redact(str(exc))}") from None

    def upload(self, name: str, data: bytes) -> str:
        f = self._call("uploading the input file", self.sdk.files.create, file=(name, data), purpose="batch")
        return f.id

    def create(self, file_id: str, endpoint: str, metadata: dict[str, str]) -> dict:
        # Never retried by the SDK: a create whose answer was lost (a 5xx, a timeout) may have made
        # the batch upstream, and sending it again would make a second one, billed twice. The
        # runner retries it itself, after looking the batch up by its metadata (steps.py CREATING).
        once = self.sdk.with_options(max_retries=0)
        b = self._call("creating the remote batch", once.batches.create, input_file_id=file_id,
                       endpoint=endpoint, completion_window="24h", metadata=metadata)
        return b.model_dump()

    def retrieve(self, remote_id: str) -> dict:
        return self._call(f"reading remote batch {remote_id}", self.sdk.batches.retrieve, remote_id).model_dump()

    def cancel(self, remote_id: str) -> dict | None:
        """Cancel upstream; None if it had ended already (a 409 or 400 says so)."""
        try:
            return self._call(f"cancelling remote batch {remote_id}", self.sdk.batches.cancel, remote_id).model_dump()
        except (Refused, Unavailable) as exc:
            if "HTTP 409" in str(exc) or "HTTP 400" in str(exc):
                return None
            raise

    def find(self, metadata: dict[str, str]) -> dict | None:
        """The newest remote batch whose metadata holds ``metadata`` (a create that went out before
        a crash), among the last FIND_PAGES pages."""
        after = None
        for _ in range(FIND_PAGES):
            kwargs = {"limit": 100, **({"after": after} if after else {})}
            page = self._call("listing remote batches", self.sdk.batches.list, **kwargs)
            data = list(page.data)
            for b in data:
                meta = b.metadata or {}
                if all(meta.get(k) == v for k, v in metadata.items()):
                    return b.model_dump()
            if not data or not getattr(page, "has_more", False):
                return None
            after = data[-1].id
        return None

    def content(self, file_id: str) -> bytes:
        return self._call(f"downloading file {file_id}", self.sdk.files.content, file_id).content
