"""Open the port at once and say "warming up" while the model loads.

:class:`WarmingUp` is an ASGI app that ``steerlab serve`` hands to uvicorn before anything
heavy happens. At start-up it runs ``load(note)`` in a daemon thread; ``load`` loads the
model, builds missing vectors and returns the real app, calling ``note(line)`` before each
phase. Until then ``/`` serves the page (which shows the phase), ``/health`` answers 503 with
``{"status": "warming_up", "phase", "elapsed_s"}``, and every other request answers 503 with
``Retry-After``. When ``load`` returns, the real app's lifespan starts and every request goes
to it. When ``load`` fails, ``on_failure(exc)`` is called (the command stops the server).

Knows nothing about models: it only sequences an app that is not there yet.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.types import ASGIApp
    from starlette.types import Receive
    from starlette.types import Scope
    from starlette.types import Send

RETRY_AFTER_S = 5


class WarmingUp:
    """ASGI app: the real app once ``load`` has built it, a "warming up" answer before."""

    def __init__(self, load: Callable[[Callable[[str], None]], Any], *,
                 on_failure: Callable[[BaseException], None] | None = None, echo: Callable[[str], None] | None = None,
                 retry_after_s: int = RETRY_AFTER_S) -> None:
        self._load = load
        self._on_failure = on_failure
        self._echo = echo
        self.retry_after_s = retry_after_s
        self.phase = "starting"
        self.error: BaseException | None = None
        self.app: Any = None  # set once the real app's lifespan has started
        self._started = time.monotonic()
        self._inner: asyncio.Queue | None = None
        self._inner_task: asyncio.Task | None = None
        self._inner_sent: asyncio.Queue | None = None

    def note(self, line: str) -> None:
        """A new phase: shown by /health and the page, and echoed to the console."""
        self.phase = line
        if self._echo is not None:
            self._echo(line)

    # ---- ASGI -------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        elif self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._warming(scope, send)
        # websockets: none are served; closing the scope without accepting refuses them

    async def _warming(self, scope: Scope, send: Send) -> None:
        path = scope.get("path", "/")
        if path == "/" and scope.get("method") in ("GET", "HEAD"):
            html = resources.files(__package__).joinpath("static", "index.html").read_bytes()
            await _respond(send, 200, html, "text/html; charset=utf-8")
            return
        state = {"status": "failed" if self.error else "warming_up", "phase": self.phase,
                 "elapsed_s": round(time.monotonic() - self._started, 1)}
        body: dict[str, Any]
        if path == "/health":
            body = state
        else:
            message = f"the server is warming up ({self.phase}); retry in {self.retry_after_s} s"
            body = ({"error": {"message": message, "type": "server_error", "param": None, "code": 503}}
                    if path.startswith("/v1/") else {"error": message, "detail": state})
        await _respond(send, 503, json.dumps(body).encode(), "application/json",
                       [(b"retry-after", str(self.retry_after_s).encode())])

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                threading.Thread(target=self._run_load, args=(loop, scope), name="steerlab-warmup",
                                 daemon=True).start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._stop_inner()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def shutdown_runner(self) -> None:
        """On a stop signal: let the loaded app's runner answer in-flight requests (503) first."""
        runner = getattr(getattr(getattr(self.app, "state", None), "studio", None), "runner", None)
        if runner is not None and hasattr(runner, "shutdown"):
            runner.shutdown()

    def _run_load(self, loop: asyncio.AbstractEventLoop, scope: Scope) -> None:
        try:
            app = self._load(self.note)
        except BaseException as exc:  # noqa: BLE001 - reported to the console and /health
            self.error = exc
            self.phase = f"failed: {exc}"
            if self._on_failure is not None:
                loop.call_soon_threadsafe(self._on_failure, exc)
            return
        asyncio.run_coroutine_threadsafe(self._start_inner(app, scope), loop)

    async def _start_inner(self, app: ASGIApp, scope: Scope) -> None:
        """Run ``app``'s own lifespan startup (its runner starts), then route requests to it."""
        inner: asyncio.Queue = asyncio.Queue()
        sent: asyncio.Queue = asyncio.Queue()
        self._inner, self._inner_sent = inner, sent

        async def run() -> None:
            await app(scope, inner.get, sent.put)

        self._inner_task = asyncio.create_task(run())
        await self._inner.put({"type": "lifespan.startup"})
        reply = await self._inner_sent.get()
        if reply["type"] != "lifespan.startup.complete":
            self.error = RuntimeError(reply.get("message") or "the app failed to start")
            self.phase = f"failed: {self.error}"
            if self._on_failure is not None:
                self._on_failure(self.error)
            return
        self.app = app

    async def _stop_inner(self) -> None:
        if self._inner_task is None or self._inner_task.done() or self._inner is None or self._inner_sent is None:
            return
        await self._inner.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self._inner_sent.get(), timeout=30)
        except TimeoutError:
            self._inner_task.cancel()


async def _respond(send: Send, status: int, body: bytes, content_type: str,
                   extra: list | None = None) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
