"""A batch at a glance: where its jobs are, how fast it goes against the limits, when it
ends and what it costs. ``batch_status`` is what `batchrun status --json` prints (its
fields are documented in the README and kept stable); ``describe`` is the human version.
"""

from __future__ import annotations

from batchrun import keys
from batchrun.pricing import PriceTable
from batchrun.settings import BatchOptions, Limits
from batchrun.store import BatchStore

WINDOW = 60  # seconds of recent counts behind the rates and the ETA


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _float(meta: dict, name: str) -> float:
    try:
        return float(meta.get(name) or 0)
    except ValueError:
        return 0.0


def batch_status(store: BatchStore, batch_id: str) -> dict:
    meta = store.meta(batch_id)
    if not meta:
        raise LookupError(f"no batch {batch_id!r} in this Redis")
    options = BatchOptions.from_fields(meta)
    jobs = store.counts(batch_id)
    recent, span = store.recent_metrics(batch_id, WINDOW)
    now = store.server_time_ms() / 1000
    created = int(_float(meta, "created"))
    span = max(1.0, min(span, now - created)) if created else max(1.0, span)
    per_minute = 60.0 / span

    ended = jobs["done"] + jobs["failed"]
    remaining = max(0, jobs["total"] - ended)
    rate = recent.get("ended", 0) / span  # jobs per second, recently
    state = meta.get("state", "")
    if state == "finished" or remaining == 0:
        eta = 0.0
    elif state == "running" and rate > 0:
        eta = remaining / rate
    else:
        eta = None  # paused, cancelled, or nothing ended lately

    spent = _float(meta, "cost")
    projected = None
    if jobs["done"]:
        # Failed jobs cost nothing; assume the rest succeed at the average cost so far.
        projected = spent / jobs["done"] * max(jobs["done"], jobs["total"] - jobs["failed"])
    prices_as_of = PriceTable.from_json(meta["prices"]).as_of if meta.get("prices") else None

    return {
        "batch_id": batch_id,
        "state": state,
        "reason": meta.get("reason") or None,
        "created_at": created or None,
        "finished_at": int(_float(meta, "finished_at")) or None,
        "source": meta.get("source") or None,
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
            "requests": int(_float(meta, "n_requests")),
            "tokens": int(_float(meta, "n_tokens")),
            "rate_limited": int(_float(meta, "n_rate_limited")),
            "retries": int(_float(meta, "retries")),
        },
        "models": _models(store, options.limits, recent, per_minute),
        "eta_seconds": None if eta is None else round(eta, 1),
        "cost": {
            "spent_usd": round(spent, 6),
            "in_flight_usd": round(max(0.0, _float(meta, "cost_reserved")), 6),
            "unaccounted_usd": round(_float(meta, "cost_unknown"), 6),
            "projected_usd": None if projected is None else round(projected, 6),
            "max_cost_usd": options.max_cost or None,
            "prices_as_of": prices_as_of,
        },
        "fleet": store.fleet_conditions(),
    }


def _models(store: BatchStore, limits: Limits, recent: dict[str, int], per_minute: float) -> list[dict]:
    """Each model's recent pace against its limits: those given with the batch, else those
    the fleet learnt from the server's headers (the highest, if several keys or servers)."""
    learnt: dict[str, tuple[int, int]] = {}
    for key in store.redis.smembers(keys.BUDGETS):
        model = _s(key).split(":", 4)[-1]
        rpm, tpm = (int(float(v or 0)) for v in store.redis.hmget(key, "lim_rpm", "lim_tpm"))
        old = learnt.get(model, (0, 0))
        learnt[model] = (max(old[0], rpm), max(old[1], tpm))
    out = []
    for name in sorted(recent):
        if not name.startswith("requests:"):
            continue
        model = name.split(":", 1)[1]
        rpm, tpm = limits.for_model(model)
        l_rpm, l_tpm = learnt.get(model, (0, 0))
        out.append({
            "model": model,
            "requests_per_minute": round(recent[name] * per_minute, 1),
            "tokens_per_minute": round(recent.get(f"charged:{model}", 0) * per_minute, 1),
            "rpm_limit": rpm or l_rpm or None,
            "tpm_limit": tpm or l_tpm or None,
        })
    return out


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_usd(value: float) -> str:
    return f"${value:.4f}" if value < 10 else f"${value:,.2f}"


def describe(status: dict) -> list[str]:
    """`batchrun status` for a person: a few lines."""
    j, lm, tot, cost = status["jobs"], status["last_minute"], status["totals"], status["cost"]
    ended = j["done"] + j["failed"]
    share = f" ({100 * ended / j['total']:.0f} %)" if j["total"] else ""
    lines = [f"batch {status['batch_id']}: {status['state']}" + (f" — {status['reason']}" if status["reason"] else "")]
    lines.append(f"  jobs: {j['done']} done, {j['failed']} failed, {j['in_flight']} in flight, {j['queued']} queued, "
                 f"{j['waiting_retry']} waiting to retry, of {j['total']}{share}")
    if status["state"] != "finished":
        lines.append(f"  last {lm['seconds']:.0f} s: {lm['requests']} requests, {lm['rate_limited']} rate limited "
                     f"(429), {lm['retries']} retries, {lm['jobs_per_second']:.1f} jobs/s; "
                     f"ends in {format_duration(status['eta_seconds'])}")
    for m in status["models"]:
        rpm = f" of {m['rpm_limit']:,} RPM" if m["rpm_limit"] else ""
        tpm = f" of {m['tpm_limit']:,} TPM" if m["tpm_limit"] else ""
        lines.append(f"  {m['model']}: {m['requests_per_minute']:,.0f} requests/min{rpm}, "
                     f"{m['tokens_per_minute']:,.0f} tokens/min{tpm}")
    lines.append(f"  in all: {tot['requests']} requests, {tot['rate_limited']} rate limited, {tot['retries']} retries")
    money = f"  cost: {format_usd(cost['spent_usd'])} so far"
    if cost["projected_usd"] is not None and status["state"] != "finished":
        money += f", about {format_usd(cost['projected_usd'])} for the whole batch"
    if cost["max_cost_usd"]:
        money += f"; cap {format_usd(cost['max_cost_usd'])}, {format_usd(cost['in_flight_usd'])} set aside for " \
                 f"requests in flight"
    if cost["unaccounted_usd"]:
        money += f", {format_usd(cost['unaccounted_usd'])} counted for requests whose worker died"
    if cost["prices_as_of"]:
        money += f" (prices of {cost['prices_as_of']})"
    lines.append(money)
    held = describe_conditions(status["fleet"])
    if held:
        lines.append(f"  fleet: {held}")
    return lines


def describe_conditions(conditions: dict[str, list[dict]]) -> str:
    """'circuit open for http://…/v1 (4.2 s left); rate limited (gpt-4o-mini): cooling down 1.3 s'."""
    parts = [f"circuit open for {c['endpoint']} ({c['seconds_left']:.1f} s left)" for c in conditions["circuits"]]
    parts += [f"rate limited ({c['model']}): cooling down {c['seconds_left']:.1f} s" for c in conditions["cooldowns"]]
    return "; ".join(parts)
