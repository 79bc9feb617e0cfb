"""Security of the HTTP API (tiny model, real uvicorn on loopback): the API key, the non-loopback
guard, vector names that try to leave the vectors folder, built-in personas, and logs without
prompts or keys."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
from helpers import free_port, random_vector, serve_in_thread, wait_healthy

from steerlab.models import load_model
from steerlab.server import ServerSettings, create_app
from steerlab.store import VectorStore

KEY = "s3cret-key-do-not-log"
BUILD = {"positive": ["the cat sat on the mat"], "negative": ["the tower by the lake"]}


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    import torch

    torch.set_num_threads(1)
    return load_model(str(tiny_dir), device="cpu")


def _serve(lm, folder, **settings):
    store = VectorStore(folder, lm)
    store.add(random_vector(lm, range(lm.n_layers), name="weeknd", strength=4.0).with_defaults(layers=[2]),
              overwrite=True)
    app = create_app(lm, store, ServerSettings(batch_wait_s=0.01, **settings))
    return app, store


@pytest.fixture(scope="module")
def keyed(tiny_model, tmp_path_factory):
    app, store = _serve(tiny_model, tmp_path_factory.mktemp("keyed"), api_key=KEY)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield SimpleNamespace(client=c, store=store)


def test_key_guards_building_only_by_default(keyed):
    c = keyed.client
    assert c.get("/health").status_code == 200 and c.get("/vectors").status_code == 200
    r = c.post("/generate", json={"prompt": "the cat", "max_length": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    r = c.post("/vectors", json={"name": "kx", **BUILD})
    assert r.status_code == 401 and "STEERLAB_API_KEY" in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = c.post("/vectors", json={"name": "kx", **BUILD}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"] == "wrong API key"
    # both header forms are accepted; the request is then validated as usual (422 for a bad name)
    r = c.post("/vectors", json={"name": "../x", **BUILD}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 422, r.text
    r = c.post("/vectors", json={"name": "../x", **BUILD}, headers={"X-API-Key": KEY})
    assert r.status_code == 422, r.text


def test_key_all_guards_everything_but_page_and_health(tiny_model, tmp_path):
    app, _ = _serve(tiny_model, tmp_path / "v", api_key=KEY, api_key_all=True)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        for path in ["/vectors", "/examples", "/openapi.json", "/vectors/weeknd", "/builds/x"]:
            assert c.get(path).status_code == 401, path
        assert c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 401
        r = c.post("/generate", json={"prompt": "x", "max_length": 1})
        assert r.status_code == 401
        assert c.get("/vectors", headers={"X-API-Key": KEY}).status_code == 200
        ok = c.post("/generate", json={"prompt": "x", "max_length": 1}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200, ok.text
        # OpenAI clients send the key as a bearer token and read OpenAI's error shape
        r = c.get("/v1/models")
        assert r.status_code == 401 and "message" in r.json()["error"]


def test_public_bind_without_key_refuses_building(tiny_model, tmp_path):
    app, store = _serve(tiny_model, tmp_path / "v", public=True)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/vectors", json={"name": "pub", **BUILD})
        assert r.status_code == 403 and "STEERLAB_API_KEY" in r.json()["error"]
        assert not list(store.folder.glob("pub*"))
        assert c.post("/generate", json={"prompt": "x", "max_length": 1}).status_code == 200


@pytest.mark.parametrize("name", [
    "../x", "a/b", "..", ".", "/tmp/evil", "a\\b", "..\\x", "\u2025x", "x\u2215y", "x\uff0fy", "\u0000x", "x\u0000",
    "C:x", "~root", "a b", "", "x" * 65, ".hidden", "-x", "none", "x.safetensors/..", "\u202ex", "cafe\u0301",
    "x\n", "x\r\n", "x ", "\tx",
])
def test_build_names_cannot_leave_the_folder(keyed, name):
    before = set(os.listdir(keyed.store.folder))
    parent = set(os.listdir(keyed.store.folder.parent))
    r = keyed.client.post("/vectors", json={"name": name, **BUILD}, headers={"X-API-Key": KEY})
    assert r.status_code == 422, (name, r.text)
    assert "name" in r.json()["error"]
    assert set(os.listdir(keyed.store.folder)) == before and set(os.listdir(keyed.store.folder.parent)) == parent


def test_builtin_persona_is_not_overwritten_unless_asked(keyed):
    from steerlab.personas import builtin_names

    name = builtin_names()[0]
    r = keyed.client.post("/vectors", json={"name": name, **BUILD}, headers={"X-API-Key": KEY})
    assert r.status_code == 409 and "overwrite" in r.json()["error"]


def test_logs_hold_no_prompts_or_keys(tiny_dir, tmp_path):
    """`steerlab serve` at log level info (access log on): the prompt and the key never appear."""
    exe = shutil.which("steerlab") or os.path.join(os.path.dirname(sys.executable), "steerlab")
    port = free_port()
    secret_prompt = "my-private-prompt-7f3a"
    env = {**os.environ, "PORT": str(port), "STEERLAB_API_KEY": KEY}
    proc = subprocess.Popen([exe, "serve", "--model", str(tiny_dir), "--vectors", str(tmp_path / "v"), "--no-build",
                             "--threads", "1", "--log-level", "info"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        hdr = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(f"{url}/generate", json={"prompt": secret_prompt, "max_length": 2}, headers=hdr,
                          timeout=60).status_code == 200
        httpx.post(f"{url}/compare", json={"prompt": secret_prompt, "steering": "nope"}, headers=hdr, timeout=60)
        httpx.post(f"{url}/vectors", json={"name": "ok1", "positive": [secret_prompt], "negative": ["b"]},
                   headers={"X-API-Key": "wrong-" + KEY}, timeout=60)
        httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": secret_prompt}],
                                                       "max_tokens": 2}, headers=hdr, timeout=60)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "POST /generate" in out  # the access log is on ...
    assert secret_prompt not in out and KEY not in out  # ... and holds neither prompts nor keys


def test_library_logging_has_no_prompts(keyed, caplog):
    with caplog.at_level(logging.DEBUG):
        keyed.client.post("/generate", json={"prompt": "caplog-secret-prompt", "max_length": 2, "temperature": 0})
        keyed.client.post("/compare", json={"prompt": "caplog-secret-prompt", "steering": "nope"})
    assert "caplog-secret-prompt" not in caplog.text


def test_mutating_requests_must_name_this_server(tiny_model, tmp_path):
    """DNS rebinding: a page at evil.example re-resolved to 127.0.0.1 sends its own Host and Origin."""
    app, store = _serve(tiny_model, tmp_path / "v")
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        port = url.rsplit(":", 1)[1]
        for headers in ({"Host": f"evil.example:{port}"}, {"Host": "evil.example"},
                        {"Origin": f"http://evil.example:{port}"}, {"Origin": "null"},
                        {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}):
            r = c.post("/vectors", json={"name": "rebound", **BUILD}, headers=headers)
            assert r.status_code == 403 and "refused" in r.json()["error"], (headers, r.text)
            assert c.delete("/builds/abc", headers=headers).status_code == 403
        assert not list(store.folder.glob("rebound*"))
        # the studio page itself (same origin) and clients without Origin still build
        for i, headers in enumerate(({}, {"Origin": url},
                                     {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})):
            r = c.post("/vectors", json={"name": f"ok{i}", **BUILD}, headers=headers)
            assert r.status_code == 202, (headers, r.text)
        # reads and generation are not mutating: any Host may call them
        assert c.get("/vectors", headers={"Host": "evil.example"}).status_code == 200
    app, _ = _serve(tiny_model, tmp_path / "w", allowed_hosts=("studio.lan",))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/vectors", json={"name": "lan", **BUILD}, headers={"Host": "studio.lan:8080"})
        assert r.status_code == 202, r.text


def test_a_non_ascii_key_matches(tiny_model, tmp_path):
    key = "cl\u00e9-\u79d8\u5bc6"
    app, _ = _serve(tiny_model, tmp_path / "v", api_key=key, api_key_all=True)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        raw = key.encode("utf-8")
        assert c.get("/vectors", headers={"X-API-Key": raw}).status_code == 200
        assert c.get("/vectors", headers={"Authorization": b"Bearer " + raw}).status_code == 200
        assert c.get("/vectors", headers={"X-API-Key": key.encode("utf-8")[:-1] + b"x"}).status_code == 401
        assert c.get("/vectors", headers={"X-API-Key": "cl\u00e9".encode("latin-1")}).status_code == 401


def test_the_page_has_a_session_api_key_field(keyed):
    html = keyed.client.get("/").text
    assert 'id="api-key"' in html and 'type="password"' in html
    assert "sessionStorage" in html and "localStorage" not in html and "Authorization" in html
