"""Small builders shared by tests (not fixtures)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from steerlab import SteeringVector


def random_vector(lm, layers, *, seed: int = 0, name: str = "rand", strength: float = 1.0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    dirs = {}
    for layer in layers:
        d = torch.randn(lm.hidden_size, generator=g)
        dirs[layer] = d / d.norm()
    return SteeringVector(directions=dirs, norms={layer: 2.0 for layer in layers}, model_id=lm.model_id,
                          name=name, default_strength=strength)


def hidden_states(lm, text: str) -> tuple[torch.Tensor, ...]:
    enc = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return lm.model(**enc, output_hidden_states=True).hidden_states


def logits(lm, texts) -> torch.Tensor:
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        return lm.model(**enc).logits


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, *, timeout: float = 60, poll: float = 0.1,
                 log: Callable[[], str] | None = None) -> None:
    """Until ``url``/health answers 200; fails with ``log()`` if the server exits or the time runs out.

    Without ``log``, an exited server's piped stdout is shown.
    """
    import httpx

    if log is None:
        log = lambda: proc.stdout.read() if proc.stdout is not None and proc.poll() is not None else ""  # noqa: E731

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the server at {url} did not start:\n{log()[-3000:]}")
        time.sleep(poll)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60) -> None:
    """Stop a server started with ``start_new_session=True`` and its children (vLLM's engine)."""
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


SLOW_STEP_S = 0.03  # the slow_lm fixture's time per forward pass (conftest)


# Run an app under a real uvicorn server in a background thread (was steerlab.server.background: only tests used it)
@contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0,
                    **server_options: Any) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:<port>``) of ``app`` served in a thread.

    The server is :func:`steerlab.server.serving.make_server`'s, as ``steerlab serve`` runs it
    (``server_options`` go there); it is also ``app.state.server``, so a test can stop it the
    way a signal would (``app.state.server.handle_exit(signal.SIGTERM, None)``).
    """
    from steerlab.server.serving import make_server

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
