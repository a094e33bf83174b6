"""A batch at a glance: where its jobs are, how fast it goes against the limits, when it
ends and what it costs. ``batch_status`` is what `batchrun status --json` prints (its
fields are documented in the README and kept stable); ``describe`` is the human version.
"""

from __future__ import annotations

from batchrun.ops.endpoints import batch_days_spent, day_lines, endpoint_pace, pace_line
from batchrun.ops.priority import ShareView, share_view
from batchrun.state.keys import split_budget
from batchrun.remote.start import describe_remote, remote_summary
from batchrun.state import keys
from batchrun.state.budget_headers import stored_number
from batchrun.state.counters import batch_totals
from batchrun.policy.pricing import PriceTable
from batchrun.settings import BatchOptions, Limits
from batchrun.state.jobcounts import jobs_ended, jobs_left
from batchrun.state.meta import BatchMeta
from batchrun.state.states import BatchState
from batchrun.state.store import BatchStore
from batchrun.text import format_duration, format_usd

WINDOW = 60  # seconds of recent counts behind the rates and the ETA
# Per-minute rates need this much of a window: over the first seconds of a batch, the server's
# start burst scaled to a minute reads as several times the limit.
MIN_RATE_SECONDS = 30


def share_fields(view: ShareView) -> dict:
    """The batch's priority and its share now, as status --json gives them."""
    return {"priority": view.priority.text, "weight": view.priority.weight, "workers": view.runners,
            "all_workers": view.all_runners, "line": view.line(),
            "budgets": [{"model": split_budget(b.budget_key).model, "share": round(b.share, 3), "batches": b.batches}
                        for b in view.budgets]}


def batch_status(store: BatchStore, batch_id: str) -> dict:
    meta = store.batch_meta(batch_id)
    if meta is None:
        raise LookupError(f"no batch {batch_id!r} in this Redis")
    try:
        options = BatchOptions.from_fields(meta.fields)
    except (ValueError, TypeError, OverflowError, AttributeError):  # unreadable: its runner pauses it, saying why
        options = BatchOptions()
    jobs = store.counts(batch_id)
    recent, span = store.recent_metrics(batch_id, WINDOW)
    now = store.server_time_ms() / 1000
    created = meta.created
    span = max(1.0, min(span, now - created)) if created else max(1.0, span)
    per_minute = 60.0 / span

    rate = recent.get("ended", 0) / span  # jobs per second, recently
    totals = batch_totals(store.redis, [batch_id])[0]  # the named counters since the start (endpoints, budgets)
    days = batch_days_spent(store, batch_id, now * 1000, totals)
    state = meta.state
    eta = _eta(state, jobs_left(jobs), rate)
    return {
        "batch_id": batch_id,
        "state": state or meta.state_text,  # a state this version does not know, as stored
        "reason": meta.reason or None,
        "pause_kind": meta.pause_kind,  # why it paused (policy.decision.PauseKind), None when not paused
        "created_at": created or None,
        "finished_at": meta.finished_at or None,
        "source": meta.source or None,
        "jobs": {name: jobs[name] for name in ("total", "done", "failed", "queued", "in_flight", "waiting_retry")},
        "last_minute": {
            "seconds": round(span, 1),
            "requests": recent.get("requests", 0),
            "tokens": recent.get("tokens", 0),
            "rate_limited": recent.get("rate_limited", 0),
            "retries": recent.get("retries", 0),
            "ended": recent.get("ended", 0),
            "jobs_per_second": round(rate, 2),
        },
        "totals": {
            "requests": meta.n_requests,
            "tokens": meta.n_tokens,
            "rate_limited": meta.n_rate_limited,
            "retries": meta.retries,
        },
        "models": _models(store, options.limits, recent, per_minute if span >= MIN_RATE_SECONDS else None, span),
        "endpoints": endpoint_pace(recent, per_minute if span >= MIN_RATE_SECONDS else None, span, totals,
                                   days),  # [[endpoints]]: [] without
        "eta_seconds": None if eta is None else round(eta, 1),
        "cost": _cost(meta, jobs, options),
        "cache": cache_counts(meta.fields, options),
        "fleet": store.fleet_conditions(),
        "share": share_fields(share_view(store, batch_id)),
        "remote_batches": remote_summary(store, batch_id),  # --via batch-api (remote/start.py)
    }


