"""An OpenAI-compatible mock server for tests and benchmarks (``batchrun mock-server``).

It speaks OpenAI's wire formats (bodies, SSE chunks, errors, headers), so the real ``openai``
client, or any other, can be pointed at it::

    with MockServerThread(MockConfig(rpm=60, tpm=10_000)) as srv:
        client = AsyncOpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)

Endpoints: ``POST /v1/chat/completions`` (JSON or ``stream: true`` SSE), ``POST /v1/completions``,
``POST /v1/embeddings``, ``GET /v1/models``; plus ``GET /_mock/stats``, ``POST /_mock/reset`` and
``POST /_mock/config`` (JSON of MockConfig fields to change) for tests and benchmarks.

Rate limits, as OpenAI applies them, per (API key, model):

* Two token buckets, requests (RPM) and tokens (TPM). A bucket holds ``limit * burst_seconds / 60``
  (at least one request), starts full and refills continuously at ``limit / 60`` per second.
* Admission charges 1 request and ``prompt estimate + output cap * n`` tokens, where the prompt
  estimate is ceil(prompt characters / 4) (``count="chars"``, OpenAI's documented estimate; for chat
  the characters of every message value except ``role``) or the exact tiktoken count
  (``count="tiktoken"``); token-id inputs count as their length. The output cap is ``max_tokens``,
  else ``max_completion_tokens``, else ``default_max_tokens``. Embeddings charge the prompt only.
* The charge is NOT refunded when the answer is shorter than the cap, nor when an injected fault
  fails the request after admission: that is how OpenAI's TPM limits behave.
* A request that does not fit is refused with OpenAI's 429 body and charges nothing. When both
  buckets are short, the one with the longer wait is reported, so "Please try again in X" is
  the exact time until the request fits both. A request charging more tokens than the bucket holds
  gets "Request too large", which no wait can fix.
* Every response carries ``x-ratelimit-*`` headers for the configured limits (reset = time until
  the bucket is full again) and ``x-request-id``.

Faults (``error_rates``) are drawn with the seeded RNG once per admitted request, so they come
after the charge: HTTP 500/503/429/insufficient_quota, and for ``stream: true`` only, a stream that
breaks halfway (disconnect, truncate without a finish_reason, or an SSE error event).

Answers are deterministic: see ``reply_text``. ``usage`` is counted with tiktoken, independently
of batchrun's own estimator.

Modules, one concern each: ``config`` (MockConfig, fault kinds), ``errors`` (OpenAI's error
bodies), ``validation`` (400s), ``counting`` (tokens and the admission charge), ``replies``
(answers and response bodies), ``limits`` (the buckets and their 429s), ``faults``, ``streaming``
(SSE), ``stats``, ``app`` (aiohttp routes and request handling) and ``harness`` (running it in a
thread or the foreground). The ``batchrun mock-server`` command lives in ``batchrun.cli.mock``.
"""


import importlib

# Where each name lives. Imported on first use, so that `batchrun` commands that only name the mock
# (the CLI registers mock-server) do not import aiohttp's server and the mock's modules.
_HOMES = {
    "FAULT_KINDS": "config",
    "MockConfig": "config",
    "MockServerThread": "harness",
    "create_app": "app",
    "go_duration": "limits",
    "reply_text": "replies",
    "request_digest": "replies",
    "serve": "harness",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"batchrun.mock.{home}"), name)
