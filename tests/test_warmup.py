"""The port opens at once: "warming up" on /health and the page, 503 + Retry-After elsewhere, then the app.

In-process with a load function the test releases by hand, and the real command on the tiny model.
"""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest
from fastapi import FastAPI
from helpers import free_port, wait_healthy

from helpers import serve_in_thread
from steerlab.server.warmup import WarmingUp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _app(started: list) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):  # noqa: ANN001, ANN202
        started.append("up")
        yield
        started.append("down")

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/compare")
    def compare() -> dict:
        return {"success": True}

    return app


def test_warming_up_then_ready():
    release, lifespan = threading.Event(), []

    def load(note):  # noqa: ANN001, ANN202
        note("loading the model...")
        release.wait(30)
        note("building tabby_cats (1/3)...")
        return _app(lifespan)

    warming = WarmingUp(load)
    with serve_in_thread(warming) as url, httpx.Client(base_url=url, timeout=10) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "warming_up"
        assert r.json()["phase"] == "loading the model..." and r.headers["retry-after"] == "5"
        r = client.post("/compare", json={"prompt": "x"})
        assert r.status_code == 503 and "warming up" in r.json()["error"] and r.headers["retry-after"] == "5"
        r = client.post("/v1/chat/completions", json={})
        assert r.status_code == 503 and r.json()["error"]["code"] == 503  # OpenAI's error shape under /v1
        page = client.get("/")
        assert page.status_code == 200 and "warming up" in page.text and "steerlab studio" in page.text
        assert lifespan == []
        release.set()
        deadline = time.monotonic() + 20
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert lifespan == ["up"]  # the real app's own lifespan ran before it got requests
        assert client.post("/compare", json={}).json() == {"success": True}
    assert lifespan == ["up", "down"]


def test_a_failed_load_is_reported():
    failures = []

    def load(note):  # noqa: ANN001, ANN202
        raise RuntimeError("no such model")

    warming = WarmingUp(load, on_failure=failures.append)
    with serve_in_thread(warming) as url:
        deadline = time.monotonic() + 10
        while not failures:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        body = httpx.get(f"{url}/health").json()
    assert body["status"] == "failed" and "no such model" in body["phase"]


def test_serve_opens_the_port_before_the_model_is_loaded(tiny_dir, tmp_path):
    """The command says what it does, line by line, and answers /health while it loads."""
    import os
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "steerlab")
    port = free_port()
    proc = subprocess.Popen([exe, "serve", "--model", str(tiny_dir), "--vectors", str(tmp_path / "v"), "--threads", "1",
                             "--log-level", "warning", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    seen = set()
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = httpx.get(f"{url}/health", timeout=5)
                seen.add(r.json()["status"])
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        wait_healthy(proc, url)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "warming_up" in seen, out  # building three persona vectors on the tiny model takes a moment
    for line in (f"loading {tiny_dir}...", "building weeknd", "(1/3)", "(3/3)", "ready"):
        assert line in out, out
    assert out.index("steerlab studio: http://") < out.index(f"loading {tiny_dir}")


def test_serve_with_a_model_that_does_not_load_exits_1_with_one_line(tmp_path):
    import os
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "steerlab")
    r = subprocess.run([exe, "serve", "--model", str(tmp_path / "no-such-model"), "--vectors", str(tmp_path / "v"),
                        "--port", str(free_port()), "--log-level", "warning"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not load model" in errors[0] and "Traceback" not in r.stderr, r.stderr
