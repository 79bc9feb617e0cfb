"""Run an app under a real uvicorn server in a background thread (tests, notebooks).

Owns nothing but that thread: ``with serve_in_thread(app) as url:`` binds 127.0.0.1 on a free
port, waits until the server accepts requests, and stops it (lifespan shutdown included) on
exit. ``steerlab serve`` does not use this; it runs uvicorn in the foreground.
"""

from __future__ import annotations

from typing import Any
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0,
                    **server_options: Any) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:<port>``) of ``app`` served in a thread.

    The server is :func:`steerlab.server.serving.make_server`'s, as ``steerlab serve`` runs it
    (``server_options`` go there); it is also ``app.state.server``, so a test can stop it the
    way a signal would (``app.state.server.handle_exit(signal.SIGTERM, None)``).
    """
    from .serving import make_server

    server_options.setdefault("graceful_s", 2)
    server = make_server(app, host=host, port=port, log_level="warning", **server_options)
    if hasattr(app, "state"):  # a FastAPI app (a warming-up wrapper has none)
        app.state.server = server
    thread = threading.Thread(target=server.run, name="steerlab-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
