"""Bounds a request cannot get past (tiny model, real uvicorn on loopback): prompts in tokens and
the model's context on every generating endpoint, chat message text, body size before parsing,
the size of a 422, tiny temperatures, and booleans where layers go."""

from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import random_vector, serve_in_thread

from steerlab.models import load_model
from steerlab.server import ServerSettings, create_app
from steerlab.server.limits import MAX_BODY_BYTES
from steerlab.store import VectorStore

MAX_PROMPT = 64  # tokens, small on purpose: the tiny model's context is 256


@pytest.fixture(scope="module")
def api(tiny_dir, tmp_path_factory, one_torch_thread):
    lm = load_model(str(tiny_dir), device="cpu")
    store = VectorStore(tmp_path_factory.mktemp("bounds-vectors"), lm)
    store.add(random_vector(lm, range(lm.n_layers), name="weeknd").with_defaults(layers=[1]), overwrite=True)
    app = create_app(lm, store, ServerSettings(batch_wait_s=0.0, max_prompt_tokens=MAX_PROMPT))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield SimpleNamespace(url=url, client=client, lm=lm, app=app)


def _error(r: httpx.Response) -> str:
    body = r.json()["error"]
    return body["message"] if isinstance(body, dict) else body


def _requests(text: str, n: int) -> dict[str, dict]:
    return {
        "/generate": {"prompt": text, "max_length": n, "chat": False, "temperature": 0},
        "/compare": {"prompt": text, "max_length": n, "chat": False, "steering": "weeknd"},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": text}], "max_tokens": n},
        "/v1/chat/completions#history": {"messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": text}], "max_tokens": n},
    }


def test_prompts_are_bounded_in_tokens_on_every_endpoint(api):
    emoji = "\U0001F600" * 1000  # 1,000 characters (well under 4,000) but ~4,000 byte-level tokens
    assert api.app.state.studio.budget.prompt_tokens(emoji, False) > 1000
    for path, body in _requests(emoji, 4).items():
        r = api.client.post(path.split("#")[0], json=body)
        assert r.status_code == 400, (path, r.text)
        assert "tokens" in _error(r) and f"at most {MAX_PROMPT}" in _error(r), (path, r.text)
    assert api.app.state.studio.runner.stats().get("jobs", 0) == 0  # refused before the queue: nothing reached the worker


def test_prompt_plus_new_tokens_must_fit_the_models_context(api):
    assert api.app.state.studio.budget.context == 256
    for path, body in _requests("the cat sat on the mat and purred in the warm sun", 250).items():
        r = api.client.post(path.split("#")[0], json=body)
        assert r.status_code == 400, (path, r.text)
        assert "context of 256 tokens" in _error(r), (path, r.text)
    for path, body in _requests("the cat sat on the mat", 4).items():  # the same prompts fit with fewer tokens
        assert api.client.post(path.split("#")[0], json=body).status_code == 200, path


def test_health_reports_the_token_bounds(api):
    h = api.client.get("/health").json()
    assert h["max_prompt_tokens"] == MAX_PROMPT and h["context"] == 256


def test_chat_message_text_is_bounded(api):
    c = api.client
    long = {"messages": [{"role": "user", "content": "a" * 4001}], "max_tokens": 2}
    r = c.post("/v1/chat/completions", json=long)
    assert r.status_code == 422 and "4000" in _error(r), r.text
    parts = [{"type": "text", "text": "a" * 3000}, {"type": "text", "text": "b" * 3000}]
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], "max_tokens": 2})
    assert r.status_code == 422 and "6000 characters" in _error(r), r.text
    for size, status in ((1_000_000, 422), (2_000_000, 413)):  # the probe's 1,000,000 characters; past the body cap
        huge = {"messages": [{"role": "user", "content": "x" * size}]}
        t0 = time.monotonic()
        r = c.post("/v1/chat/completions", json=huge)
        assert r.status_code == status and time.monotonic() - t0 < 5, r.text[:300]
        assert r.json()["error"]["type"] == "invalid_request_error" and len(r.content) < 2000


def test_huge_bodies_are_refused_before_parsing(api):
    keys = {f"k{i}": 0 for i in range(300_000)}  # the probe's 3.5 MB of unknown keys
    body = json.dumps({"prompt": "x", **keys}).encode()
    assert len(body) > MAX_BODY_BYTES
    t0 = time.monotonic()
    r = api.client.post("/generate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and len(r.content) < 1000 and time.monotonic() - t0 < 2, r.text[:300]
    assert "larger than" in r.json()["error"]

    def chunks():  # no Content-Length: the cap holds while the body arrives
        for _ in range(40):
            yield b" " * 65536
    r = api.client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]


def test_an_error_body_stays_small(api):
    keys = {f"unknown_key_{i}": 0 for i in range(20_000)}  # under the body cap, 20,000 errors
    body = {"prompt": "x", **keys}
    r = api.client.post("/generate", json=body)
    assert r.status_code == 422 and len(r.content) < 10_000, len(r.content)
    data = r.json()
    assert len(data["detail"]) == 20 and "more errors" in data["error"]


def test_tiny_temperatures_are_greedy_not_500(api):
    greedy = api.client.post("/generate", json={"prompt": "the cat", "max_length": 6, "chat": False,
                                                "temperature": 0}).json()["generated"]
    for t in (1e-37, 5e-324, 1e-10, 1e-5):
        r = api.client.post("/generate", json={"prompt": "the cat", "max_length": 6, "chat": False, "temperature": t})
        assert r.status_code == 200, (t, r.text)
        assert r.json()["generated"] == greedy
    r = api.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 4, "temperature": 1e-38})
    assert r.status_code == 200, r.text


def test_layers_must_be_integers_not_booleans(api):
    for layers in ([True], [False], [1.0]):
        r = api.client.post("/generate", json={"prompt": "x", "max_length": 1,
                                               "steering": [{"vector": "weeknd", "layers": layers}]})
        assert r.status_code == 422, (layers, r.text)
    r = api.client.post("/generate", json={"prompt": "x", "max_length": 1,
                                           "steering": [{"vector": "weeknd", "layers": [1]}]})
    assert r.status_code == 200 and r.json()["applied"][0]["layers"] == [1]


def test_a_half_sent_body_does_not_hold_a_route(api):
    """A client that declares a body and stops sending is cut off by the body cap logic only when
    it exceeds the cap; here it just goes away, and the server keeps answering others."""
    host, port = urlsplit(api.url).hostname, urlsplit(api.url).port
    with socket.create_connection((host, port)) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
    assert api.client.get("/health").status_code == 200
