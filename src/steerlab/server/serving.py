"""Running the app under uvicorn: connection limits, idle timeouts, a graceful stop, quieter logs.

Owns the uvicorn configuration that ``steerlab serve`` and the tests' ``serve_in_thread`` (tests/helpers.py)
share, so tests run what users run:

* a connection that sends no complete request head within ``head_timeout_s`` is closed (uvicorn
  times out idle keep-alive connections, but not a fresh one that never speaks: 1,100 such
  half-open connections once exhausted the open-file limit);
* past ``max_connections`` open connections a new one is closed at once, so file descriptors stay
  for real clients; ``limit_concurrency`` answers 503 past that many requests in progress;
* the open-file soft limit is raised to the hard limit at start;
* on SIGTERM/SIGINT the runner is shut down *before* uvicorn waits for open requests, so they
  end as documented (503 JSON, or an ``error`` event on a stream) instead of being cut off;
* identical log lines (same logger, level and message template) are rate-limited.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

LOGGERS = ("asyncio", "uvicorn.error", "steerlab", "steerlab.server")


class RepeatFilter(logging.Filter):
    """Lets ``burst`` identical lines through per ``window_s``; then one line saying how many were dropped."""

    def __init__(self, burst: int = 5, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._seen: dict[tuple, list[float | int]] = {}  # key -> [window start, count in window]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg)[:200])
        now = time.monotonic()
        start, count = self._seen.get(key, (now, 0))
        if now - start > self.window_s:
            dropped = count - self.burst
            start, count = now, 0
            if dropped > 0:
                record.msg = f"{record.msg} (and {dropped} more like it in the last {self.window_s:g} s, not shown)"
        count += 1
        if len(self._seen) > 1000:  # bounded: keys are message templates, but be safe
            self._seen.clear()
        self._seen[key] = [start, count]
        return count <= self.burst


def quiet_repeats(filter_: RepeatFilter | None = None) -> RepeatFilter:
    """Attach one :class:`RepeatFilter` to the loggers that can repeat under attack (idempotent)."""
    filter_ = filter_ or RepeatFilter()
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(filter_)
    return filter_


def raise_open_file_limit() -> int | None:
    """Raise the soft open-file limit to the hard one; return the soft limit now (None: unknown)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def protocol(head_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing silent new connections and connections past the cap."""

    class Guarded(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.abort()  # frees the descriptor now; a client retries later
                return
            self._head_timer = self.loop.call_later(head_timeout_s, self._silent)

        def _silent(self) -> None:
            if self.cycle is None and not self.transport.is_closing():  # no request head yet
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return Guarded


class Server(uvicorn.Server):
    """uvicorn's server, calling ``on_exit()`` (the runner's non-blocking shutdown) on the first signal."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.on_exit is not None and not self.should_exit:
            try:
                self.on_exit()
            except Exception:  # never block the stop itself
                logging.getLogger("steerlab.server").exception("shutdown hook failed")
        super().handle_exit(sig, frame)


def make_server(app: Any, *, host: str, port: int, log_level: str = "info", limit_concurrency: int = 256,
                max_connections: int | None = None, timeout_keep_alive: float = 5.0, head_timeout_s: float = 10.0,
                graceful_s: float = 5.0) -> Server:
    """The configured server for ``app`` (its ``state.studio.runner`` is shut down on the first stop signal)."""
    soft = raise_open_file_limit()
    if max_connections is None:
        max_connections = max(16, min(4 * limit_concurrency, (soft or 1024) - 64))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=graceful_s,  # type: ignore[arg-type]  # floats work
                            limit_concurrency=limit_concurrency,
                            timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]
                            http=protocol(head_timeout_s, max_connections))
    quiet_repeats()
    runner = getattr(getattr(getattr(app, "state", None), "studio", None), "runner", None)
    shutdown = getattr(runner, "shutdown", None)
    return Server(config, on_exit=shutdown)
