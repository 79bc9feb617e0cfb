"""Small builders shared by tests (not fixtures)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

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
