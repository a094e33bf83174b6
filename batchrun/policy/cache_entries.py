"""The response cache's pure parts: the key of a request and the bytes of a stored answer.

The key is a hash of (the base URL without credentials, the endpoint path, the canonical JSON of
the body). The API key is never part of it (nor anywhere in an entry): two keys of one account
get the same answers, and nothing secret is kept. An entry is ``MAGIC`` + zlib-compressed JSON
of the answer; anything else (truncated, bit-flipped, another program's value) reads as None,
so a corrupt entry is never written as a result.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit


__all__ = ["CachedAnswer", "MAGIC", "OPT_OUT_FIELD", "RequestKeys", "cache_key", "cache_server", "canonical_body", "decode_entry",
           "encode_entry", "line_opts_out", "normalised_base_url"]

MAGIC = b"BRC1"  # a version tag: entries of another format read as corrupt, not as answers
OPT_OUT_FIELD = "batchrun"  # a Batch API line's `"batchrun": {"cache": false}` bypasses the cache


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A successful answer as the cache keeps it."""

    status_code: int
    request_id: str | None
    body: dict
    stored_at: float  # Unix seconds when it was stored


def normalised_base_url(base_url: str) -> str:
    """The base URL as part of a key: no user, password, query or fragment, the scheme and host in
    lower case, no trailing slash (``https://u:tok@API.example.com/v1/`` -> ``https://api.example.com/v1``)."""
    try:
        parts = urlsplit(base_url.strip())
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return base_url.strip().rstrip("/")
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), "", ""))


def canonical_body(body: dict) -> str:
    """The body's JSON with sorted keys and no spaces: equal bodies, equal text, whatever their key order."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_server(servers) -> str:
    """The server part of a key when [[endpoints]] send a model's requests: every endpoint that
    serves it, as (base URL, Azure deployment or ''), so that answers of one config's servers
    never serve a config sending elsewhere. One plain server keys as its base URL alone (as
    without [[endpoints]]: both send to the same place)."""
    names = sorted({normalised_base_url(url) + (f" deployment={dep}" if dep else "") for url, dep in servers})
    return "\t".join(names)


def cache_key(base_url: str, path: str, body: dict, server: str | None = None) -> str:
    """The hex SHA-256 naming a request's answer in the cache (``server``: cache_server's, in
    place of the base URL)."""
    text = "\n".join((normalised_base_url(base_url) if server is None else server, path, canonical_body(body)))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class RequestKeys:
    """The cache key of each request sent from one place: ``base_url``, or with ``endpoints`` (the
    worker config's [[endpoints]]) every endpoint serving the body's model, as cache_server keys
    it. What a shard runner keys a job by, and what `run`'s submit looks a line up by: the two
    must agree, or a hit served at submit would not be the answer the runner would have used."""

    def __init__(self, base_url: str, endpoints=()):  # (endpoints.Endpoint: cache_identity, serves)
        self.base_url = base_url
        self._base = normalised_base_url(base_url)  # (once, not once per line)
        self.endpoints = tuple(endpoints)
        self._servers: dict[str, str] = {}  # model -> its key's server part

    def key(self, request: dict) -> str | None:
        """The key of a job's request ({"url", "body", ...}); None when its line opts out."""
        if line_opts_out(request):
            return None
        body = request["body"]
        server = self._base
        if self.endpoints:
            model = str(body.get("model", ""))
            server = self._servers.get(model)
            if server is None:
                server = self._servers[model] = cache_server([e.cache_identity(model) for e in self.endpoints
                                                              if e.serves(model)])
        return cache_key(self.base_url, request["url"], body, server)


def line_opts_out(request: dict) -> bool:
    """Whether a job's line asked not to be cached (``"batchrun": {"cache": false}``)."""
    ext = request.get(OPT_OUT_FIELD)
    return isinstance(ext, dict) and ext.get("cache") is False


def opt_out_problem(line: dict) -> str | None:
    """Why a Batch API line's ``batchrun`` field cannot be read (None if it is absent or fine)."""
    if OPT_OUT_FIELD not in line:
        return None
    ext = line[OPT_OUT_FIELD]
    if not isinstance(ext, dict):
        return f"'{OPT_OUT_FIELD}' must be an object such as {{\"cache\": false}}"
    unknown = sorted(set(ext) - {"cache"})
    if unknown:
        return f"'{OPT_OUT_FIELD}' has unknown field {unknown[0]!r} (known: 'cache')"
    if "cache" in ext and not isinstance(ext["cache"], bool):
        return f"'{OPT_OUT_FIELD}.cache' must be true or false"
    return None


def encode_entry(answer: CachedAnswer) -> bytes:
    data = {"s": answer.status_code, "r": answer.request_id, "b": answer.body, "t": answer.stored_at}
    return MAGIC + zlib.compress(json.dumps(data, separators=(",", ":")).encode("utf-8", "surrogatepass"), 6)


def decode_entry(raw: bytes | None) -> CachedAnswer | None:
    """The answer an entry holds; None for a missing entry. Raises ValueError for a corrupt one."""
    if raw is None:
        return None
    if not isinstance(raw, (bytes, bytearray)) or not raw.startswith(MAGIC):
        raise ValueError("it does not start with the cache's format tag")
    try:
        data = json.loads(zlib.decompress(bytes(raw[len(MAGIC):])))
    except (zlib.error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"it does not decompress to JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError("it does not hold an answer object")
    status, request_id, body, stored = data.get("s"), data.get("r"), data.get("b"), data.get("t")
    if not (isinstance(status, int) and 200 <= status < 300) or not isinstance(body, dict):
        raise ValueError("it holds no successful answer")
    if request_id is not None and not isinstance(request_id, str):
        raise ValueError("its request id is not text")
    if isinstance(stored, bool) or not isinstance(stored, (int, float)):
        raise ValueError("it has no time it was stored")
    return CachedAnswer(status, request_id, body, float(stored))
