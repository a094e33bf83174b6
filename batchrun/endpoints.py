"""The endpoints a worker sends to: ``[[endpoints]]`` tables of the config file, typed and checked.

Pure (no Redis, no HTTP): a config file's ``endpoints`` array becomes a tuple of ``Endpoint``,
or every mistake in it as one sentence each, naming the file, the table (its index and name)
and the field. With no ``[[endpoints]]`` the worker keeps its single endpoint from
OPENAI_BASE_URL / OPENAI_API_KEY. An endpoint names the environment variable that holds its
key (``api_key_env``): the key is read by the worker that sends, never written anywhere.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from urllib.parse import urlsplit

from batchrun.settings import Limits, WorkerSettings
from batchrun.urls import mask_url

CONFIG_ENV = "BATCHRUN_CONFIG"
MAX_IN_FLIGHT = 100_000  # past this a typo: no server holds that many requests open
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# An OpenAI key, or a long token of digits and lower-case letters (an Azure key): not a variable's name.
_KEY_RE = re.compile(r"^(sk|rk)[-_]|^(?=.*\d)(?=.*[a-z])[A-Za-z0-9]{32,}$")
_DATED_VERSION_RE = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
_API_VERSION_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}(-preview)?|v1|latest|preview)$")


class EndpointVia(str, Enum):
    """How an endpoint is sent to (its ``via`` field)."""

    LIVE = "live"  # one request at a time, at its limits
    BATCH_API = "batch-api"  # remote batches: /v1/files and /v1/batches, at half price


class EndpointKind(str, Enum):
    OPENAI = "openai"  # OpenAI, or any server speaking its API (vLLM, a proxy)
    AZURE = "azure"  # Azure OpenAI: the api-key header, deployment paths


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of the fleet: where to send, with which key, which models, at what limits."""

    name: str
    base_url: str
    kind: EndpointKind = EndpointKind.OPENAI
    api_key_env: str = ""  # the environment variable holding its key ('' : none, a local server)
    models: tuple[str, ...] = ()  # the models it serves; empty: every model (azure: its deployments)
    deployments: dict[str, str] = field(default_factory=dict)  # azure: model -> deployment name
    api_version: str = ""  # azure: deployment paths with ?api-version=...; '': the v1 path
    limits: Limits = field(default_factory=Limits)  # its own per-minute limits (tpm, rpm)
    max_in_flight: int = 0  # requests open at once across the fleet; 0: no cap
    per_day: Limits = field(default_factory=Limits)  # rpd, tpd: kept as rpm/tpm entries of a day's worth
    via: EndpointVia = EndpointVia.LIVE  # batch-api: it takes its models' remote batches, live requests only as a last resort

    @property
    def deployment_paths(self) -> bool:
        """Azure's deployment paths (a dated api_version: they take no other); else the v1 path,
        where 'v1', 'latest' or 'preview' go as its api-version."""
        return self.kind is EndpointKind.AZURE and bool(_DATED_VERSION_RE.match(self.api_version))

    def day_limits(self, model: str) -> tuple[int, int]:
        """(requests, tokens) per day for a model; 0 means no limit."""
        return self.per_day.for_model(model)

    def cache_identity(self, model: str) -> tuple[str, str]:
        """(base URL, Azure deployment or '') of this endpoint for a model: the server part of the
        response cache's key (policy/cache_entries.py cache_server)."""
        return self.base_url, self.deployments.get(model, "") if self.kind is EndpointKind.AZURE else ""

    def serves(self, model: str) -> bool:
        if self.models:
            return model in self.models
        if self.kind is EndpointKind.AZURE and self.deployments:
            return model in self.deployments
        return True

    def api_key(self, env=None) -> str:
        env = os.environ if env is None else env
        return env.get(self.api_key_env, "") if self.api_key_env else ""

    def missing_key(self, env=None) -> str | None:
        """A sentence if the key's variable is named but unset in this process."""
        if self.api_key_env and not self.api_key(env):
            return (f"endpoint {self.name!r}: its key variable {self.api_key_env} is not set in this worker's "
                    f"environment; export it (the key stays in the worker, never in Redis)")
        return None

    def worker_settings(self, base: WorkerSettings, env=None) -> WorkerSettings:
        """The worker's settings for sending to this endpoint (its URL and key)."""
        return replace(base, base_url=self.base_url, api_key=self.api_key(env))