def cache_counts(fields: dict[str, str], options: BatchOptions) -> dict:
    """The response cache's part of a batch (complete.lua counts each hit with its job's end)."""
    return {"enabled": bool(options.cache), "hits": int(stored_number(fields.get("cache_hits"))),
            "saved_usd": round(stored_number(fields.get("cache_saved")), 6)}


def cache_phrase(cache: dict) -> str:
    """'12 answers from the response cache (not sent, not paid: $0.0421 saved)'."""
    n = cache["hits"]
    return f"{n:,} answer{'s' if n != 1 else ''} from the response cache (not sent, not paid: " \
           f"{format_usd(cache['saved_usd'])} saved)"


def _eta(state: BatchState | None, remaining: int, rate: float) -> float | None:
    if state is BatchState.FINISHED or remaining == 0:
        return 0.0
    if state is BatchState.RUNNING and rate > 0:
        return remaining / rate
    return None  # paused, cancelled, or nothing ended lately


def _cost(meta: BatchMeta, jobs: dict[str, int], options: BatchOptions) -> dict:
    spent = meta.cost
    projected = None
    if jobs["done"] and meta.state is not BatchState.CANCELLED:  # a cancelled batch sends nothing more
        # Failed jobs cost nothing; assume the rest succeed at the average cost so far.
        projected = spent / jobs["done"] * max(jobs["done"], jobs["total"] - jobs["failed"])
    return {
        "spent_usd": round(spent, 6),
        "in_flight_usd": round(max(0.0, meta.cost_reserved), 6),
        "unaccounted_usd": round(meta.cost_unknown, 6),
        "projected_usd": None if projected is None else round(projected, 6),
        "max_cost_usd": options.max_cost or None,
        "prices_as_of": PriceTable.from_json(meta.prices).as_of if meta.prices else None,
    }


def _models(store: BatchStore, limits: Limits, recent: dict[str, int], per_minute: float | None,
            span: float) -> list[dict]:
    """Each model's recent pace against its limits: those given with the batch, else those
    learnt from the server's headers by the budgets this batch drew from lately (runners count
    each request under its budget, ``via:KEY``). Other servers' and keys' budgets are not this
    batch's limits; if it drew from several (keys or servers), their limits add up."""
    learnt: dict[str, tuple[int, int]] = {}
    for name in recent:
        if not name.startswith("via:"):
            continue
        key = name[4:]
        model = keys.split_budget(key).model
        rpm, tpm = (int(stored_number(v)) for v in store.redis.hmget(key, "lim_rpm", "lim_tpm"))
        old = learnt.get(model, (0, 0))
        learnt[model] = (old[0] + rpm, old[1] + tpm)
    out = []
    for name in sorted(recent):
        if not name.startswith("requests:"):
            continue
        model = name.split(":", 1)[1]
        rpm, tpm = limits.for_model(model)
        l_rpm, l_tpm = learnt.get(model, (0, 0))
        out.append({
            "model": model,
            "seconds": round(span, 1),
            "requests": recent[name],
            "tokens": recent.get(f"charged:{model}", 0),
            "requests_per_minute": None if per_minute is None else round(recent[name] * per_minute, 1),
            "tokens_per_minute": None if per_minute is None else round(recent.get(f"charged:{model}", 0) * per_minute,
                                                                       1),
            "rpm_limit": rpm or l_rpm or None,
            "tpm_limit": tpm or l_tpm or None,
        })
    return out


def eta_phrase(status: dict) -> str | None:
    """When the batch ends, in words (None once it has ended): never "unknown" without a reason."""
    j, state = status["jobs"], status["state"]
    if state in (BatchState.FINISHED, BatchState.CANCELLED) or not jobs_left(j):
        return None
    if state == BatchState.PAUSED:
        return "no end in sight while paused"
    if status["eta_seconds"] is None:
        return f"end time not known yet (no job ended in the last {status['last_minute']['seconds']:.0f} s)"
    return f"ends in {format_duration(status['eta_seconds'])}"


def pace(m: dict) -> tuple[str, str]:
    """A model's requests and tokens: per minute against its limits once the window means
    something (MIN_RATE_SECONDS), else the counts over the seconds they cover."""
    if m["requests_per_minute"] is None:
        return f"{m['requests']:,} requests", f"{m['tokens']:,} tokens in the first {m['seconds']:.0f} s"
    return (f"{m['requests_per_minute']:,.0f}" + (f"/{m['rpm_limit']:,} RPM" if m["rpm_limit"] else " req/min"),
            f"{m['tokens_per_minute']:,.0f}" + (f"/{m['tpm_limit']:,} TPM" if m["tpm_limit"] else " tok/min"))


