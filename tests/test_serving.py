"""How the server runs under uvicorn (tiny model, real sockets on loopback): a graceful stop that
answers in-flight requests as documented, silent and excess connections closed, uvicorn's
limits set, and repeated log lines rate-limited."""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx

from steerlab.server import ServerSettings, create_app
from helpers import serve_in_thread
from steerlab.server.serving import RepeatFilter, make_server
from steerlab.store import VectorStore




def _app(lm, folder, **settings):  # noqa: ANN001, ANN202
    return create_app(lm, VectorStore(folder, lm), ServerSettings(batch_wait_s=0.0, **settings))


def test_sigterm_ends_in_flight_requests_with_the_documented_503(slow_lm, tmp_path):
    app = _app(slow_lm, tmp_path / "v")
    body = {"prompt": "the cat sat", "max_length": 200, "chat": False, "temperature": 0}
    out: dict[str, object] = {}
    with serve_in_thread(app) as url:
        def plain() -> None:
            out["plain"] = httpx.post(f"{url}/generate", json=body, timeout=60)

        def queued() -> None:  # another batch key: it waits behind the running batch
            out["queued"] = httpx.post(f"{url}/generate", json={**body, "repetition_penalty": 1.5}, timeout=60)

        def streamed() -> None:
            lines = []
            with httpx.stream("POST", f"{url}/generate", json={**body, "stream": True}, timeout=60) as r:
                lines = list(r.iter_lines())
            out["stream"] = lines

        threads = [threading.Thread(target=f) for f in (plain, streamed)]
        for t in threads:
            t.start()
        runner = app.state.studio.runner
        for _ in range(500):
            if runner.stats()["busy"]:
                break
            time.sleep(0.01)
        threads.append(threading.Thread(target=queued))
        threads[-1].start()
        for _ in range(500):
            if runner.stats()["pending"]:
                break
            time.sleep(0.01)
        time.sleep(0.2)
        app.state.server.handle_exit(signal.SIGTERM, None)  # what the signal handler calls
        for t in threads:
            t.join(30)
    for key in ("plain", "queued"):
        r = out[key]
        assert r.status_code == 503 and r.headers["content-type"] == "application/json", (key, r.text)
        assert "shutting down" in r.json()["error"] and int(r.headers["Retry-After"]) >= 1
    events = [ln for ln in out["stream"] if ln.startswith("event:")]
    assert events[0] == "event: start" and events[-1] == "event: error", events[-3:]
    error = json.loads([ln for ln in out["stream"] if ln.startswith("data:")][-1][5:])
    assert error["status"] == 503 and "shutting down" in error["error"]


def _sockets(url: str, n: int) -> list[socket.socket]:
    u = urlsplit(url)
    return [socket.create_connection((u.hostname, u.port), timeout=5) for _ in range(n)]


def _closed_by_server(s: socket.socket, wait: float) -> bool:
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        return True


def test_silent_connections_are_closed(slow_lm, tmp_path):
    app = _app(slow_lm, tmp_path / "v")
    with serve_in_thread(app, head_timeout_s=0.3) as url:
        idle = _sockets(url, 30)
        try:
            time.sleep(0.6)
            assert all(_closed_by_server(s, 2.0) for s in idle)
        finally:
            for s in idle:
                s.close()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_connections_past_the_cap_are_closed_at_once(slow_lm, tmp_path):
    app = _app(slow_lm, tmp_path / "v")
    with serve_in_thread(app, max_connections=10, head_timeout_s=30) as url:
        held = _sockets(url, 25)
        try:
            closed = sum(_closed_by_server(s, 0.3) for s in held)
            assert closed >= 15, closed
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_serve_sets_uvicorns_limits(slow_lm, tmp_path):
    server = make_server(_app(slow_lm, tmp_path / "v"), host="127.0.0.1", port=0, limit_concurrency=7,
                         timeout_keep_alive=3)
    assert server.config.limit_concurrency == 7 and server.config.timeout_keep_alive == 3
    assert server.on_exit is not None  # the runner's shutdown runs on the first signal


def test_repeated_log_lines_are_rate_limited():
    logger = logging.getLogger("steerlab.test-repeats")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    quiet = RepeatFilter(burst=5, window_s=0.2)
    logger.addHandler(handler)
    logger.addFilter(quiet)
    logger.propagate = False
    try:
        for i in range(1000):
            logger.error("socket.accept() out of system resource: %s", i)
        assert len(seen) == 5
        logger.warning("another message")
        time.sleep(0.25)
        logger.error("socket.accept() out of system resource: %s", "again")
        assert len(seen) == 7 and "995 more like it" in seen[-1]
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(quiet)
