"""Showing URLs without the secrets they may carry.

A base URL or a Redis URL can hold credentials: ``https://user:token@gateway/v1``,
``redis://:password@host:6379/0``, ``…?api-key=…``. Wherever batchrun shows or stores a URL
(logs, ``status``, Redis, printed commands), it goes through :func:`mask_url` first.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["MASK", "mask_url"]

MASK = "***"
# Query parameters that carry a secret (Azure SAS "sig", "api-key", "access_token", "password", …).
_SECRET_PARAM = re.compile(r"(?i)(key|token|secret|sig|signature|password|passwd|pwd|auth|credential)")


def mask_url(url: str) -> str:
    """``url`` with its password (or a user name standing alone, often a token) and secret query
    values replaced by ``***``; anything that does not parse as a URL is returned masked whole if it
    contains an ``@`` before its path, else unchanged."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError:
        return re.sub(r"//[^/@]*@", f"//{MASK}@", url)
    netloc = parts.netloc
    if "@" in netloc:
        host = parts.hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        if port is not None:
            host += f":{port}"
        if parts.password is not None:
            user = f"{parts.username}:{MASK}" if parts.username else f":{MASK}"
        else:
            user = MASK  # a lone user name in a URL is usually a token
        netloc = f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to hide (and urlunsplit would drop an empty "//", as in memory://)
    return urlunsplit(parts._replace(netloc=netloc, query=query))