def describe(status: dict) -> list[str]:
    """`batchrun status` for a person: a few lines."""
    j, lm, tot, cost = status["jobs"], status["last_minute"], status["totals"], status["cost"]
    share = f" ({100 * jobs_ended(j) / j['total']:.0f} %)" if j["total"] else ""
    lines = [f"batch {status['batch_id']}: {status['state']}" + (f" — {status['reason']}" if status["reason"] else "")]
    if status["state"] == BatchState.CANCELLED:  # what was queued will not be sent
        lines.append(f"  jobs: {j['done']} done, {j['failed']} failed, {j['in_flight']} in flight, "
                     f"{j['queued'] + j['waiting_retry']} not sent (cancelled), of {j['total']}{share}")
    else:
        lines.append(f"  jobs: {j['done']} done, {j['failed']} failed, {j['in_flight']} in flight, {j['queued']} "
                     f"queued, {j['waiting_retry']} waiting to retry, of {j['total']}{share}")
    if status["state"] not in (BatchState.FINISHED, BatchState.CANCELLED):
        eta = eta_phrase(status)
        lines.append(f"  last {lm['seconds']:.0f} s: {lm['requests']} requests, {lm['rate_limited']} rate limited "
                     f"(429), {lm['retries']} retries, {lm['jobs_per_second']:.1f} jobs/s"
                     + (f"; {eta}" if eta else ""))
    for m in status["models"]:
        if m["requests_per_minute"] is None:
            lines.append(f"  {m['model']}: {m['requests']:,} requests, {m['tokens']:,} tokens in the first "
                         f"{m['seconds']:.0f} s (per-minute rates from {MIN_RATE_SECONDS} s on)")
            continue
        rpm = f" of {m['rpm_limit']:,} RPM" if m["rpm_limit"] else ""
        tpm = f" of {m['tpm_limit']:,} TPM" if m["tpm_limit"] else ""
        lines.append(f"  {m['model']}: {m['requests_per_minute']:,.0f} requests/min{rpm}, "
                     f"{m['tokens_per_minute']:,.0f} tokens/min{tpm}")
    if pace_line(status.get("endpoints") or []):
        lines.append(pace_line(status["endpoints"]))
    lines += [f"  {line}" for line in day_lines(status.get("endpoints") or [])]
    lines.append(f"  in all: {tot['requests']} requests, {tot['rate_limited']} rate limited, {tot['retries']} retries")
    money = f"  cost: {format_usd(cost['spent_usd'])} so far"
    if cost["projected_usd"] is not None and status["state"] != BatchState.FINISHED:
        money += f", about {format_usd(cost['projected_usd'])} for the whole batch"
    if cost["max_cost_usd"]:
        money += f"; cap {format_usd(cost['max_cost_usd'])}, {format_usd(cost['in_flight_usd'])} set aside for " \
                 f"requests in flight" + (" and remote batches" if status.get("remote_batches") else "")
    if cost["unaccounted_usd"]:
        money += f", {format_usd(cost['unaccounted_usd'])} counted for requests whose worker died"
    if cost["prices_as_of"]:
        money += f" (prices of {cost['prices_as_of']})"
    lines.append(money)
    if status.get("share"):
        lines.append(f"  share: {status['share']['line']}")
    lines += describe_remote(status.get("remote_batches") or [])
    if status["cache"]["hits"]:
        lines.append(f"  cache: {cache_phrase(status['cache'])}")
    held = describe_conditions(status["fleet"])
    if held:
        lines.append(f"  fleet: {held}")
    return lines


def describe_conditions(conditions: dict[str, list[dict]]) -> str:
    """'circuit open for http://…/v1 (4.2 s left); rate limited (gpt-4o-mini): cooling down 1.3 s'."""
    parts = [f"circuit open for {c['endpoint']} ({c['seconds_left']:.1f} s left)" for c in conditions["circuits"]]
    parts += [f"rate limited ({c['model']}): cooling down " + (f"{c['seconds_left']:.1f} s" if c["seconds_left"] < 60
                                                               else format_duration(c["seconds_left"]))
              for c in conditions["cooldowns"]]
    return "; ".join(parts)
