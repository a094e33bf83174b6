"""The budgets in use, as maintenance and `batchrun limits` see them (not the gate itself:
that is ``limiter.SharedLimiter``)."""

from __future__ import annotations

from batchrun.state import keys
from batchrun.state.budget_headers import stored_number
from batchrun.state.store import BatchStore
from batchrun.text import decoded as _s

HELD_STALE_MS = 40_000  # a runner that has not reported its held reservations for this long is gone...
HELD_REPORTS_MISSED = 4  # ...or for this many of its report intervals (lease / 3), if that is longer


def release_held(store: BatchStore) -> int:
    """Give back the reservations of runners that stopped reporting (maintenance)."""
    released = 0
    for key in store.redis.smembers(keys.BUDGETS):
        key = _s(key)
        if not store.redis.exists(key):
            store.redis.srem(keys.BUDGETS, key)
            continue
        r, _ = store.scripts.release_held(keys=[key, keys.held(key)], args=[HELD_STALE_MS])
        released += int(float(_s(r)))
    return released


def describe_budgets(store: BatchStore) -> list[dict]:
    """What `batchrun limits` shows: each budget in use, its limits and its state now."""
    now_ms = store.server_time_ms()
    out = []
    for key in sorted(_s(k) for k in store.redis.smembers(keys.BUDGETS)):
        h = {_s(k): _s(v) for k, v in store.redis.hgetall(key).items()}
        if not h:
            continue
        endpoint, fingerprint, model = keys.split_budget(key)
        f = {name: stored_number(h.get(name)) for name in ("req", "tok", "ts", "cfg_rpm", "cfg_tpm", "lim_rpm",
                                                         "lim_tpm", "cap_r", "cap_t", "k", "cool_until")}
        rpm = f["cfg_rpm"] or f["lim_rpm"]
        tpm = f["cfg_tpm"] or f["lim_tpm"]
        if f["cfg_rpm"]:  # a configured limit is a ceiling: one second's worth at once (reserve.lua)
            f["cap_r"] = max(1.0, rpm / 60)
        if f["cfg_tpm"]:
            f["cap_t"] = tpm / 60
        elapsed = max(0.0, now_ms - f["ts"])
        out.append({
            "model": model, "endpoint": endpoint, "key_fingerprint": fingerprint,
            "configured_rpm": int(f["cfg_rpm"]), "configured_tpm": int(f["cfg_tpm"]),
            "learnt_rpm": int(f["lim_rpm"]), "learnt_tpm": int(f["lim_tpm"]),
            "burst_rpm": f["cap_r"], "burst_tpm": f["cap_t"],
            "available_rpm": min(f["cap_r"] or rpm, f["req"] + elapsed * rpm / 60000),
            "available_tpm": min(f["cap_t"] or tpm, f["tok"] + elapsed * tpm / 60000),
            "charge_ratio": f["k"] or 1.0,
            "cooldown_seconds": max(0.0, (f["cool_until"] - now_ms) / 1000),
        })
    return out
