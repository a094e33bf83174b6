"""`batchrun endpoints`: the endpoints of the config file with their budgets, slots and health.

The config file's [[endpoints]] (or the single endpoint of OPENAI_BASE_URL / OPENAI_API_KEY),
each with what Redis knows of it: its budgets (state/budgets.describe_budgets, those of its base
URL and key), the fleet-wide slots in use (max_in_flight) and its circuit (up, or down since
when). Keys are never shown: only whether this process's environment has each one.
"""

from __future__ import annotations

from batchrun.endpoints import Endpoint, EndpointKind
from batchrun.settings import WorkerSettings
from batchrun.state import keys
from batchrun.state.budgets import describe_budgets
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
    """Today's requests and tokens against the endpoint's per-day limits of a model (none: {}),
    and when the day starts again if they are spent (``fingerprint``: the budget's key's; default
    the key of this process's environment)."""
    rpd, tpd = ep.day_limits(model)
    if not (rpd or tpd):
        return {}
    if fingerprint is None:
        fingerprint = ep.worker_settings(WorkerSettings()).key_fingerprint()
    budget = keys.budget(keys.budget_id(ep.base_url, fingerprint, model))
    day, req, tok = (_s(x) for x in store.redis.hmget(keys.day_counts(budget), "day", "req", "tok"))
    today = int(now_ms // 86_400_000)
    req, tok = (int(float(req or 0)), int(float(tok or 0))) if day is not None and int(day) == today else (0, 0)
    spent = (rpd and req >= rpd) or (tpd and tok >= tpd * 0.999)
    return {"rpd": rpd, "tpd": tpd, "requests_today": req, "tokens_today": tok,
            "day_resumes_in_seconds": round((today + 1) * 86_400_000 - now_ms) / 1000 if spent else 0.0}


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
    return out


def endpoint_pace(recent: dict[str, int], per_minute: float | None) -> list[dict]:
    """A batch's requests per endpoint over the recent window (the runners count ``endpoint:NAME``),
    per minute once the window means something (else None): `status`'s pace per endpoint."""
    out = []
    for name, n in sorted(recent.items()):
        if name.startswith("endpoint:"):
            out.append({"endpoint": name.split(":", 1)[1], "requests": n,
                        "requests_per_minute": None if per_minute is None else round(n * per_minute, 1)})
    return out


def pace_line(endpoints: list[dict]) -> str | None:
    """'  endpoints: openai-a 300 requests/min, azure-east 120 requests/min' (None: none named)."""
    if not endpoints:
        return None
    parts = [f"{e['endpoint']} " + (f"{e['requests']:,} requests" if e["requests_per_minute"] is None
                                    else f"{e['requests_per_minute']:,.0f} requests/min") for e in endpoints]
    return "  endpoints: " + ", ".join(parts)
