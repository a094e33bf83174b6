"""`batchrun endpoints`: the endpoints a worker with this config sends to, their budgets and health."""

from __future__ import annotations

import json

import click

from batchrun.cli.helpers import worker_settings
from batchrun.cli.options import redis_option
from batchrun.endpoints import EndpointsError, configured_endpoints, default_endpoint


def _lines(e: dict) -> list[str]:
    head = f"{e['name']} ({e['kind']}, {e['base_url']})"
    if "health" in e:
        head += f": {e['health']}" + (f", retried in {e['retry_in_seconds']:.0f} s" if e["health"] == "down" else "")
    out = [head, f"  models: {', '.join(e['models'])}",
           "  via: " + ("batch-api (remote batches: /v1/files and /v1/batches, at half price)"
                        if e["via"] == "batch-api" else "live")]
    if e["deployments"]:
        out.append("  deployments: " + ", ".join(f"{m} -> {d}" for m, d in sorted(e["deployments"].items()))
                   + (f" (api-version {e['api_version']})" if e["api_version"] else " (v1 path)"))
    if e["api_key_env"]:
        out.append(f"  key: ${e['api_key_env']} " + ("set" if e["key_set"] else "NOT SET in this environment"))
    limits = [f"{kind} {'every model' if m == '*' else m}={v:,}" for m, entry in sorted(e["limits"].items())
              for kind, v in sorted(entry.items())]
    if limits:
        out.append("  limits: " + "; ".join(limits))
    if e["max_in_flight"]:
        used = e.get("in_flight")
        out.append(f"  max_in_flight {e['max_in_flight']} across the fleet"
                   + (f", {used} open now" if used is not None else ""))
    for b in e.get("budgets", []):
        tpm = b["configured_tpm"] or b["learnt_tpm"]
        rpm = b["configured_rpm"] or b["learnt_rpm"]
        out.append(f"  budget {b['model']}: TPM {tpm or '-'}, RPM {rpm or '-'}; available now "
                   f"{b['available_tpm']:.0f} tokens, {b['available_rpm']:.0f} requests"
                   + (f"; cooling down {b['cooldown_seconds']:.0f} s" if b["cooldown_seconds"] else ""))
        if "requests_today" in b:
            day = [f"{b['requests_today']:,} of {b['rpd']:,} requests" if b["rpd"] else "",
                   f"{b['tokens_today']:,} of {b['tpd']:,} tokens" if b["tpd"] else ""]
            if any(day):
                out.append(f"    today (UTC): {', '.join(d for d in day if d)}")
            if b.get("day_spent_line"):  # "endpoint x: gpt-4o-mini's requests-per-day limit (5) is spent; ..."
                out.append(f"    {b['day_spent_line']}")
    return out


@click.command()
@redis_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def endpoints(redis_url, as_json):
    """The endpoints of the config file ([[endpoints]]), with their budgets, slots and health."""
    from batchrun.ops.endpoints import describe_endpoints
    from batchrun.state.connections import connect, is_memory, resolve_url
    from batchrun.state.store import BatchStore

    settings = worker_settings(None, 30.0)
    try:
        configured = configured_endpoints()
    except EndpointsError as exc:
        raise click.UsageError(str(exc)) from None
    listed = configured or (default_endpoint(settings),)
    url = resolve_url(redis_url)
    store = None if is_memory(url) else BatchStore(connect(url))
    described = describe_endpoints(listed, settings, store)
    if as_json:
        click.echo(json.dumps(described))
        return
    if not configured:
        click.echo("no [[endpoints]] in the config file (--config / BATCHRUN_CONFIG): workers send to the one "
                   "endpoint of OPENAI_BASE_URL / OPENAI_API_KEY")
    for e in described:
        click.echo("\n".join(_lines(e)))
    if store is None:
        click.echo("(no Redis configured: budgets and health not shown; pass --redis-url)")
