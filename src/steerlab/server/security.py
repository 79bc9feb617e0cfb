"""Who may call what: the optional API key and the non-loopback guard.

Rules (documented in docs/server.md, "Security"):

* ``STEERLAB_API_KEY`` set: mutating endpoints (``POST /vectors``, which writes a file) need
  ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; 401 otherwise.
* ``STEERLAB_API_KEY_ALL=1`` (``--api-key-all``) as well: every endpoint needs it except the
  page (``/``) and ``/health``.
* Bound to a non-loopback address with no key: mutating endpoints are refused (403) with a
  message saying to set ``STEERLAB_API_KEY``; generation stays open (the start-up warning says so).

Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import secrets

from fastapi import Request

OPEN_PATHS = {"/", "/health"}
KEY_HEADER = "x-api-key"


def is_mutating(method: str, path: str) -> bool:
    """Requests that write to disk or start background work: building vectors."""
    return method == "POST" and path.rstrip("/") == "/vectors"


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get(KEY_HEADER) or None


def check(request: Request, *, api_key: str | None, key_all: bool, public: bool) -> tuple[int, str] | None:
    """None when allowed, else (status, message)."""
    path, method = request.url.path, request.method
    mutating = is_mutating(method, path)
    if api_key:
        needed = mutating or (key_all and path not in OPEN_PATHS)
        if not needed:
            return None
        given = presented_key(request)
        if given is None:
            return 401, ("this endpoint needs the API key: send 'Authorization: Bearer <key>' or "
                         "'X-API-Key: <key>' (the key is the server's STEERLAB_API_KEY)")
        if not secrets.compare_digest(given.encode("utf-8", "surrogatepass"), api_key.encode("utf-8")):
            return 401, "wrong API key"
        return None
    if public and mutating:
        return 403, ("building vectors is refused on a server bound to a non-loopback address without an API key: "
                     "restart it with STEERLAB_API_KEY=<secret> (then send 'Authorization: Bearer <secret>'), "
                     "or bind 127.0.0.1")
    return None