class EndpointsError(ValueError):
    """A config file's [[endpoints]] that cannot work: every problem, one sentence each."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


_FIELDS = ("name", "kind", "base_url", "api_key_env", "models", "deployments", "api_version", "tpm", "rpm",
           "rpd", "tpd", "max_in_flight", "via")


def parse_endpoints(path: str, raw: object) -> tuple[Endpoint, ...]:
    """The ``endpoints`` value of a config file (a TOML array of tables) as Endpoints; raises
    EndpointsError naming ``path``, each table and field at fault."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise EndpointsError([f"{path}: 'endpoints' must be [[endpoints]] tables, one per endpoint"])
    problems: list[str] = []
    out: list[Endpoint] = []
    seen: dict[str, int] = {}
    for i, table in enumerate(raw, 1):
        where = f"{path}, [[endpoints]] #{i}" + (f" ({table['name']!r})" if isinstance(table.get("name"), str) else "")
        endpoint = _parse_one(where, table, problems)
        if endpoint is None:
            continue
        if endpoint.name in seen:
            problems.append(f"{where}: name {endpoint.name!r} is already endpoint #{seen[endpoint.name]}'s; "
                            f"give each endpoint its own name")
            continue
        seen[endpoint.name] = i
        out.append(endpoint)
    if problems:
        raise EndpointsError(problems)
    return tuple(out)


def _parse_one(where: str, t: dict, problems: list[str]) -> Endpoint | None:
    before = len(problems)

    def bad(key: str, why: str, shown=None) -> None:
        problems.append(f"{where}: {key} = {t.get(key) if shown is None else shown!r}: {why}")

    for key in t:
        if key not in _FIELDS:
            import difflib

            close = difflib.get_close_matches(key, _FIELDS, n=1)
            problems.append(f"{where}: unknown field {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    name = t.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.append(f"{where}: name is {'missing' if name is None else repr(name)}; give each endpoint a name "
                        f"of letters, digits, '.', '_' or '-' (up to 64)")
    try:
        kind = EndpointKind(t.get("kind", "openai"))
    except ValueError:
        bad("kind", "must be 'openai' (any OpenAI-compatible server) or 'azure'")
        kind = EndpointKind.OPENAI
    base_url = t.get("base_url")
    parts = urlsplit(base_url) if isinstance(base_url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        # (shown masked: a URL that does not parse may still carry a password)
        bad("base_url", "must be an http:// or https:// URL", mask_url(base_url) if isinstance(base_url, str) else None)
    elif parts.username or parts.password:
        problems.append(f"{where}: base_url must not hold credentials; name the key's variable in api_key_env")
    key_env = t.get("api_key_env", "")
    if isinstance(key_env, str) and key_env and (not _ENV_RE.match(key_env) or _KEY_RE.match(key_env)):
        # Never echoed: what is written there may well be the key itself.
        problems.append(f"{where}: api_key_env " + ("looks like a key itself" if _KEY_RE.match(key_env) else
                                                    "is not the name of an environment variable")
                        + "; put the key in an environment variable and name that variable here "
                          "(the key itself never goes in the file)")
    elif not isinstance(key_env, str):
        bad("api_key_env", "must be the name of an environment variable (the key itself never goes in the file)")
    models = t.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) and m.strip() for m in models):
        bad("models", "must be a list of model names")
        models = []
    deployments = t.get("deployments", {})
    if not isinstance(deployments, dict) or not all(isinstance(v, str) and v for v in deployments.values()):
        bad("deployments", "must be a table of model = \"deployment name\"")
        deployments = {}
    elif deployments and kind is not EndpointKind.AZURE:
        problems.append(f"{where}: deployments are for kind = \"azure\" endpoints")
    api_version = t.get("api_version", "")
    if not isinstance(api_version, str) or (api_version and not _API_VERSION_RE.match(api_version)):
        bad("api_version", "must be an Azure API version such as \"2024-10-21\"")
    elif api_version and kind is not EndpointKind.AZURE:
        problems.append(f"{where}: api_version is for kind = \"azure\" endpoints")
    limits = _limits(where, t, problems)
    per_day = _limits(where, t, problems, per_day=True)
    max_in_flight = t.get("max_in_flight", 0)
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) \
            or not 0 <= max_in_flight <= MAX_IN_FLIGHT:
        bad("max_in_flight", f"must be a whole number from 1 to {MAX_IN_FLIGHT:,} (leave it out for no cap)")
        max_in_flight = 0
    via = _via(where, t, kind, problems)
    if len(problems) > before:
        return None
    return Endpoint(name=name, base_url=base_url.rstrip("/"), kind=kind, api_key_env=key_env,
                    models=tuple(m.strip() for m in models), deployments=dict(deployments),
                    api_version=api_version, limits=limits, max_in_flight=max_in_flight,
                    per_day=per_day, via=via)


def _via(where: str, t: dict, kind: EndpointKind, problems: list[str]) -> EndpointVia:
    raw = t.get("via", "live")
    if raw == "auto":
        problems.append(f"{where}: via = 'auto': an endpoint has no deadline to split by; give the batch "
                        f"--via auto --deadline DURATION instead (its remote share goes to the model's "
                        f"via = \"batch-api\" endpoints), or set via to 'live' or 'batch-api'")
        return EndpointVia.LIVE
    try:
        via = EndpointVia(raw)
    except (ValueError, TypeError):
        problems.append(f"{where}: via = {raw!r}: must be 'live' (the default: requests one by one) or "
                        f"'batch-api' (remote batches through /v1/files and /v1/batches, at half price)")
        return EndpointVia.LIVE
    if via is EndpointVia.BATCH_API and kind is EndpointKind.AZURE:
        problems.append(f"{where}: via = 'batch-api' is for OpenAI's Batch API; batchrun does not send remote "
                        f"batches to Azure OpenAI (its Batch API needs global-batch deployments and other paths), "
                        f"so leave via out (live) for kind = \"azure\" endpoints")
    return via


