"""``batchrun estimate``'s text output: an ``ops.estimate.EstimateReport`` as a person reads it.

Presentation only, so it lives with the CLI; the Python API's report is ``EstimateReport`` itself
and its ``to_dict()`` (what ``--json`` prints).
"""

from __future__ import annotations


from batchrun.ops.estimate import EstimateReport, ModelEstimate
from batchrun.policy.pricing import BATCH_API_SHARE
from batchrun.text import format_duration, format_usd, plural

__all__ = ["batch_api_costs", "batch_api_text", "render_text"]


def render_text(report: EstimateReport, via: str = "live") -> str:
    """The report as ``batchrun estimate`` prints it (invalid lines are printed separately);
    with ``via="batch-api"`` the Batch API's cost too."""
    lines = [_headline(report), f"prices: {', then '.join(report.prices.sources)}; USD per 1M tokens"]
    for m in report.models:
        lines += [""] + _model_lines(m, report.typical_output)
    if len(report.models) > 1:
        lines += [""] + _total_lines(report)
    if via == "batch-api" and any(m.price is not None for m in report.models):
        lines += ["", batch_api_text(report)]
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


def batch_api_costs(report: EstimateReport) -> dict:
    """The cost through OpenAI's Batch API (--via batch-api): the live cost at BATCH_API_SHARE."""
    return {"share_of_live_price": BATCH_API_SHARE, "cost_low_usd": report.cost_low * BATCH_API_SHARE,
            "cost_high_usd": report.cost_high * BATCH_API_SHARE, "live_cost_low_usd": report.cost_low,
            "live_cost_high_usd": report.cost_high}


def batch_api_text(report: EstimateReport) -> str:
    c = batch_api_costs(report)
    without = f", without {', '.join(report.unpriced_models)}: no price known" if report.unpriced_models else ""
    return (f"via the Batch API: {format_usd(c['cost_low_usd'])} to {format_usd(c['cost_high_usd'])} "
            f"({BATCH_API_SHARE:.0%} of the live {format_usd(report.cost_low)} to {format_usd(report.cost_high)}"
            f"{without}; done within 24 hours, outside your rate limits)")
