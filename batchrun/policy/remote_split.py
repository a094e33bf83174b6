"""How a batch's jobs become remote batches (OpenAI Batch API input files): one model and one
URL per file, at most 50,000 requests and 200 MB each. Pure: the caller reads the jobs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

MAX_REQUESTS = 50_000  # OpenAI's limit per input file
# ... and its size limit, "200 MB": read as 200,000,000 bytes, the smaller reading (a file between
# 200 MB and 200 MiB refused upstream would fail all its jobs; one more file costs nothing)
MAX_BYTES = 200_000_000


class JobSize(NamedTuple):
    custom_id: str
    url: str  # "/v1/chat/completions"
    model: str
    line_bytes: int  # the input file line's size, its newline included


@dataclass
class PartPlan:
    """One future remote batch: its jobs, all for one URL and model."""

    url: str
    model: str
    custom_ids: list[str] = field(default_factory=list)
    bytes: int = 0


def split_parts(jobs: Iterable[JobSize], max_requests: int = MAX_REQUESTS,
                max_bytes: int = MAX_BYTES) -> list[PartPlan]:
    """Group ``jobs`` by (url, model) in the order they first appear, each group cut into parts
    of at most ``max_requests`` jobs and ``max_bytes`` (a single larger line gets a part of its own:
    the upstream refuses it, which is the truth to report, not a reason to drop it)."""
    if max_requests < 1 or max_bytes < 1:
        raise ValueError("max_requests and max_bytes must be at least 1")
    open_parts: dict[tuple[str, str], PartPlan] = {}
    order: list[PartPlan] = []
    for job in jobs:
        group = (job.url, job.model)
        part = open_parts.get(group)
        if part is not None and (len(part.custom_ids) >= max_requests or part.bytes + job.line_bytes > max_bytes):
            part = None
        if part is None:
            part = open_parts[group] = PartPlan(job.url, job.model)
            order.append(part)
        part.custom_ids.append(job.custom_id)
        part.bytes += job.line_bytes
    return order
