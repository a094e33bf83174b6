"""What a job file will cost and how long it must take, before anything is sent.

``estimate_file`` reads a job file (no API calls, no Redis) and reports, per model: the jobs per
endpoint; the input tokens, counted exactly as the shared budget counts them
(``batchrun.policy.tokens.estimate_tokens``); the output tokens the jobs may write at most (their
max_tokens / max_completion_tokens / max_output_tokens times n, or the budget's default) and,
given a typical answer length, a typical figure; a cost range from the price table; and the
shortest wall time the rate limits allow. Invalid lines are counted and reported (file, line,
reason), not fatal.

Speed. Counting tokens is most of the work; the reader walks each request the way
``estimate_tokens`` does (``prompts.walk_request``: the same texts, framing and media figures) and hands
the texts to ``token_count.TextCounter``, which counts them in chunks (in worker processes for
large files). The sums are the same as calling ``estimate_tokens`` on every job;
tests/test_estimate.py checks that. The text ``batchrun estimate`` prints is
``batchrun.cli.estimate_text.render_text``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from batchrun.files.jobfile import Job, LineError, iter_jobs
from batchrun.ops import token_count
from batchrun.ops.token_count import TextCounter, count_tokens
from batchrun.policy.pricing import Price, PriceTable, worst_case_cost
from batchrun.settings import Limits
from batchrun.policy.tokens import DEFAULT_MAX_OUTPUT_TOKENS, encoding_for, estimate_tokens

# The walk the budget's estimate makes, so that this one counts requests exactly alike.
from batchrun.policy.prompts import positive_int as _positive_int, walk_request as _walk

__all__ = ["EstimateReport", "ModelEstimate", "count_tokens", "estimate_file", "shortest_minutes"]

#: Invalid lines kept in the report (all are counted).
KEPT_ERRORS = 100


@dataclass(frozen=True)
class ModelEstimate:
    """The figures for one model. Costs are USD; None where no price is known."""

    model: str
    jobs_by_url: Mapping[str, int]
    input_tokens: int
    input_exact: bool  # False: tiktoken could not load its encoding, characters were counted
    max_output_tokens: int  # what the jobs may write at most (what the TPM limit charges)
    typical_output_tokens: int | None  # with a typical answer length, else None
    price: Price | None
    cost_low: float | None  # input at full price plus the typical output (or none)
    cost_high: float | None  # input at full price plus the maximum output
    rpm: int  # limits that apply to this model; 0 = none given
    tpm: int
    minutes: float | None  # shortest wall time at those limits; None without limits
    binding_limit: str | None  # "rpm" or "tpm": the limit that sets `minutes`
    # Jobs that need more than the TPM limit at once: `run` fails them as request_too_large, so
    # they are left out of `minutes`. The first TOO_LARGE_KEPT: (line, custom_id, tokens).
    too_large_jobs: int = 0
    too_large_tokens: int = 0  # what they would be charged, in all
    too_large: tuple[tuple[int, str, int], ...] = ()

    @property
    def jobs(self) -> int:
        return sum(self.jobs_by_url.values())

    @property
    def tokens_charged(self) -> int:
        """Tokens the TPM limit charges at admission: input plus the maximum output."""
        return self.input_tokens + self.max_output_tokens


@dataclass(frozen=True)
class EstimateReport:
    """Everything ``batchrun estimate`` shows. Totals add up the models."""

    path: str
    models: tuple[ModelEstimate, ...]
    invalid_lines: int
    errors: tuple[LineError, ...]  # the first KEPT_ERRORS invalid lines
    typical_output: int | None  # tokens per answer, as given
    prices: PriceTable

    @property
    def jobs(self) -> int:
        return sum(m.jobs for m in self.models)

    @property
    def input_tokens(self) -> int:
        return sum(m.input_tokens for m in self.models)

    @property
    def max_output_tokens(self) -> int:
        return sum(m.max_output_tokens for m in self.models)

    @property
    def typical_output_tokens(self) -> int | None:
        if self.typical_output is None:
            return None
        return sum(m.typical_output_tokens or 0 for m in self.models)

    @property
    def cost_low(self) -> float:
        """Over the models with a price (see ``unpriced_models``)."""
        return sum(m.cost_low for m in self.models if m.cost_low is not None)

    @property
    def cost_high(self) -> float:
        return sum(m.cost_high for m in self.models if m.cost_high is not None)

    @property
    def unpriced_models(self) -> list[str]:
        return [m.model for m in self.models if m.price is None]

    @property
    def slowest(self) -> ModelEstimate | None:
        """The model whose limits take longest. Each model has its own budget and they run side
        by side, so this model's time is the file's."""
        timed = [m for m in self.models if m.minutes is not None]
        return max(timed, key=lambda m: m.minutes) if timed else None

    @property
    def models_without_limits(self) -> list[str]:
        return [m.model for m in self.models if m.minutes is None]

    def to_dict(self) -> dict:
        """The ``--json`` object; its fields are documented in the README."""
        slowest = self.slowest
        return {
            "file": self.path,
            "jobs": self.jobs,
            "invalid_lines": self.invalid_lines,
            "errors": [{"line": e.line_no, "reason": e.reason} for e in self.errors],
            "typical_output_per_answer": self.typical_output,
            "prices": {"as_of": self.prices.as_of, "sources": list(self.prices.sources)},
            "models": [_model_dict(m) for m in self.models],
            "total": {
                "jobs": self.jobs,
                "input_tokens": self.input_tokens,
                "max_output_tokens": self.max_output_tokens,
                "typical_output_tokens": self.typical_output_tokens,
                "tokens_charged": self.input_tokens + self.max_output_tokens,
                "cost_low_usd": self.cost_low,
                "cost_high_usd": self.cost_high,
                "unpriced_models": self.unpriced_models,
                "minutes": slowest.minutes if slowest else None,
                "binding_model": slowest.model if slowest else None,
                "models_without_limits": self.models_without_limits,
            },
        }


def _model_dict(m: ModelEstimate) -> dict:
    return {
        "model": m.model,
        "jobs": m.jobs,
        "jobs_by_url": dict(m.jobs_by_url),
        "input_tokens": m.input_tokens,
        "input_exact": m.input_exact,
        "max_output_tokens": m.max_output_tokens,
        "typical_output_tokens": m.typical_output_tokens,
        "tokens_charged": m.tokens_charged,
        "price": None if m.price is None else
        {"input": m.price.input, "cached_input": m.price.cached_input, "output": m.price.output},
        "cost_low_usd": m.cost_low,
        "cost_high_usd": m.cost_high,
        "rpm": m.rpm or None,
        "tpm": m.tpm or None,
        "minutes": m.minutes,
        "binding_limit": m.binding_limit,
        "too_large_jobs": m.too_large_jobs,
        "too_large": [{"line": line, "custom_id": cid, "tokens": tokens} for line, cid, tokens in m.too_large],
    }


# --- The estimate ------------------------------------------------------------------


def estimate_file(
    path: str | os.PathLike,
    *,
    endpoint: str = "/v1/chat/completions",
    limits: Limits | None = None,
    typical_output: int | None = None,
    prices: PriceTable | None = None,
    workers: int | None = None,
    coverage=None,
) -> EstimateReport:
    """Estimate the job file at ``path``.

    ``endpoint`` is the url of bare-body lines (as for submit). ``limits`` are the --rpm/--tpm
    values; ``typical_output`` is tokens per answer; ``prices`` defaults to
    ``PriceTable.load()``. ``workers`` is the number of token-counting processes: None picks
    one per core for files of token_count.PARALLEL_MIN_BYTES or more, 0 counts in this process.
    """
    path = os.fsdecode(path)
    jobs = iter_jobs(path, endpoint=endpoint)  # raises ValueError for an unknown endpoint now
    limits = limits if limits is not None else Limits()
    prices = prices if prices is not None else PriceTable.load()
    totals: dict[str, _ModelTotals] = {}
    errors: list[LineError] = []
    invalid = 0
    pool, workers = token_count.start_pool(path, workers)
    try:
        counter = TextCounter(pool, workers)
        for item in jobs:
            if isinstance(item, LineError):
                invalid += 1
                if len(errors) < KEPT_ERRORS:
                    errors.append(item)
            else:
                _add_job(item, totals, counter, typical_output, limits)
                if coverage is not None:  # what the response cache would serve (ops/cache.py)
                    coverage.add(item.url, item.body, cache=item.cache)
        text_tokens = counter.finish()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    models = tuple(
        _model_estimate(model, totals[model], text_tokens.get(model, 0), typical_output, prices, limits)
        for model in sorted(totals)
    )
    return EstimateReport(path=path, models=models, invalid_lines=invalid, errors=tuple(errors),
                          typical_output=typical_output, prices=prices)


@dataclass
class _ModelTotals:
    """Running sums for one model while the file is read."""

    encoding: str | None  # None: tiktoken could not load it; estimate_tokens counts characters
    jobs_by_url: Counter = field(default_factory=Counter)
    input_tokens: int = 0  # all input but the texts handed to the TextCounter
    exact: bool = True
    max_output: int = 0
    typical_output: int = 0
    tpm: int = 0  # the model's TPM limit, 0: none
    too_large: int = 0  # jobs over it, and their figures (left out of the time)
    too_large_tokens: int = 0
    too_large_kept: list[tuple[int, str, int]] = field(default_factory=list)


#: Jobs too large for the TPM limit listed in the report (all are counted).
TOO_LARGE_KEPT = 20


def _add_job(job: Job, totals: dict[str, _ModelTotals], counter: TextCounter, typical: int | None,
             limits: Limits | None = None) -> None:
    model = job.body["model"]  # jobfile guarantees a non-empty string
    t = totals.get(model)
    if t is None:
        enc = encoding_for(model)
        t = totals[model] = _ModelTotals(enc.name if enc is not None else None,
                                         tpm=limits.for_model(model)[1] if limits is not None else 0)
    t.jobs_by_url[job.url] += 1
    if t.encoding is None:
        # No tiktoken: the budget's own character fallback, job by job (it is cheap).
        est = estimate_tokens(job.url, job.body)
        t.input_tokens += est.input_tokens
        t.exact = t.exact and est.exact
        max_output = est.output_tokens
        charge = est.total
    else:
        prompt, max_output = _walk(job.url, job.body, DEFAULT_MAX_OUTPUT_TOKENS)
        t.input_tokens += prompt.token_ids + prompt.overhead
        if prompt.texts:
            counter.add(model, t.encoding, prompt.texts)
        charge = None
        if t.tpm:
            # A text has at most as many tokens as UTF-8 bytes (4 per character at most): only a
            # job that might not fit is counted on its own, exactly as the budget counts it.
            bound = prompt.token_ids + prompt.overhead + max_output + 4 * sum(map(len, prompt.texts))
            if bound > t.tpm:
                charge = estimate_tokens(job.url, job.body).total
    if t.tpm and charge is not None and charge > t.tpm:  # the budget refuses it at once (reserve.lua)
        t.too_large += 1
        t.too_large_tokens += charge
        if len(t.too_large_kept) < TOO_LARGE_KEPT:
            t.too_large_kept.append((job.line_no, job.custom_id, charge))
    t.max_output += max_output
    if typical is not None:
        # An answer cannot exceed the request's maximum, so the typical figure never tops it.
        t.typical_output += min(typical * _answers(job.url, job.body), max_output)


def _answers(url: str, body: dict) -> int:
    """How many answers a request is billed for, as tokens.py reserves output: n for chat,
    max(n, best_of) for completions (the server generates best_of), one for responses, none
    for embeddings."""
    if url == "/v1/embeddings":
        return 0
    n = _positive_int(body.get("n")) or 1
    if url == "/v1/completions":
        return max(n, _positive_int(body.get("best_of")) or 1)
    if url == "/v1/chat/completions":
        return n
    return 1


def _model_estimate(model: str, t: _ModelTotals, text_tokens: int, typical: int | None,
                    prices: PriceTable, limits: Limits) -> ModelEstimate:
    input_tokens = t.input_tokens + text_tokens
    price = prices.price_for(model)
    low = high = None
    if price is not None:
        low = worst_case_cost(price, input_tokens, t.typical_output if typical is not None else 0)
        high = worst_case_cost(price, input_tokens, t.max_output)
    rpm, tpm = limits.for_model(model)
    jobs = sum(t.jobs_by_url.values())
    # The jobs that can never fit fail at once: they take no time.
    minutes, binding = shortest_minutes(jobs - t.too_large, input_tokens + t.max_output - t.too_large_tokens,
                                        rpm, tpm)
    return ModelEstimate(
        model=model, jobs_by_url=dict(sorted(t.jobs_by_url.items())), input_tokens=input_tokens,
        input_exact=t.exact, max_output_tokens=t.max_output,
        typical_output_tokens=t.typical_output if typical is not None else None,
        price=price, cost_low=low, cost_high=high, rpm=rpm, tpm=tpm, minutes=minutes, binding_limit=binding,
        too_large_jobs=t.too_large, too_large_tokens=t.too_large_tokens, too_large=tuple(t.too_large_kept),
    )


def shortest_minutes(requests: int, tokens_charged: int, rpm: int, tpm: int) -> tuple[float | None, str | None]:
    """(minutes, "rpm" or "tpm") at the limits: max(requests / rpm, tokens / tpm); a limit of 0
    is none. (None, None) with no limit at all. Ignores the server's initial burst and latency."""
    by_rpm = requests / rpm if rpm else None
    by_tpm = tokens_charged / tpm if tpm else None
    if by_rpm is None and by_tpm is None:
        return None, None
    if by_tpm is None or (by_rpm is not None and by_rpm > by_tpm):
        return by_rpm, "rpm"
    return by_tpm, "tpm"

