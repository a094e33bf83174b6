"""What a job file will cost and how long it must take, before anything is sent.

``estimate_file`` reads a job file (no API calls, no Redis) and reports, per model: the jobs per
endpoint; the input tokens, counted exactly as the shared budget counts them
(``batchrun.policy.tokens.estimate_tokens``); the output tokens the jobs may write at most (their
max_tokens / max_completion_tokens / max_output_tokens times n, or the budget's default) and,
given a typical answer length, a typical figure; a cost range from the price table; and the
shortest wall time the rate limits allow. Invalid lines are counted and reported (file, line,
reason), not fatal.

Speed. Counting tokens is most of the work (tiktoken encodes ~30 MB of text per second on one
core; reading and checking the lines takes less than half as long). So the reader walks each request the
way ``estimate_tokens`` does (``tokens._walk``: the same texts, framing and media figures) and
hands the texts to tiktoken in chunks: deduplicated per chunk, with texts that repeat (system
prompts, tool definitions, role names) remembered, and, for large files, encoded in worker
processes while this one keeps reading. Threads would not help: each of the many short encode
calls has to win the GIL back from the reader. The sums are the same as calling
``estimate_tokens`` on every job; tests/test_estimate.py checks that.
"""

from __future__ import annotations

import logging
import multiprocessing
import operator
import os
import signal
import sys
import threading
from collections import Counter, deque
from collections.abc import Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import tiktoken

from batchrun.files.jobfile import Job, LineError, iter_jobs
from batchrun.policy.pricing import Price, PriceTable, worst_case_cost
from batchrun.settings import Limits
from batchrun.text import format_duration, format_usd, plural
from batchrun.policy.tokens import DEFAULT_MAX_OUTPUT_TOKENS, encoding_for, estimate_tokens

# The walk the budget's estimate makes, so that this one counts requests exactly alike.
from batchrun.policy.prompts import positive_int as _positive_int, walk_request as _walk

__all__ = ["EstimateReport", "ModelEstimate", "count_tokens", "estimate_file", "render_text"]

log = logging.getLogger("batchrun.estimate")

#: Invalid lines kept in the report (all are counted).
KEPT_ERRORS = 100
#: Files at least this large are counted with worker processes (below it, the reader alone
#: finishes in about a quarter of a second).
PARALLEL_MIN_BYTES = 4 * 1024 * 1024
# Characters of text gathered before a chunk goes to tiktoken: ~30 ms of encoding, small
# enough to keep the workers busy, large enough that chunk overhead does not show.
_CHUNK_CHARS = 1_000_000
# Repeated texts remembered per encoding, so a file of unique prompts cannot grow it unbounded.
_KNOWN_TEXTS = 10_000


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
) -> EstimateReport:
    """Estimate the job file at ``path``.

    ``endpoint`` is the url of bare-body lines (as for submit). ``limits`` are the --rpm/--tpm
    values; ``typical_output`` is tokens per answer; ``prices`` defaults to
    ``PriceTable.load()``. ``workers`` is the number of token-counting processes: None picks
    one per core for files of PARALLEL_MIN_BYTES or more, 0 counts in this process.
    """
    path = os.fsdecode(path)
    jobs = iter_jobs(path, endpoint=endpoint)  # raises ValueError for an unknown endpoint now
    limits = limits if limits is not None else Limits()
    prices = prices if prices is not None else PriceTable.load()
    totals: dict[str, _ModelTotals] = {}
    errors: list[LineError] = []
    invalid = 0
    pool, workers = _start_pool(path, workers)
    try:
        counter = _TextCounter(pool, workers)
        for item in jobs:
            if isinstance(item, LineError):
                invalid += 1
                if len(errors) < KEPT_ERRORS:
                    errors.append(item)
            else:
                _add_job(item, totals, counter, typical_output, limits)
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
    input_tokens: int = 0  # all input but the texts handed to the _TextCounter
    exact: bool = True
    max_output: int = 0
    typical_output: int = 0
    tpm: int = 0  # the model's TPM limit, 0: none
    too_large: int = 0  # jobs over it, and their figures (left out of the time)
    too_large_tokens: int = 0
    too_large_kept: list[tuple[int, str, int]] = field(default_factory=list)


#: Jobs too large for the TPM limit listed in the report (all are counted).
TOO_LARGE_KEPT = 20


