"""`worker`: the processes that send the queued batches' requests."""

from __future__ import annotations

import logging
import os
import sys

import click

from batchrun.cli.helpers import fail, worker_settings
from batchrun.cli.options import Number, redis_option, request_timeout_option
from batchrun.endpoints import configured_endpoints, missing_keys
from batchrun.settings import MAX_CONCURRENCY, set_worker_settings
from batchrun.state.connections import ENV_URL, connect, describe, is_memory, resolve_url
from batchrun.urls import mask_url

log = logging.getLogger("batchrun")


@click.command()
@redis_option
@click.option("--concurrency", "-c", type=click.IntRange(1, MAX_CONCURRENCY), default=None,
              help="Requests in flight per process (default 100, at most 10,000).")
@click.option("--processes", "-p", type=click.IntRange(1), default=1, show_default=True, help="Worker processes (supervised).")
@click.option("--burst", is_flag=True, help="Exit once no batch this Redis holds has work left (retries included).")
@click.option("--name", default=None, help="Worker name shown by `rq info`.")
@click.option("--grace", type=Number(0), default=30.0, show_default=True,
              help="On SIGTERM/Ctrl-C, seconds in-flight requests get to finish (a second signal stops at once).")
@request_timeout_option
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics of the fleet (read from Redis) on this port, at /metrics.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address for --metrics-port.")
def worker(redis_url, concurrency, processes, burst, name, grace, request_timeout, metrics_port, metrics_host):
    """Run worker process(es) that send the queued batches' requests.

    OPENAI_API_KEY and OPENAI_BASE_URL are read from the environment.
    """
    from batchrun.runner.worker import make_worker, preload_encodings, run_pool

    url = resolve_url(redis_url)
    if is_memory(url):
        fail(f"a worker needs a shared Redis: pass --redis-url or set {ENV_URL} "
             "(or use `batchrun run`, which runs workers in process)", 2)
    if request_timeout is not None:  # through the environment, which the worker processes inherit
        os.environ["BATCHRUN_REQUEST_TIMEOUT"] = repr(request_timeout)
    settings = worker_settings(concurrency, grace)
    endpoints = configured_endpoints()  # [[endpoints]] of --config (checked with the file): their own keys
    if endpoints and missing_keys(endpoints):
        fail("; ".join(missing_keys(endpoints)))
    if not endpoints and not settings.api_key:
        fail("OPENAI_API_KEY is not set in this worker's environment; export it "
             "(it is read from the environment only, never stored in Redis)")
    if metrics_port is not None:  # in the supervising process only: the pool's workers do not get the option
        _serve_metrics(url, metrics_host, metrics_port)
    if processes > 1:
        # The Redis URL (it may hold a password) goes through the environment, not the command line.
        os.environ[ENV_URL] = url
        argv = ["--processes", "1", "--grace", str(grace)] + (["--concurrency", str(concurrency)] if concurrency else [])
        argv += ["--burst"] if burst else []
        sys.exit(run_pool(argv, processes, burst=burst))
    set_worker_settings(settings)
    preload_encodings(freeze=True)
    redis = connect(url)
    w = make_worker(redis, burst=burst, name=name)
    named = configured_endpoints()  # the config file's [[endpoints]] replace OPENAI_BASE_URL
    target = ("endpoints " + ", ".join(e.name for e in named)) if named else mask_url(settings.base_url)
    log.info("worker %s on %s, sending to %s with %d in flight%s", w.name, describe(url), target,
             settings.concurrency, " (burst)" if burst else "")
    w.work(burst=burst, logging_level=logging.getLogger("rq.worker").getEffectiveLevel())  # as -v/-vv set it


def _serve_metrics(url: str, host: str, port: int) -> None:
    from batchrun.dashboard.prometheus import serve_metrics
    from batchrun.state.store import BatchStore

    try:
        serve_metrics(BatchStore(connect(url)), host, port)
    except OSError as exc:
        fail(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); choose another --metrics-port", 2)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, port)
