"""`batchrun endpoints`: the endpoints of the config file with their budgets, slots and health.

The config file's [[endpoints]] (or the single endpoint of OPENAI_BASE_URL / OPENAI_API_KEY),
each with what Redis knows of it: its budgets (state/budgets.describe_budgets, those of its base
URL and key), the fleet-wide slots in use (max_in_flight) and its circuit (up, or down since
when). Keys are never shown: only whether this process's environment has each one.
"""

from __future__ import annotations

from batchrun.endpoints import Endpoint, EndpointKind
from batchrun.policy.days import DaySpent, day_spent, spent_sentence, spent_short
from batchrun.settings import WorkerSettings
from batchrun.state import keys
from batchrun.state.budgets import describe_budgets
from batchrun.state.counters import batch_totals
from batchrun.state.slots import slots_in_use
from batchrun.state.store import BatchStore
from batchrun.text import decoded as _s
from batchrun.urls import mask_url


def endpoint_health(store: BatchStore, base_url: str, now_ms: float) -> dict:
    """The endpoint's circuit as `endpoints` shows it: up, or open (down) until when."""
    h = {_s(k): _s(v) for k, v in store.redis.hgetall(keys.circuit(keys.endpoint_id(base_url))).items()}
    open_until = float(h.get("open_until") or 0)
    if h.get("state") == "open" and open_until > now_ms:
        return {"health": "down", "retry_in_seconds": round((open_until - now_ms) / 1000, 1)}
    return {"health": "up" if h else "unused", "retry_in_seconds": 0.0}


