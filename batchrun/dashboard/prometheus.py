"""Prometheus metrics of the fleet, read from Redis at each scrape (prometheus_client's custom
collector): what the runners write anyway (the batch hashes, their ``…:counts`` totals, the
budgets, RQ's worker hashes), so that a scrape adds nothing to the hot path and every exporter
(`dashboard`'s /metrics, `worker --metrics-port`) reports the same figures.

Counters are sums over the batches Redis still holds (at most METRICS_BATCHES, the newest): a
batch purged or expired takes its counts with it, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import time
from collections import defaultdict

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from batchrun.dashboard.snapshot import newest_first
from batchrun.state import keys
from batchrun.state.budgets import describe_budgets
from batchrun.state.counters import batch_totals, parse_counter
from batchrun.state.meta import BatchMeta
from batchrun.state.store import BatchStore
from batchrun.state.workers import list_workers

METRICS_BATCHES = 1000  # the newest batches whose counts make the fleet's counters
PER_BATCH = 30  # per-batch series (label batch): the newest this many, and the newest MAX_ACTIVE_SERIES active
MAX_ACTIVE_SERIES = 100  # (a Redis may hold thousands of active batches: a scrape must stay quick)

# name, help (counters get _total from prometheus_client)
COUNTERS = {
    "requests": "Requests answered (or given up without an answer: status_class error), by endpoint, model and status class.",
    "tokens_charged": "Tokens charged to the rate-limit budgets (prompt estimate plus reserved output).",
    "rate_limited": "Requests answered 429 (rate limited).",
    "retries": "Attempts that failed and were queued again, by batch.",
    "jobs_ended": "Jobs that ended, by batch and outcome (done: a result; failed: an error).",
    "cost_usd": "Spent, in US dollars, by batch.",
}


class FleetCollector(Collector):
    def __init__(self, store: BatchStore):
        self.store = store

    def collect(self):
        store = self.store
        ids = store.recent_batches(METRICS_BATCHES)
        active = store.active_batches()
        ids += [bid for bid in active if bid not in ids]
        metas = _metas(store, ids)
        yield from self._budget_counters(ids)
        per_batch = ids[:PER_BATCH] + newest_first(store, [b for b in active if b not in ids[:PER_BATCH]])[:MAX_ACTIVE_SERIES]
        yield from self._batch_series([bid for bid in per_batch if bid in metas], metas)
        yield from self._budget_gauges()
        yield from self._workers(active)

    def _budget_counters(self, ids: list[str]):
        requests: dict[tuple, int] = defaultdict(int)
        tokens: dict[tuple, int] = defaultdict(int)
        limited: dict[tuple, int] = defaultdict(int)
        for totals in batch_totals(self.store.redis, ids):
            for name, n in totals.items():
                parsed = parse_counter(name)
                if parsed is None:
                    continue
                b = keys.split_budget(parsed.budget_key)
                if parsed.kind == "sc":
                    requests[b.endpoint, b.model, parsed.status_class] += n
                elif parsed.kind == "tok":
                    tokens[b.endpoint, b.model] += n
                elif parsed.kind == "rl":
                    limited[b.endpoint, b.model] += n
        yield _counter("requests", ["endpoint", "model", "status_class"], requests)
        yield _counter("tokens_charged", ["endpoint", "model"], tokens)
        yield _counter("rate_limited", ["endpoint", "model"], limited)

    def _batch_series(self, ids: list[str], metas: dict[str, BatchMeta]):
        ids = list(dict.fromkeys(ids))
        ended: dict[tuple, int] = {}
        retries, cost, in_flight, queued, waiting, total = {}, {}, {}, {}, {}, {}
        for batch_id in ids:
            meta = metas[batch_id]
            jobs = self.store.counts(batch_id)
            ended[batch_id, "done"], ended[batch_id, "failed"] = meta.done, meta.failed
            retries[batch_id,], cost[batch_id,] = meta.retries, meta.cost
            in_flight[batch_id,], queued[batch_id,] = jobs["in_flight"], jobs["queued"]
            waiting[batch_id,], total[batch_id,] = jobs["waiting_retry"], meta.total
        yield _counter("jobs_ended", ["batch", "outcome"], ended)
        yield _counter("retries", ["batch"], retries)
        yield _counter("cost_usd", ["batch"], cost)
        yield _gauge("batchrun_requests_in_flight", "Requests sent and not answered yet, by batch.", ["batch"], in_flight)
        yield _gauge("batchrun_jobs_queued", "Jobs waiting to be sent, by batch.", ["batch"], queued)
        yield _gauge("batchrun_jobs_waiting_retry", "Jobs waiting out a backoff before their next attempt, by batch.",
                     ["batch"], waiting)
        yield _gauge("batchrun_jobs", "Jobs in the batch.", ["batch"], total)
        states = GaugeMetricFamily("batchrun_batch_state", "1 for the state each batch is in.", labels=["batch", "state"])
        for batch_id in ids:
            states.add_metric([batch_id, metas[batch_id].state_text or "unknown"], 1)
        yield states

    def _budget_gauges(self):
        budgets = describe_budgets(self.store)
        labels = ["endpoint", "model", "key"]
        families = {
            "available_requests": ("batchrun_budget_available_requests", "Requests the budget allows now."),
            "available_tokens": ("batchrun_budget_available_tokens", "Tokens the budget allows now."),
            "rpm": ("batchrun_budget_limit_requests_per_minute", "The budget's requests-per-minute limit (configured, else learnt)."),
            "tpm": ("batchrun_budget_limit_tokens_per_minute", "The budget's tokens-per-minute limit (configured, else learnt)."),
            "cooldown": ("batchrun_budget_cooldown_seconds", "Seconds left of the budget's cooldown after a 429."),
        }
        values: dict[str, dict] = {name: {} for name in families}
        for b in budgets:
            at = (b["endpoint"], b["model"], b["key_fingerprint"])
            values["available_requests"][at] = b["available_rpm"]
            values["available_tokens"][at] = b["available_tpm"]
            values["rpm"][at] = b["configured_rpm"] or b["learnt_rpm"]
            values["tpm"][at] = b["configured_tpm"] or b["learnt_tpm"]
            values["cooldown"][at] = b["cooldown_seconds"]
        for name, (metric, text) in families.items():
            yield _gauge(metric, text, labels, values[name])

    def _workers(self, active: list[str]):
        workers = list_workers(self.store.redis, time.time(), active)
        alive = GaugeMetricFamily("batchrun_workers", "Workers registered on this Redis, by whether their "
                                  "heartbeat is recent.", labels=["alive"])
        alive.add_metric(["true"], sum(w.alive for w in workers))
        alive.add_metric(["false"], sum(not w.alive for w in workers))
        yield alive


def _metas(store: BatchStore, ids: list[str]) -> dict[str, BatchMeta]:
    pipe = store.redis.pipeline(transaction=False)
    for batch_id in ids:
        pipe.hgetall(keys.batch(batch_id))
    return {bid: BatchMeta.from_hash(raw) for bid, raw in zip(ids, pipe.execute() if ids else []) if raw}


def _counter(name: str, labels: list[str], values: dict[tuple, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(f"batchrun_{name}", COUNTERS[name], labels=labels)
    for at, n in sorted(values.items()):
        family.add_metric(list(at), n)
    return family


def _gauge(name: str, text: str, labels: list[str], values: dict[tuple, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text, labels=labels)
    for at, n in sorted(values.items()):
        family.add_metric(list(at), n)
    return family


def fleet_registry(store: BatchStore) -> CollectorRegistry:
    """A registry holding only the fleet's metrics (no process metrics of the exporter itself)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(store))
    return registry


def serve_metrics(store: BatchStore, host: str, port: int):
    """/metrics of the fleet on host:port, from a daemon thread (`worker --metrics-port`). Returns the
    server (its ``server_port`` is the port, for port 0). Raises OSError if it cannot listen.
    A scrape while Redis is down answers 503 with a sentence (not wsgiref's traceback)."""
    import socket
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args) -> None:  # a line per scrape is noise in the worker's log
            pass

    app = make_wsgi_app(fleet_registry(store))

    def guarded(environ, start_response):
        try:
            return app(environ, start_response)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            text = f"cannot read Redis ({exc}); check that the server runs and --redis-url\n"
            start_response("503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
            return [text.encode()]

    server = make_server(sockaddr[0], port, guarded, Server, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True, name="batchrun-metrics").start()
    return server
