"""Settings as dataclasses: what a batch carries in Redis, and what a worker brings.

A batch's options travel with the batch (every worker obeys the same retry
policy and limits). A worker's settings, including the API key, stay in the
worker's process: they come from its command line and environment and are
never written to Redis.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields

DEFAULT_BASE_URL = "https://api.openai.com/v1"


@dataclass
class Limits:
    """Per-minute limits by model; key '*' applies to models not named."""

    by_model: dict[str, dict[str, int]] = field(default_factory=dict)

    def for_model(self, model: str) -> tuple[int, int]:
        """(rpm, tpm) for a model; 0 means no limit."""
        entry = {**self.by_model.get("*", {}), **self.by_model.get(model, {})}  # a bare --tpm still applies
        return int(entry.get("rpm", 0)), int(entry.get("tpm", 0))

    def set(self, kind: str, spec: str) -> None:
        """Apply one ``--tpm``/``--rpm`` value: ``2000000`` or ``gpt-4o-mini=2000000``."""
        model, sep, value = spec.rpartition("=")
        model = model if sep else "*"
        try:
            number = int(float(value.replace("_", "")))
        except ValueError:
            raise ValueError(f"--{kind} {spec!r}: expected a number or MODEL=NUMBER") from None
        if number < 0:
            raise ValueError(f"--{kind} {spec!r}: a limit cannot be negative")
        self.by_model.setdefault(model, {})[kind] = number

    @classmethod
    def parse(cls, rpm: tuple[str, ...] | list[str] = (), tpm: tuple[str, ...] | list[str] = ()) -> "Limits":
        limits = cls()
        for spec in rpm:
            limits.set("rpm", spec)
        for spec in tpm:
            limits.set("tpm", spec)
        return limits

    def __bool__(self) -> bool:
        return any(v for entry in self.by_model.values() for v in entry.values())


@dataclass
class BatchOptions:
    """Options stored with a batch and obeyed by every worker that runs it."""

    max_attempts: int = 10
    backoff_base: float = 1.0
    backoff_factor: float = 2.0
    backoff_cap: float = 60.0
    shard_size: int = 0  # jobs per shard; 0: chosen at submit from the file's size (auto_shard_size)
    burst_seconds: float = 0.0  # 0: learn the server's burst from its headers (one second's worth until then)
    max_cost: float = 0.0  # USD the batch may spend at most, counting requests in flight at their worst case; 0: no cap
    keep_days: float = 7.0  # a finished or cancelled batch's keys expire after this many days
    give_up_seconds: float = 300.0  # a server that has not answered (or only 5xx) for this long pauses the batch
    limits: Limits = field(default_factory=Limits)

    def to_fields(self) -> dict[str, str]:
        out = {f.name: str(getattr(self, f.name)) for f in fields(self) if f.name != "limits"}
        out["limits"] = json.dumps(self.limits.by_model)
        return out

    @classmethod
    def from_fields(cls, data: dict[str, str]) -> "BatchOptions":
        opts = cls()
        for f in fields(cls):
            if f.name == "limits" or f.name not in data:
                continue
            kind = type(getattr(opts, f.name))  # int or float, from the default
            setattr(opts, f.name, kind(float(data[f.name])))
        if "limits" in data:
            opts.limits = Limits(json.loads(data["limits"]))
        return opts


def auto_shard_size(jobs: int) -> int:
    """Jobs per shard for a file of ``jobs`` lines: at least 4 shards, so that a small fleet
    shares it, but 1,000 to 10,000 jobs each. Each shard is one RQ job: a fork, a new client
    and connection pool, a ramp up and a drain, which a bigger shard pays less often."""
    return max(1000, min(10_000, -(-jobs // 4)))


@dataclass(frozen=True)
class CircuitPolicy:
    """When an endpoint counts as down: most recent requests failed with 5xx or connection errors."""

    window_ms: int = 10_000  # outcomes are counted over this window
    min_outcomes: int = 10  # no verdict on fewer
    failure_share: float = 0.5  # this share of outage-like failures opens the circuit
    first_cooling_ms: int = 5_000  # then 10 s, 20 s, ... after each failed probe
    max_cooling_ms: int = 60_000


@dataclass
class WorkerSettings:
    """What one worker process brings: concurrency, timeouts, and its API credentials."""

    concurrency: int = 100
    lease_seconds: float = 30.0  # a dead worker's jobs come back after this
    grace_seconds: float = 30.0  # on SIGTERM/Ctrl-C, in-flight requests get this long to finish
    request_timeout: float = 600.0
    park_after_seconds: float = 3.0  # a shard waiting longer than this for retries frees its worker
    max_shard_seconds: float = 600.0  # a runner yields its RQ worker after this, so batches share workers
    base_url: str = DEFAULT_BASE_URL
    api_key: str = field(default="", repr=False)
    circuit: CircuitPolicy = field(default_factory=CircuitPolicy)

    @classmethod
    def from_env(cls, **overrides) -> "WorkerSettings":
        env = os.environ
        s = cls(
            base_url=env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            api_key=env.get("OPENAI_API_KEY", ""),
        )
        if env.get("BATCHRUN_CONCURRENCY"):
            s.concurrency = int(env["BATCHRUN_CONCURRENCY"])
        if env.get("BATCHRUN_LEASE_SECONDS"):
            s.lease_seconds = float(env["BATCHRUN_LEASE_SECONDS"])
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        return s

    def key_fingerprint(self) -> str:
        """Identifies the API key without revealing it (budgets are per key)."""
        return hashlib.sha256(self.api_key.encode()).hexdigest()[:12]



# The settings the current worker process runs with (set by `batchrun worker`;
# a plain `rq worker` falls back to the environment).
_current: WorkerSettings | None = None


def current_worker_settings() -> WorkerSettings:
    return _current or WorkerSettings.from_env()


def set_worker_settings(settings: WorkerSettings) -> None:
    global _current
    _current = settings
