"""Who may call what: the optional API key, the non-loopback guard, and Host/Origin checks.

Rules (documented in docs/server.md, "Security"):

* ``STEERLAB_API_KEY`` set: mutating endpoints (``POST /vectors``, which writes a file;
  ``DELETE /builds/{id}``) need ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; 401 otherwise.
* ``STEERLAB_API_KEY_ALL=1`` (``--api-key-all``) as well: every endpoint needs it except the
  page (``/``) and ``/health``.
* Bound to a non-loopback address with no key: mutating endpoints are refused (403) with a
  message saying to set ``STEERLAB_API_KEY``; generation stays open (the start-up warning says so).
* Mutating requests must name this server: on a loopback bind the ``Host`` header must be a
  loopback name (or one of ``--allowed-host``), and an ``Origin`` header, when sent, must be the
  same origin as ``Host``. A web page that re-binds its own DNS name to 127.0.0.1 sends its own
  name in both, so it cannot build or overwrite vectors (403).

Keys are compared in constant time, as the bytes sent (UTF-8 keys work), and never logged.
"""

from __future__ import annotations

import secrets
import urllib.parse

OPEN_PATHS = {"/", "/health"}
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


def is_mutating(method: str, path: str) -> bool:
    """Requests that write to disk or change background work: building vectors, cancelling builds."""
    path = path.rstrip("/")
    return (method == "POST" and path == "/vectors") or (method == "DELETE" and path.startswith("/builds/"))


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((v for k, v in headers if k.lower() == name), None)


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key as sent (raw bytes: a UTF-8 key stays comparable), from Bearer or X-API-Key."""
    auth = _header(headers, b"authorization") or b""
    scheme, _, token = auth.partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        return token.strip()
    return _header(headers, b"x-api-key") or None


def _host_name(host: str) -> str:
    """``name`` of ``name:port`` / ``[v6]:port`` (lower case)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_origin(headers: list[tuple[bytes, bytes]], *, public: bool, allowed_hosts: tuple[str, ...]) -> str | None:
    """None when a mutating request names this server; else why not (answered with 403)."""
    host = (_header(headers, b"host") or b"").decode("latin-1")
    if not public:
        names = LOOPBACK_NAMES | {h.lower() for h in allowed_hosts}
        if _host_name(host) not in names:
            return (f"refused: the Host header {host[:100]!r} is not this server's loopback name (a web page using "
                    "DNS rebinding sends its own name); call http://127.0.0.1:PORT, or start the server with "
                    "--allowed-host NAME for a name you trust")
    origin = _header(headers, b"origin")
    if origin is not None:
        parsed = urllib.parse.urlsplit(origin.decode("latin-1"))
        if origin == b"null" or parsed.netloc.lower() != host.strip().lower():
            return ("refused: this request comes from another web origin "
                    f"({origin.decode('latin-1')[:100]!r}); use the studio page served by this server, or a client "
                    "that sends no Origin header")
    return None


def check(method: str, path: str, headers: list[tuple[bytes, bytes]], *, api_key: str | None, key_all: bool,
          public: bool, allowed_hosts: tuple[str, ...] = ()) -> tuple[int, str] | None:
    """None when allowed, else (status, message)."""
    mutating = is_mutating(method, path)
    if mutating and (why := check_origin(headers, public=public, allowed_hosts=allowed_hosts)):
        return 403, why
    if api_key:
        needed = mutating or (key_all and path not in OPEN_PATHS)
        if not needed:
            return None
        given = presented_key(headers)
        if given is None:
            return 401, ("this endpoint needs the API key: send 'Authorization: Bearer <key>' or "
                         "'X-API-Key: <key>' (the key is the server's STEERLAB_API_KEY)")
        if not secrets.compare_digest(given, api_key.encode("utf-8")):
            return 401, "wrong API key"
        return None
    if public and mutating:
        return 403, ("building vectors is refused on a server bound to a non-loopback address without an API key: "
                     "restart it with STEERLAB_API_KEY=<secret> (then send 'Authorization: Bearer <secret>'), "
                     "or bind 127.0.0.1")
    return None
