"""batchrun: bulk OpenAI requests from JSONL, spread over RQ workers that share one rate budget in Redis.

From Python: ``batchrun.run(requests)``, ``batchrun.complete(prompts, model=...)``,
``await batchrun.arun(...)``, ``batchrun.stream(...)`` / ``batchrun.astream(...)`` (batchrun.api).
"""

__version__ = "0.1.0"

# Loaded on first use: `batchrun` commands and worker processes import this package too, and
# need none of it.
_API = {
    "run": "batchrun.api.library", "arun": "batchrun.api.library", "stream": "batchrun.api.library",
    "astream": "batchrun.api.library", "complete": "batchrun.api.library", "Interrupted": "batchrun.api.library",
    "Result": "batchrun.api.results", "ResultError": "batchrun.api.results",
    "RunEvent": "batchrun.api.events", "EventKind": "batchrun.api.events",
    "BatchrunError": "batchrun.api.errors", "ApiKeyMissing": "batchrun.api.errors",
    "RequestsError": "batchrun.api.errors", "RunInProgress": "batchrun.api.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'batchrun' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