def _add_job(job: Job, totals: dict[str, _ModelTotals], counter: _TextCounter, typical: int | None,
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


# --- Counting texts ----------------------------------------------------------------


def count_tokens(encoding_name: str, texts: list[str]) -> list[int]:
    """Tokens of each text, as estimate_tokens counts them (``encode_ordinary``). Top-level so
    that worker processes can run it."""
    encode = tiktoken.get_encoding(encoding_name).encode_ordinary
    return [len(encode(text)) for text in texts]


class _TextCounter:
    """Sums tiktoken tokens of texts per model, in chunks, in worker processes if given a pool."""

    def __init__(self, pool: Executor | None, workers: int):
        self._pool = pool
        self._max_in_flight = 2 * workers + 2  # chunks sent but not counted yet: bounds memory
        self.tokens: Counter = Counter()  # model -> text tokens counted so far
        self._pending: dict[str, dict[str, int]] = {}  # model -> text -> times seen in this chunk
        self._pending_chars = 0
        self._encodings: dict[str, str] = {}  # model -> encoding name
        self._known: dict[str, dict[str, int]] = {}  # encoding -> repeated text -> tokens
        self._in_flight: deque[tuple[Future, str, str, list[str], list[int]]] = deque()

    def add(self, model: str, encoding: str, texts: list[str]) -> None:
        known = self._known.get(encoding)
        if known is None:
            known = self._known[encoding] = {}
        pending = self._pending.get(model)
        if pending is None:
            pending = self._pending[model] = {}
            self._encodings[model] = encoding
        counted = 0
        for text in texts:
            tokens = known.get(text)
            if tokens is None:
                pending[text] = pending.get(text, 0) + 1
                self._pending_chars += len(text)
            else:
                counted += tokens
        if counted:
            self.tokens[model] += counted
        if self._pending_chars >= _CHUNK_CHARS:
            self._send()

    def finish(self) -> Counter:
        """Count what is left and wait for every chunk; returns model -> text tokens."""
        self._send()
        while self._in_flight:
            self._settle_oldest()
        return self.tokens

    def _send(self) -> None:
        for model, pending in self._pending.items():
            if not pending:
                continue
            encoding = self._encodings[model]
            texts, times = list(pending), list(pending.values())
            future = self._submit(encoding, texts)
            if future is None:
                self._settle(model, encoding, texts, times, count_tokens(encoding, texts))
            else:
                self._in_flight.append((future, model, encoding, texts, times))
        self._pending = {}
        self._pending_chars = 0
        while len(self._in_flight) > self._max_in_flight:
            self._settle_oldest()

    def _submit(self, encoding: str, texts: list[str]) -> Future | None:
        if self._pool is None:
            return None
        try:
            return self._pool.submit(count_tokens, encoding, texts)
        except Exception as exc:  # a broken or shut-down pool: count here instead
            self._give_up_pool(exc)
            return None

    def _settle_oldest(self) -> None:
        future, model, encoding, texts, times = self._in_flight.popleft()
        try:
            counts = future.result()
        except Exception as exc:  # a worker died (killed, out of memory): same count, here
            self._give_up_pool(exc)
            counts = count_tokens(encoding, texts)
        self._settle(model, encoding, texts, times, counts)

    def _settle(self, model: str, encoding: str, texts: list[str], times: list[int], counts: list[int]) -> None:
        self.tokens[model] += sum(map(operator.mul, counts, times))
        # A text seen twice in one chunk (a system prompt, a role name) will likely come again.
        known = self._known[encoding]
        for text, seen, tokens in zip(texts, times, counts):
            if seen > 1 and len(known) < _KNOWN_TEXTS:
                known[text] = tokens

    def _give_up_pool(self, exc: Exception) -> None:
        if self._pool is not None:
            log.warning("token-counting workers failed (%s: %s); counting in this process",
                        type(exc).__name__, exc)
            self._pool = None


def _start_pool(path: str, workers: int | None) -> tuple[Executor | None, int]:
    """(pool, number of workers), or (None, 0) to count in this process.

    Workers are forked, and only on Linux from a process with no other thread: forking a
    threaded process can deadlock the child, and "spawn"/"forkserver" would run the caller's
    main module again in every worker (an unguarded script would estimate itself over and
    over). A forked worker also inherits the loaded encodings instead of reading them again.
    """
    if workers is None:
        try:
            large = os.path.getsize(path) >= PARALLEL_MIN_BYTES
        except OSError:
            large = False
        cores = os.cpu_count() or 1
        workers = cores if large and cores > 1 else 0  # on one core a worker only takes turns with the reader
    if workers <= 0:
        return None, 0
    if not _fork_is_safe():
        log.debug("counting tokens in this process (no safe way to start workers here)")
        return None, 0
    try:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_ignore_interrupts)
        return pool, workers
    except (OSError, ValueError) as exc:  # e.g. no /dev/shm in a sandbox
        log.info("cannot start token-counting processes (%s); counting in this process", exc)
        return None, 0


def _ignore_interrupts() -> None:
    # Ctrl-C reaches the whole process group: the reader handles it and shuts the pool down,
    # so the workers need not print a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _fork_is_safe() -> bool:
    return (
        sys.platform.startswith("linux")
        and "fork" in multiprocessing.get_all_start_methods()
        and threading.active_count() == 1
    )


# --- Text output -------------------------------------------------------------------


