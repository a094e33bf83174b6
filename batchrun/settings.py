"""Settings as dataclasses: what a batch carries in Redis, and what a worker brings.

A batch's options travel with the batch (every worker obeys the same retry
policy and limits). A worker's settings, including the API key, stay in the
worker's process: they come from its command line and environment and are
never written to Redis.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_UNITS = {"rpm": "requests", "tpm": "tokens"}


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
        model = model.strip() if sep else "*"
        if not model:
            raise ValueError(f"--{kind} {spec!r}: the model name before '=' is missing (MODEL=NUMBER, or a bare "
                             f"NUMBER for every model)")
        try:
            number = float(value.strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"--{kind} {spec!r}: expected a number or MODEL=NUMBER") from None
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"--{kind} {spec!r}: a limit is a whole number of {_UNITS[kind]} per minute")
        if number < 0:
            raise ValueError(f"--{kind} {spec!r}: a limit cannot be negative")
        if number == 0:  # 0 means "no limit" inside batchrun; a user who types it means something else
            raise ValueError(f"--{kind} {spec!r}: a limit must be at least 1; leave --{kind} out for no limit")
        self.by_model.setdefault(model, {})[kind] = int(number)

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

    def models(self) -> set[str]:
        """The models named by MODEL=N limits (not the bare ones, which apply to every model)."""
        return {m for m in self.by_model if m != "*"}


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
    cache: int = 1  # 1: answers come from / go to the response cache (state/cache.py); 0: --no-cache
    cache_refresh: float = 0.0  # --refresh: Unix seconds it was given; answers stored before are sent again
    cache_ttl_days: float = 0.0  # how long a stored answer serves; 0: keep_days
    cache_max_mb: float = 512.0  # the cache's size bound (compressed answers)
    limits: Limits = field(default_factory=Limits)
    priority: str = "normal"  # high, normal, low or a weight (policy/fairshare.py); `batchrun priority` changes it
    via: str = "live"  # how its jobs are sent: VIAS (batchrun/remote/ runs "batch-api" and "auto")
    resend_via: str = "live"  # where lines a remote batch expired or failed go again: "live" or "batch-api"
    deadline_seconds: float = 0.0  # --via auto: the batch should end this long after it was created

    def problems(self) -> list[str]:
        """Why these options cannot work, one sentence per option (empty if they can): the
        command line refuses them before anything is written, a runner pauses a batch that
        carries them (stored by an older batchrun, or written to Redis by hand)."""
        return check_batch_options(self)

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
            kind = type(getattr(opts, f.name))  # int, float or str, from the default
            setattr(opts, f.name, data[f.name] if kind is str else kind(float(data[f.name])))
        if "limits" in data:
            opts.limits = Limits(json.loads(data["limits"]))
        return opts


# Ceilings on waits and lifetimes: a larger value is a typo, and past them Redis's expiry
# times or the jobs' due times stop being numbers it can hold.
MAX_BACKOFF_SECONDS = 86_400.0  # a day
MAX_BURST_SECONDS = 3_600.0
MAX_KEEP_DAYS = 3_650.0  # ten years
MAX_SHARD_SIZE = 1_000_000  # one RQ job; past this a typo, and a shard too big to share or redo
VIAS = ("live", "batch-api", "auto")  # how a batch's jobs may be sent
MAX_CACHE_MB = 1_000_000  # a terabyte: past this a typo
MAX_CONCURRENCY = 10_000  # requests in flight per process: past this, sockets and memory run out first


def _number(value: object) -> float | None:
    """value as a finite number, or None (bools, text, NaN and infinities are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class OptionsError(ValueError):
    """Options that cannot work, refused as a usage error (exit 2)."""


def check_batch_options(o: "BatchOptions") -> list[str]:
    """Pure: one sentence per option of ``o`` that cannot work, naming the option."""
    out = []

    def need(option: str, value: object, ok, wanted: str) -> None:
        x = _number(value)
        if x is None or not ok(x):
            out.append(f"{option} must be {wanted}, not {value!r}")

    need("--max-attempts", o.max_attempts, lambda x: x >= 1 and x == int(x), "a whole number of at least 1")
    need("--backoff-base", o.backoff_base, lambda x: 0 <= x <= MAX_BACKOFF_SECONDS,
         f"a number of seconds from 0 to {MAX_BACKOFF_SECONDS:,.0f}")
    need("backoff factor", o.backoff_factor, lambda x: 1 <= x <= 100, "a number from 1 to 100")
    need("--backoff-cap", o.backoff_cap, lambda x: 0 < x <= MAX_BACKOFF_SECONDS,
         f"a number of seconds above 0 and at most {MAX_BACKOFF_SECONDS:,.0f}")
    need("--shard-size", o.shard_size, lambda x: 0 <= x <= MAX_SHARD_SIZE and x == int(x),
         f"a whole number of jobs up to {MAX_SHARD_SIZE:,} (0: automatic)")
    need("--burst-seconds", o.burst_seconds, lambda x: 0 <= x <= MAX_BURST_SECONDS,
         f"a number of seconds from 0 to {MAX_BURST_SECONDS:,.0f} (0: learnt from the server)")
    need("--give-up-after", o.give_up_seconds, lambda x: 0 < x <= MAX_BACKOFF_SECONDS,
         f"a number of seconds above 0 and at most {MAX_BACKOFF_SECONDS:,.0f}")
    need("--max-cost", o.max_cost, lambda x: x >= 0, "a number of dollars, 0 or more (0: no cap)")
    need("--keep-days", o.keep_days, lambda x: 0 < x <= MAX_KEEP_DAYS,
         f"a number of days above 0 and at most {MAX_KEEP_DAYS:,.0f}")
    from batchrun.policy.fairshare import parse_priority  # (policy imports nothing of this module)
    try:
        parse_priority(o.priority)
    except ValueError as exc:
        out.append(str(exc).replace("priority", "--priority", 1))  # "--priority 'urgent' is not high, ..."
    if o.via not in VIAS:
        out.append(f"--via must be one of {', '.join(VIAS)}, not {o.via!r}")
    if o.resend_via not in ("live", "batch-api"):
        out.append(f"--resend-via must be 'live' or 'batch-api', not {o.resend_via!r}")
    need("--deadline", o.deadline_seconds, lambda x: 0 <= x <= 30 * 86_400, "a duration up to 30 days")
    if o.via == "auto" and not o.deadline_seconds:
        out.append("--via auto needs --deadline DURATION (how long the batch may take, e.g. 6h): the live share "
                   "is what the budget can send by then")
    if o.deadline_seconds and o.via != "auto":
        out.append(f"--deadline applies to --via auto only (this batch is --via {o.via})")
    need("--cache-ttl", o.cache_ttl_days, lambda x: 0 <= x <= MAX_KEEP_DAYS,
         f"a number of days from 0 to {MAX_KEEP_DAYS:,.0f} (0: --keep-days)")
    need("--cache-max-mb", o.cache_max_mb, lambda x: 0 < x <= MAX_CACHE_MB, f"a number of MB above 0 and at most {MAX_CACHE_MB:,}")
    for model, entry in sorted(o.limits.by_model.items()):
        for kind, value in sorted(entry.items()):
            x = _number(value)
            if x is None or x < 0 or x != int(x):  # 0 is stored for "no limit"
                name = "every model" if model == "*" else model
                out.append(f"--{kind} for {name} must be a whole number of at least 1, not {value!r}")
    return out


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
    request_timeout: float = 600.0  # a whole request at most, its answer's stream included
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
        for name, attr, kind in (("BATCHRUN_CONCURRENCY", "concurrency", int),
                                 ("BATCHRUN_LEASE_SECONDS", "lease_seconds", float),
                                 ("BATCHRUN_REQUEST_TIMEOUT", "request_timeout", float)):
            if env.get(name, "").strip():
                try:
                    setattr(s, attr, kind(env[name]))
                except ValueError:
                    raise ValueError(f"{name}={env[name]!r} is not a number; unset it or give "
                                     f"{'a whole number' if kind is int else 'a number of seconds'}") from None
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        problems = s.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return s

    def problems(self) -> list[str]:
        """Pure: why these settings cannot work, one sentence per setting (names as the user gives them)."""
        out = []
        c = _number(self.concurrency)
        if c is None or not 1 <= c <= MAX_CONCURRENCY or c != int(c):
            out.append(f"--concurrency (or BATCHRUN_CONCURRENCY) must be a whole number from 1 to "
                       f"{MAX_CONCURRENCY:,}, not {self.concurrency!r}")
        lease = _number(self.lease_seconds)
        if lease is None or not 3 <= lease <= 3600:  # renewed every lease/3; below ~3 s renewals cannot keep up
            out.append(f"BATCHRUN_LEASE_SECONDS must be a number of seconds from 3 to 3,600, "
                       f"not {self.lease_seconds!r}")
        grace = _number(self.grace_seconds)
        if grace is None or not 0 <= grace <= 86_400:
            out.append(f"--grace must be a number of seconds from 0 to 86,400, not {self.grace_seconds!r}")
        timeout = _number(self.request_timeout)
        if timeout is None or timeout <= 0:  # (NaN and infinities are no numbers: never endless)
            out.append(f"--request-timeout (or BATCHRUN_REQUEST_TIMEOUT) must be a number of seconds above 0, "
                       f"not {self.request_timeout!r}")
        return out

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
