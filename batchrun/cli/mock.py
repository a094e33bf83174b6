"""``batchrun mock-server``: the click command over ``batchrun.mock``."""

from __future__ import annotations

import errno
import math

import click

from batchrun.mock.config import FAULT_KINDS, MockConfig


def _parse_error_rates(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    rates = {}
    for value in values:
        kind, sep, rate = value.partition("=")
        try:
            if not sep or kind not in FAULT_KINDS:
                raise ValueError
            rates[kind] = float(rate)
            if not 0.0 <= rates[kind] <= 1.0:
                raise ValueError
        except ValueError:
            raise click.BadParameter(
                f"{value!r}: expected KIND=P with KIND one of {', '.join(FAULT_KINDS)} and P in [0, 1]",
                ctx=ctx,
                param=param,
            ) from None
    return rates


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value):  # NaN and the infinities pass FloatRange's checks
        raise click.BadParameter(f"{value!r} is not a finite number", ctx=ctx, param=param)
    return value


@click.command("mock-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
    help="Port to listen on (0 picks a free one)."
)
@click.option(
    "--rpm",
    type=click.IntRange(min=1),
    help="Requests per minute, per API key and model, as OpenAI counts them [default: unlimited].",
)
@click.option(
    "--tpm",
    type=click.IntRange(min=1),
    help="Tokens per minute, per API key and model; a request is charged its prompt estimate plus "
    "max_tokens x n at admission [default: unlimited].",
)
@click.option(
    "--burst-seconds",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    callback=_finite,
    help="Bucket capacity in seconds of refill: limit * BURST / 60 can be spent at once.",
)
@click.option("--latency-ms", default=0.0, show_default=True, type=click.FloatRange(0), callback=_finite,
              help="Time to first token.")
@click.option(
    "--latency-per-token-ms",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    callback=_finite,
    help="Extra time per output token (streams spread it over their chunks).",
)
@click.option(
    "--error-rate",
    "error_rate",
    multiple=True,
    callback=_parse_error_rates,
    metavar="KIND=P",
    help=f"Inject a fault with probability P; repeatable. KIND: {', '.join(FAULT_KINDS)}. "
    "Example: --error-rate 500=0.05 --error-rate stream_disconnect=0.02",
)
@click.option(
    "--count",
    type=click.Choice(["chars", "tiktoken"]),
    default="chars",
    show_default=True,
    help="How admission estimates prompt tokens: chars/4 (as OpenAI does) or exact tiktoken.",
)
@click.option(
    "--default-max-tokens",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Output cap of requests that set no max_tokens.",
)
@click.option("--seed", type=int, help="Seed for fault injection, for reproducible runs.")
@click.option(
    "--retry-after-header",
    is_flag=True,
    help="Add retry-after-ms and retry-after headers to rate-limit 429s (OpenAI sends them only sometimes).",
)
@click.option("--batch-seconds", default=2.0, show_default=True, type=click.FloatRange(0, 86400),
              callback=_finite, help="Batch API: seconds from a remote batch's creation to its end.")
@click.option("--batch-error-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Batch API: share of lines that fail with a 500.")
@click.option("--batch-expire-fraction", default=None, type=click.FloatRange(0, 1),
              help="Batch API: remote batches expire with only this share of lines done.")
@click.option("--batch-queue-tokens", default=None, type=click.IntRange(1),
              help="Batch API: enqueued tokens per model at most (a batch over it fails validation).")
def mock_server_command(
    host: str,
    port: int,
    rpm: int | None,
    tpm: int | None,
    burst_seconds: float,
    latency_ms: float,
    latency_per_token_ms: float,
    error_rate: dict[str, float],
    count: str,
    default_max_tokens: int,
    seed: int | None,
    retry_after_header: bool,
    batch_seconds: float = 2.0,
    batch_error_rate: float = 0.0,
    batch_expire_fraction: float | None = None,
    batch_queue_tokens: int | None = None,
) -> None:
    """Run an OpenAI-compatible mock server with OpenAI's rate limits and injectable faults."""
    from batchrun.mock.harness import serve  # aiohttp's server: imported only by this command

    config = MockConfig(
        rpm=rpm,
        tpm=tpm,
        burst_seconds=burst_seconds,
        latency_ms=latency_ms,
        latency_per_token_ms=latency_per_token_ms,
        error_rates=error_rate,
        count=count,
        seed=seed,
        retry_after_header=retry_after_header,
        default_max_tokens=default_max_tokens,
        batch_seconds=batch_seconds,
        batch_error_rate=batch_error_rate,
        batch_expire_fraction=batch_expire_fraction,
        batch_queue_tokens=batch_queue_tokens,
    )
    try:
        serve(host, port, config)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise click.BadParameter(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port (0: any free one)"
            + (" or --host" if exc.errno != errno.EADDRINUSE else ""),
            param_hint="--port",
        ) from None
