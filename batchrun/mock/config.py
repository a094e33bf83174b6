"""How a mock server behaves (MockConfig), and the names of the faults it can inject."""

from __future__ import annotations

from dataclasses import dataclass, field

ORGANIZATION = "org-mock"
SYSTEM_FINGERPRINT = "fp_6d6f636b00"
# Order matters: one random draw per request picks the first kind whose cumulative rate covers it.
HTTP_FAULTS = ("500", "503", "429", "insufficient_quota")
STREAM_FAULTS = ("stream_disconnect", "stream_truncate", "stream_error")
FAULT_KINDS = HTTP_FAULTS + STREAM_FAULTS
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-3.5-turbo-instruct", "text-embedding-3-small")


@dataclass
class MockConfig:
    """How the mock behaves; change it at run time with MockServerThread.set_config."""

    rpm: int | None = None  # requests per minute, None = unlimited
    tpm: int | None = None  # tokens per minute, None = unlimited
    burst_seconds: float = 60.0  # bucket capacity = limit * burst_seconds / 60
    latency_ms: float = 0
    latency_per_token_ms: float = 0  # per output token
    error_rates: dict[str, float] = field(default_factory=dict)  # FAULT_KINDS -> probability
    count: str = "chars"  # admission prompt estimate: "chars" (chars/4) or "tiktoken"
    seed: int | None = None
    retry_after_header: bool = False  # 429s also carry retry-after-ms / retry-after
    default_max_tokens: int = 64  # output cap when the request sets none
    log_requests: bool = False  # keep (time, request digest, status, wait hint) per request, for tests
    # The Batch API (mock/batches.py): a remote batch takes batch_seconds from creation to its end
    # (a tenth validating, a tenth finalizing); batch_error_rate of its lines fail with a 500;
    # with batch_expire_fraction set, batches expire with only that share of lines done; a model's
    # batches may hold batch_queue_tokens enqueued tokens at most (None: no limit).
    batch_seconds: float = 2.0
    batch_error_rate: float = 0.0
    batch_expire_fraction: float | None = None
    batch_queue_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.burst_seconds <= 0:
            raise ValueError(f"burst_seconds must be > 0, got {self.burst_seconds!r}")
        if self.count not in ("chars", "tiktoken"):
            raise ValueError(f"count must be 'chars' or 'tiktoken', got {self.count!r}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens!r}")
        if not 0 <= self.batch_seconds <= 86_400 or not 0 <= self.batch_error_rate <= 1:
            raise ValueError("batch_seconds must be within [0, 86400] and batch_error_rate within [0, 1]")
        if self.batch_expire_fraction is not None and not 0 <= self.batch_expire_fraction <= 1:
            raise ValueError(f"batch_expire_fraction must be within [0, 1], got {self.batch_expire_fraction!r}")
        for kind, rate in self.error_rates.items():
            if kind not in FAULT_KINDS:
                raise ValueError(
                    f"unknown error kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}"
                )
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"error rate for {kind} must be within [0, 1], got {rate!r}")