def day_usage(store: BatchStore, ep: Endpoint, model: str, now_ms: float, fingerprint: str | None = None) -> dict:
    """Today's requests and tokens against the endpoint's per-day limits of a model, and when the
    day starts again if it is spent (by those counts, or by the server's per-day 429); {} with no
    per-day limit and no day spent (``fingerprint``: the budget's key's; default the key of this
    process's environment)."""
    rpd, tpd = ep.day_limits(model)
    if fingerprint is None:
        fingerprint = ep.worker_settings(WorkerSettings()).key_fingerprint()
    budget = keys.budget(keys.budget_id(ep.base_url, fingerprint, model))
    fields = {_s(k): _s(v) for k, v in store.redis.hgetall(keys.day_counts(budget)).items()}
    spent = day_spent(fields, endpoint=ep.name, model=model, now_ms=now_ms, rpd=rpd, tpd=tpd)
    if not (rpd or tpd or spent):
        return {}
    today = int(now_ms // 86_400_000)
    same_day = fields.get("day") is not None and int(float(fields["day"])) == today
    req, tok = (int(float(fields.get("req") or 0)), int(float(fields.get("tok") or 0))) if same_day else (0, 0)
    return {"rpd": rpd, "tpd": tpd, "requests_today": req, "tokens_today": tok,
            "day_resumes_in_seconds": round(spent.seconds_left, 1) if spent else 0.0,
            "day_spent": spent.as_json() if spent else None}


def batch_days_spent(store: BatchStore, batch_id: str, now_ms: float, totals: dict[str, int] | None = None
                     ) -> list[DaySpent]:
    """The spent days of the budgets a batch drew from (``via:``) or found spent (``day:``), from
    the records beside their day's counts (day_take.lua, day_spent.lua)."""
    totals = batch_totals(store.redis, [batch_id])[0] if totals is None else totals
    budgets = sorted({name.split(":", 1)[1] for name in totals if name.startswith(("via:", "day:"))})
    if not budgets:
        return []
    pipe = store.redis.pipeline(transaction=False)
    for budget in budgets:
        pipe.hgetall(keys.day_counts(budget))
    out = []
    for budget, raw in zip(budgets, pipe.execute()):
        fields = {_s(k): _s(v) for k, v in raw.items()}
        if not fields.get("endpoint"):
            continue  # no record (or the single endpoint's: no name to say)
        d = day_spent(fields, endpoint=fields["endpoint"], model=keys.split_budget(budget).model, now_ms=now_ms)
        if d is not None:
            out.append(d)
    return out


def describe_endpoints(endpoints: tuple[Endpoint, ...], settings: WorkerSettings,
                       store: BatchStore | None) -> list[dict]:
    """One dict per endpoint: its config, and (with a store) its budgets, slots and health."""
    budgets = describe_budgets(store) if store is not None else []
    now_ms = store.server_time_ms() if store is not None else 0
    out = []
    for ep in endpoints:
        s = ep.worker_settings(settings)
        entry = {
            "name": ep.name, "kind": ep.kind.value, "base_url": mask_url(ep.base_url),
            "models": list(ep.models) or (sorted(ep.deployments) if ep.kind is EndpointKind.AZURE and ep.deployments
                                          else ["(any)"]),
            "deployments": dict(ep.deployments), "api_version": ep.api_version,
            "api_key_env": ep.api_key_env, "key_set": bool(s.api_key) if ep.api_key_env else None,
            "limits": ep.limits.by_model, "max_in_flight": ep.max_in_flight, "via": ep.via.value,
        }
        if store is not None:
            endpoint_id, fingerprint = keys.endpoint_id(ep.base_url), s.key_fingerprint()
            # Without the key here (an operator's shell, not the worker's), every key's budgets at its URL.
            keyless = bool(ep.api_key_env) and not s.api_key
            entry["budgets"] = [{**b, **day_usage(store, ep, b["model"], now_ms, b["key_fingerprint"])}
                                for b in budgets if b["endpoint"] == endpoint_id
                                and (keyless or b["key_fingerprint"] == fingerprint)]
            entry["in_flight"] = slots_in_use(store, ep.base_url) if ep.max_in_flight else None
            entry.update(endpoint_health(store, ep.base_url, now_ms))
        out.append(entry)
    _day_lines(endpoints, out)
    return out


def _day_lines(endpoints: tuple[Endpoint, ...], described: list[dict]) -> None:
    """Each spent day's sentence (``day_spent_line``): whether another endpoint serving the model
    takes it meanwhile."""
    spent = {(e["name"], b["model"]) for e in described for b in e.get("budgets", []) if b.get("day_spent")}
    for ep, e in zip(endpoints, described):
        for b in e.get("budgets", []):
            if not b.get("day_spent"):
                continue
            others = any(o.name != ep.name and o.serves(b["model"]) and (o.name, b["model"]) not in spent
                         for o in endpoints)
            b["day_spent_line"] = spent_sentence(DaySpent.from_json(ep.name, b["day_spent"]), others_carry_on=others,
                                                 of="the config file")


def endpoint_pace(recent: dict[str, int], per_minute: float | None, span: float = 0.0,
                  totals: dict[str, int] | None = None, days: list[DaySpent] = ()) -> list[dict]:
    """A batch's requests and tokens per endpoint over the recent window (the runners count
    ``endpoint:NAME`` and ``endpoint_tok:NAME``), per minute once the window means something
    (else None), with each endpoint's spent days: `status`'s pace per endpoint. Endpoints that
    served the batch before (``totals``) or have a day spent are listed too, at 0. None without
    [[endpoints]] (no counts by name): []."""
    names = {n.split(":", 1)[1] for n in (*recent, *(totals or {})) if n.startswith("endpoint:")}
    names |= {d.endpoint for d in days}
    out = []
    for name in sorted(names):
        n, tok = recent.get(f"endpoint:{name}", 0), recent.get(f"endpoint_tok:{name}", 0)
        out.append({"endpoint": name, "seconds": round(span, 1), "requests": n, "tokens": tok,
                    "requests_per_minute": None if per_minute is None else round(n * per_minute, 1),
                    "tokens_per_minute": None if per_minute is None else round(tok * per_minute, 1),
                    "days_spent": [d.as_json() for d in days if d.endpoint == name]})
    return out


def endpoint_pace_phrase(e: dict) -> str:
    """'openai-a 300 requests/min 12,000 tokens/min' (or the counts over the first seconds)."""
    if e["requests_per_minute"] is None:
        return (f"{e['endpoint']} {e['requests']:,} request{'s' if e['requests'] != 1 else ''} "
                f"{e.get('tokens', 0):,} tokens")
    return (f"{e['endpoint']} {e['requests_per_minute']:,.0f} requests/min "
            f"{e.get('tokens_per_minute') or 0:,.0f} tokens/min")


def pace_line(endpoints: list[dict]) -> str | None:
    """'  endpoints: openai-a 300 requests/min 12,000 tokens/min, azure-east ...' (None: none named)."""
    if not endpoints:
        return None
    first = endpoints[0]
    during = f" (in the first {first['seconds']:.0f} s)" if first["requests_per_minute"] is None else ""
    return "  endpoints: " + ", ".join(endpoint_pace_phrase(e) for e in endpoints) + during


def spent_days(endpoints: list[dict]) -> list[DaySpent]:
    """The spent days listed in `status`'s endpoints, as DaySpent again."""
    return [DaySpent.from_json(e["endpoint"], d) for e in endpoints for d in e.get("days_spent") or []]


def day_lines(endpoints: list[dict]) -> list[str]:
    """One sentence per endpoint's spent day: whether another endpoint of the batch carries on."""
    days = spent_days(endpoints)
    lines = []
    for d in days:
        others = any(e["endpoint"] != d.endpoint and not any(o.endpoint == e["endpoint"] and o.model == d.model
                                                             for o in days) for e in endpoints)
        lines.append(spent_sentence(d, others_carry_on=others))
    return lines


def day_phrases(endpoints: list[dict]) -> list[str]:
    """The progress line's: 'openai-a gpt-4o-mini rpd spent, resumes 00:00 UTC (in 3 h 12 min)'."""
    return [spent_short(d) for d in spent_days(endpoints)]