def render_text(report: EstimateReport) -> str:
    """The report as ``batchrun estimate`` prints it (invalid lines are printed separately)."""
    lines = [_headline(report), f"prices: {', then '.join(report.prices.sources)}; USD per 1M tokens"]
    for m in report.models:
        lines += [""] + _model_lines(m, report.typical_output)
    if len(report.models) > 1:
        lines += [""] + _total_lines(report)
    lines += _hints(report)
    return "\n".join(lines)


def _headline(report: EstimateReport) -> str:
    n = len(report.models)
    head = f"{report.path}: {report.jobs:,} job{plural(report.jobs)} for {n} model{plural(n)}"
    if report.invalid_lines:
        head += (f"; {report.invalid_lines:,} invalid line{plural(report.invalid_lines)} skipped "
                 "(listed on stderr) and not counted")
    return head


def _model_lines(m: ModelEstimate, typical: int | None) -> list[str]:
    urls = ", ".join(f"{url} {count:,}" if len(m.jobs_by_url) > 1 else url for url, count in m.jobs_by_url.items())
    how = "tiktoken" if m.input_exact else "by characters: tiktoken could not load its encoding"
    output = f"at most {m.max_output_tokens:,}" if m.max_output_tokens else "none"
    if m.typical_output_tokens is not None and m.max_output_tokens:
        output += f"; typical {m.typical_output_tokens:,} ({typical:,} per answer)"
    lines = [
        f"{m.model}: {m.jobs:,} job{plural(m.jobs)} ({urls})",
        f"  input tokens    {m.input_tokens:,} ({how})",
        f"  output tokens   {output}",
        f"  cost            {_cost_range(m)}",
    ]
    if m.too_large_jobs:
        shown = ", ".join(f"{cid} (line {line}, {tokens:,} tokens)" for line, cid, tokens in m.too_large[:3])
        more = f" and {m.too_large_jobs - 3:,} more" if m.too_large_jobs > 3 else ""
        lines.append(f"  can never fit   {m.too_large_jobs:,} job{plural(m.too_large_jobs)} need more than the "
                     f"{m.tpm:,} TPM limit at once: {shown}{more}; `run` fails them (request_too_large), "
                     f"and the time below leaves them out")
    if m.minutes is not None and m.too_large_jobs < m.jobs:
        lines.append(f"  shortest time   {_limits_line(m)}")
    return lines


def _cost_range(m: ModelEstimate) -> str:
    if m.price is None:
        return "no price known (add it with --prices FILE)"
    low_label = "typical" if m.typical_output_tokens is not None else "input alone"
    return (f"{format_usd(m.cost_low)} ({low_label}) to {format_usd(m.cost_high)} (every answer at its maximum); "
            f"per 1M tokens: input {m.price.input:g}, output {m.price.output:g}")


def _limits_line(m: ModelEstimate) -> str:
    parts = []
    jobs = m.jobs - m.too_large_jobs
    charged = m.tokens_charged - m.too_large_tokens
    if m.rpm:
        parts.append(f"{jobs:,} requests at {m.rpm:,} RPM: {format_duration(jobs / m.rpm * 60)}")
    if m.tpm:
        parts.append(f"{charged:,} token{plural(charged)} charged at {m.tpm:,} TPM: "
                     f"{format_duration(charged / m.tpm * 60)}")
    return f"{format_duration(m.minutes * 60)}, {m.binding_limit.upper()} binds ({'; '.join(parts)})"


def _total_lines(report: EstimateReport) -> list[str]:
    lines = [
        f"total: {report.jobs:,} jobs",
        f"  input tokens    {report.input_tokens:,}",
        f"  output tokens   at most {report.max_output_tokens:,}"
        + (f"; typical {report.typical_output_tokens:,}" if report.typical_output is not None else ""),
    ]
    priced = [m for m in report.models if m.price is not None]
    if priced:
        cost = f"{format_usd(report.cost_low)} to {format_usd(report.cost_high)}"
        if report.unpriced_models:
            cost += f" (without {', '.join(report.unpriced_models)}: no price known)"
        lines.append(f"  cost            {cost}")
    slowest = report.slowest
    if slowest is not None:
        note = f"{slowest.model} sets it: each model has its own limits, and they run side by side"
        if report.models_without_limits:
            note += f"; no limit given for {', '.join(report.models_without_limits)}"
        lines.append(f"  shortest time   {format_duration(slowest.minutes * 60)} ({note})")
    return lines


def _hints(report: EstimateReport) -> list[str]:
    hints = []
    if report.typical_output is None and any(m.max_output_tokens for m in report.models):
        hints.append("add --typical-output N (tokens per answer) for a typical cost, not just the bounds")
    if report.slowest is None and report.models:
        hints.append("add --tpm/--rpm (N, or MODEL=N) to see the shortest time your rate limits allow")
    return [""] + hints if hints else []
