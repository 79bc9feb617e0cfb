"""The ASGI layer in front of every route: access rules and the request-body cap.

Owns what happens before a route sees a request: :func:`steerlab.server.security.check`
(key, Host/Origin), and a body cap enforced while the body arrives, before any JSON is
parsed (a 3.5 MB body of 300,000 unknown keys once stalled the server for seconds and came
back as a 30 MB error). A plain ASGI middleware, not Starlette's ``BaseHTTPMiddleware``: the
route gets the server's own ``receive``, so it sees a client's disconnect at once.
Also owns the JSON error shape, shared with the app's exception handlers.
"""

from __future__ import annotations

import json
from typing import Any

from . import security
from .limits import MAX_BODY_BYTES

BODY_METHODS = {"POST", "PUT", "PATCH"}


def error_body(path: str, status: int, message: str, detail: Any = None) -> dict[str, Any]:
    """``{"error", "detail"}``, or OpenAI's ``{"error": {"message", "type", "param", "code"}}`` under /v1."""
    if path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return {"error": message, "detail": message if detail is None else detail}


async def send_json(send: Any, path: str, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(path, status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Refuses what :mod:`security` refuses and bodies over ``max_body`` bytes (413), then calls the app."""

    def __init__(self, app: Any, *, settings: Any, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.settings = settings
        self.max_body = max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method, headers = scope["path"], scope["method"], scope["headers"]
        s = self.settings
        refused = security.check(method, path, headers, api_key=s.api_key, key_all=s.api_key_all, public=s.public,
                                 allowed_hosts=tuple(getattr(s, "allowed_hosts", ()) or ()))
        if refused is not None:
            status, message = refused
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return await send_json(send, path, status, message, headers)
        if method not in BODY_METHODS:
            return await self.app(scope, receive, send)
        too_big = (f"the request body is larger than {self.max_body} bytes: send less (prompts and texts have "
                   "documented bounds, see docs/server.md)")
        declared = next((v for k, v in headers if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return await send_json(send, path, 413, too_big, {"Connection": "close"})
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await send_json(send, path, 413, too_big, {"Connection": "close"})
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)