def _limits(where: str, t: dict, problems: list[str], per_day: bool = False) -> Limits:
    """tpm/rpm (or, per_day, tpd/rpd, held as a Limits whose numbers are a day's worth)."""
    limits = Limits()
    for kind in ("rpm", "tpm"):
        field_name = kind.replace("m", "d") if per_day else kind
        specs = t.get(field_name, [])
        if isinstance(specs, (str, int)) and not isinstance(specs, bool):
            specs = [str(specs)]
        if not isinstance(specs, list):
            problems.append(f"{where}: {field_name} must be a list such as [\"gpt-4o-mini=2000000\"]")
            continue
        for spec in specs:
            if isinstance(spec, float) and math.isfinite(spec):
                spec = str(spec)
            try:
                limits.set(kind, str(spec))
            except ValueError as exc:
                message = str(exc).replace("--" + kind, field_name).replace("per minute", "per day" if per_day
                                                                            else "per minute")
                problems.append(f"{where}: {message}")
    return limits


def load_endpoints(path: str) -> tuple[Endpoint, ...]:
    """The endpoints of a config file (none: the file has no [[endpoints]]). Raises EndpointsError
    (and OSError for a file that cannot be read)."""
    import tomllib

    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise EndpointsError([f"{path}: {exc}"]) from None
    return parse_endpoints(path, data["endpoints"]) if "endpoints" in data else ()


_CACHE: dict[tuple[str, float], tuple[Endpoint, ...]] = {}


def configured_endpoints(env=None) -> tuple[Endpoint, ...]:
    """The endpoints of the config file this process was given (--config / BATCHRUN_CONFIG),
    read once per file version; () without one."""
    env = os.environ if env is None else env
    path = env.get(CONFIG_ENV, "").strip()
    if not path:
        return ()
    try:
        version = (path, os.stat(path).st_mtime)
    except OSError:
        return ()  # the command line reported it; a worker without its file keeps today's endpoint
    if version not in _CACHE:
        _CACHE[version] = load_endpoints(path)
    return _CACHE[version]


def cache_servers(endpoints: tuple[Endpoint, ...], model: str) -> list[tuple[str, str]]:
    """The (base URL, Azure deployment or '') of the endpoints serving a model, for the response
    cache's key (policy/cache_entries.py cache_server)."""
    return [e.cache_identity(model) for e in endpoints if e.serves(model)]


def missing_keys(endpoints: tuple[Endpoint, ...], env=None) -> list[str]:
    """One sentence per endpoint whose key variable is unset in this process."""
    return [p for p in (e.missing_key(env) for e in endpoints) if p]


def default_endpoint(settings: WorkerSettings) -> Endpoint:
    """Today's single endpoint (OPENAI_BASE_URL / OPENAI_API_KEY), as an Endpoint."""
    return Endpoint(name="default", base_url=settings.base_url, api_key_env="OPENAI_API_KEY")


def unserved_models(endpoints: tuple[Endpoint, ...], models) -> list[str]:
    """The models no endpoint serves (none without [[endpoints]]: the one endpoint takes any)."""
    if not endpoints:
        return []
    return sorted(m for m in set(models) if not any(e.serves(m) for e in endpoints))


def remote_models(endpoints: tuple[Endpoint, ...], models) -> set[str]:
    """The models every endpoint serving them is via = "batch-api" for: under the batch's
    --via live (the default) they go through the Batch API."""
    out = set()
    for m in set(models):
        serving = [e for e in endpoints if e.serves(m)]
        if serving and all(e.via is EndpointVia.BATCH_API for e in serving):
            out.add(m)
    return out


def remote_endpoint(endpoints: tuple[Endpoint, ...], model: str) -> Endpoint | None:
    """Where a model's remote batches go: its first via = "batch-api" endpoint, else (the batch's
    --via batch-api or auto) its first endpoint that is not Azure; None if none can take them."""
    serving = [e for e in endpoints if e.serves(model)]
    return next((e for e in serving if e.via is EndpointVia.BATCH_API), None) or \
        next((e for e in serving if e.kind is not EndpointKind.AZURE), None)


def unserved_sentence(path: str, endpoints: tuple[Endpoint, ...], models: list[str]) -> str:
    names = ", ".join(e.name for e in endpoints)
    listed = ", ".join(repr(m) for m in models[:5]) + (f" and {len(models) - 5} more" if len(models) > 5 else "")
    return (f"no endpoint of {path} serves model{'s' if len(models) > 1 else ''} {listed} (endpoints: {names}); "
            f"add the model to an endpoint's models (or deployments), or fix the model name in the file")
