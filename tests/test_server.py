"""The HTTP API on a real uvicorn server (127.0.0.1, free port, background thread), tiny model.

The model is the tiny random llama saved as a local folder (``tiny_dir``); vectors named like
the built-in personas are random directions, so tests are fast and outputs deterministic
under greedy decoding.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from helpers import free_port, random_vector, wait_healthy

from steerlab.models import load_model
from steerlab.server import ServerSettings, create_app
from helpers import serve_in_thread
from steerlab.store import VectorStore

NAMES = ["weeknd", "toronto", "tabby_cats"]
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360f8cf000000030101009b8d3a4f0000000049454e44ae426082")


def _brief(applied: list[dict]) -> list[dict]:
    """The vector, strength and layers of each applied entry (operator, positions... left out)."""
    return [{k: a[k] for k in ("vector", "strength", "layers")} for a in applied]


def make_store(lm, folder) -> VectorStore:
    store = VectorStore(folder, lm)
    for i, name in enumerate(NAMES):
        vec = random_vector(lm, range(lm.n_layers), seed=i, name=name, strength=4.0).with_defaults(layers=[2])
        store.add(vec, overwrite=True)
    return store


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # shared cores: see conftest


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    store = make_store(tiny_model, tmp_path_factory.mktemp("server-vectors"))
    app = create_app(tiny_model, store, ServerSettings(batch_wait_s=0.02))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield SimpleNamespace(url=url, app=app, store=store, client=client, runner=app.state.studio.runner)


def events(client: httpx.Client, path: str, body: dict) -> list[tuple[str, dict]]:
    """POST and parse the server-sent events of the response."""
    out, event = [], "message"
    with client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                out.append((event, json.loads(line[5:])))
                event = "message"
    return out


def greedy(prompt="the cat sat", steering=None, n=8, **kw) -> dict:
    return {"prompt": prompt, "steering": steering, "max_length": n, "temperature": 0, "chat": False, **kw}


# ---- the seed's calls ------------------------------------------------------------------------
def test_seed_curl_calls_on_tiny_model(server):
    """The seed README's three calls, with the seed's exact bodies (the real-model test uses curl)."""
    c = server.client
    r = c.post("/generate", json={"prompt": "The future of technology is", "steering": "weeknd", "max_length": 50,
                                  "temperature": 0.7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["prompt"] == "The future of technology is"
    assert body["generated"] and body["steering"] == "weeknd" and 0 < body["tokens"] <= 50
    r = c.post("/compare", json={"prompt": "Climate change is affecting", "steering": "toronto", "max_length": 80})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["steering_type"] == "toronto" and body["base"] != body["steered"]
    examples = c.get("/examples").json()
    assert isinstance(examples, list) and all(isinstance(e, str) for e in examples) and len(examples) >= 5


def test_health_docs_page_and_examples(server):
    c = server.client
    health = c.get("/health").json()
    assert health["status"] == "ok" and health["n_layers"] == 4 and health["vectors"] == sorted(NAMES)
    spec = c.get("/openapi.json").json()
    for path in ["/generate", "/compare", "/vectors", "/v1/chat/completions", "/health", "/examples"]:
        assert path in spec["paths"]
    docs = c.get("/docs")
    assert docs.status_code == 200 and "cdn." not in docs.text and "https://" not in docs.text  # offline: no CDN
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        assert f"/static-offline-docs/{asset}" in docs.text + c.get("/redoc").text
        assert c.get(f"/static-offline-docs/{asset}").status_code == 200
    page = c.get("/")
    assert page.status_code == 200 and "steerlab studio" in page.text and "text/html" in page.headers["content-type"]
    detailed = c.get("/examples", params={"detail": True}).json()
    assert detailed[0]["prompt"] == c.get("/examples").json()[0] and "hint" in detailed[0]
    assert {e["mode"] for e in detailed} == {"chat", "raw"}  # each example says how it runs (page toggle)
    assert all(e["prompt"].endswith((".", "?")) == (e["mode"] == "chat") for e in detailed)  # questions/asks: chat
    pre = c.get("/examples/precomputed").json()
    assert set(pre["personas"]) == {"weeknd", "toronto", "tabby_cats"}
    for persona in pre["personas"].values():
        assert persona["examples"] and all(e["base"] and e["steered"] for e in persona["examples"])


# ---- generation semantics --------------------------------------------------------------------
def test_steering_changes_output_and_never_leaks(server):
    c = server.client
    base = c.post("/generate", json=greedy()).json()["generated"]
    steered = c.post("/generate", json=greedy(steering="weeknd")).json()["generated"]
    assert steered != base
    assert c.post("/generate", json=greedy()).json()["generated"] == base  # no hook left behind
    assert c.post("/generate", json=greedy(steering="none")).json()["generated"] == base
    zero = c.post("/generate", json=greedy(steering=[{"vector": "weeknd", "strength": 0}])).json()
    assert zero["generated"] == base and _brief(zero["applied"]) == [{"vector": "weeknd", "strength": 0.0, "layers": [2]}]


def test_operators_positions_and_governor_per_entry(server):
    c = server.client
    base = c.post("/generate", json=greedy()).json()["generated"]
    for entry in ({"operator": "target", "strength": 2.0}, {"operator": "rotate", "strength": 0.5},
                  {"operator": "add", "strength": 4.0, "positions": 2}):
        body = c.post("/generate", json=greedy(steering=[{"vector": "weeknd", **entry}])).json()
        assert body["generated"] != base, entry
        applied = body["applied"][0]
        assert applied["operator"] == entry["operator"] and applied["positions"] == entry.get("positions", "all")
    gov = c.post("/compare", json=greedy(steering=[{"vector": "weeknd", "strength": 4.0, "governor": True}])).json()
    assert gov["applied"][0]["governor"] is True and gov["governor"]["steps"] == 8
    assert c.post("/generate", json=greedy()).json()["generated"] == base


def test_compare_is_one_batch_matching_separate_runs(server):
    c = server.client
    cmp = c.post("/compare", json=greedy(steering="weeknd")).json()
    assert cmp["batch"] == {"jobs": 1, "rows": 2}
    assert cmp["base"] == c.post("/generate", json=greedy()).json()["generated"]
    assert cmp["steered"] == c.post("/generate", json=greedy(steering="weeknd")).json()["generated"]


def test_several_vectors_strength_and_layers(server):
    c = server.client
    two = [{"vector": "weeknd", "strength": 4}, {"vector": "toronto", "strength": 2, "layers": [1, 3]}]
    body = c.post("/compare", json=greedy(steering=two)).json()
    assert _brief(body["applied"]) == [{"vector": "weeknd", "strength": 4.0, "layers": [2]},
                               {"vector": "toronto", "strength": 2.0, "layers": [1, 3]}]
    assert body["steering_type"] == "weeknd+toronto"
    one = c.post("/compare", json=greedy(steering=two[:1])).json()
    assert body["steered"] != one["steered"] and body["base"] == one["base"]
    top = c.post("/compare", json=greedy(steering=["weeknd"], strength=-3)).json()  # request-wide strength
    assert top["applied"][0]["strength"] == -3.0


def test_seed_makes_sampling_reproducible(server):
    c = server.client
    req = {"prompt": "the cat sat", "steering": "toronto", "max_length": 12, "temperature": 1.0, "seed": 7}
    a, b = (c.post("/generate", json=req).json()["generated"] for _ in range(2))
    other = c.post("/generate", json={**req, "seed": 8}).json()["generated"]
    assert a == b and a != other


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"prompt": "x", "steering": "weeknd", "max_length": 0}, 422, "max_length"),
    ({"prompt": "x", "steering": "weeknd", "max_length": 5000}, 422, "max_length"),
    ({"prompt": "x", "steering": "weeknd", "temperature": 3}, 422, "temperature"),
    ({"prompt": "", "steering": "weeknd"}, 422, "prompt"),
    ({"prompt": "x" * 4001, "steering": "weeknd"}, 422, "prompt"),
    ({"prompt": "x", "steering": [{"vector": "weeknd", "strength": 50}]}, 422, "steering.0.strength"),
    ({"prompt": "x", "steering": ["weeknd"] * 9}, 422, "at most 8 vectors"),
    ({"prompt": "x", "steering": "../../etc/passwd"}, 422, "steering.0.vector"),
    ({"prompt": "x", "steering": "weeknd", "strenght": 2}, 422, "strenght"),
    ({"prompt": "x", "steering": "weeknd", "top_p": 0}, 422, "top_p"),
    ({"prompt": "x", "steering": "nope"}, 404, "available tabby_cats, toronto, weeknd"),
    ({"prompt": "x", "steering": [{"vector": "weeknd", "layers": [9]}]}, 400, "numbered 0..3"),
    ({"prompt": "x"}, 400, "compare needs steering"),
    ({"prompt": "x", "steering": [{"vector": "weeknd", "dose": 0.5}]}, 400, "steerlab calibrate weeknd"),
    ({"prompt": "x", "steering": [{"vector": "weeknd", "dose": 0.5, "strength": 1}]}, 400, "one of dose, strength"),
    ({"prompt": "x", "steering": [{"vector": "weeknd", "dose": 7}]}, 422, "steering.0.dose"),
    ({"prompt": "x", "steering": [{"vector": "weeknd", "operator": "mul"}]}, 422, "steering.0.operator"),
    ({"prompt": "x", "steering": [{"vector": "weeknd", "operator": "rotate", "scale": 2}]}, 400, "scale is for"),
])
def test_refusals_are_clear(server, body, status, needle):
    r = server.client.post("/compare", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_malformed_json_is_422(server):
    r = server.client.post("/generate", content=b'{"prompt": "x", "max_length": }',
                           headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "malformed JSON" in r.json()["error"]
    r = server.client.post("/generate", json={"prompt": "x", "max_length": "many"})
    assert r.status_code == 422 and r.json()["error"].startswith("max_length:")


# ---- streaming -------------------------------------------------------------------------------
def test_streaming_compare_and_generate(server):
    evs = events(server.client, "/compare", greedy(steering="weeknd", n=10, stream=True))
    kinds = [e for e, _ in evs]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("delta") >= 2
    assert evs[0][1]["rows"] == ["base", "steered"]
    done = evs[-1][1]
    for row in ("base", "steered"):
        streamed = "".join(d["text"] for e, d in evs if e == "delta" and d["row"] == row)
        assert streamed.strip() == done[row]
    plain = server.client.post("/compare", json=greedy(steering="weeknd", n=10)).json()
    assert (done["base"], done["steered"]) == (plain["base"], plain["steered"])
    gen = events(server.client, "/generate", greedy(steering="toronto", n=6, stream=True))
    assert gen[-1][0] == "done" and {d["row"] for e, d in gen if e == "delta"} == {"generated"}


def test_disconnect_cancels_the_job(server):
    before = server.runner.stats().get("cancelled", 0)
    body = greedy(steering="weeknd", n=240, stream=True)
    with server.client.stream("POST", "/compare", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("event: delta"):
                break  # leave after the first token: the response is closed mid-stream
    for _ in range(200):
        stats = server.runner.stats()
        if stats.get("cancelled", 0) > before and not stats["busy"]:
            break
        time.sleep(0.05)
    stats = server.runner.stats()
    # >=: on a loaded machine an earlier test's cancelled job may be counted late too.
    assert stats.get("cancelled", 0) >= before + 1 and not stats["busy"]
    assert server.client.get("/health").json()["status"] == "ok"


# ---- the runner through HTTP: batching, queue bound, time limit --------------------------------
def _block(runner) -> threading.Event:
    """Occupy the worker until the returned event is set."""
    gate, running = threading.Event(), threading.Event()
    runner.call(lambda: (running.set(), gate.wait(30)))
    assert running.wait(10)
    return gate


def _wait_pending(runner, n: int) -> None:
    for _ in range(400):
        if runner.stats()["pending"] >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"expected {n} waiting jobs, got {runner.stats()['pending']}")


def test_concurrent_requests_share_one_batch(server):
    c = server.client
    bodies = [greedy(n=4), greedy(steering="weeknd", n=8), greedy(steering="toronto", n=12),
              {**greedy(n=5), "temperature": 0.8, "seed": 3}]  # sampled with a seed: runs alone
    solo = [c.post("/generate", json=b).json()["generated"] for b in bodies]
    results: list = [None] * len(bodies)
    gate = _block(server.runner)

    def post(i: int) -> None:
        results[i] = c.post("/generate", json=bodies[i]).json()

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    _wait_pending(server.runner, len(bodies))
    gate.set()
    for t in threads:
        t.join(60)
    assert [r["batch"] for r in results[:3]] == [{"jobs": 3, "rows": 3}] * 3
    assert results[3]["batch"] == {"jobs": 1, "rows": 1}
    assert [r["tokens"] for r in results[:3]] == [4, 8, 12]  # each job keeps its own length
    assert [r["generated"] for r in results] == solo


@pytest.fixture(scope="module")
def strict_server(tiny_model, tmp_path_factory):
    """A second app on the same model: a queue of 1 and a short time limit."""
    store = make_store(tiny_model, tmp_path_factory.mktemp("strict-vectors"))
    app = create_app(tiny_model, store, ServerSettings(max_queue=1, request_timeout_s=1.0))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield SimpleNamespace(client=client, runner=app.state.studio.runner)


def test_full_queue_is_503_and_slow_requests_504(strict_server):
    c, runner = strict_server.client, strict_server.runner
    gate = _block(runner)
    first: list[httpx.Response] = []
    waiting = threading.Thread(target=lambda: first.append(c.post("/generate", json=greedy(n=2))))
    try:
        waiting.start()
        _wait_pending(runner, 1)
        r = c.post("/generate", json=greedy(n=2))
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1 and "busy" in r.json()["error"]
        r = c.post("/vectors", json={"name": "late", "positive": ["a"], "negative": ["b"]})
        assert r.status_code == 202  # builds have their own thread: a full generation queue does not refuse them
        waiting.join(30)  # it waited past its 1 s limit behind the blocked worker
        assert first[0].status_code == 504 and "limit" in first[0].json()["error"]
        assert c.post("/generate", json=greedy(n=2)).status_code == 504  # a timed-out job frees its place
    finally:
        gate.set()
    assert c.post("/compare", json=greedy(steering="weeknd", n=2)).status_code == 200


# ---- vectors ---------------------------------------------------------------------------------
def _wait_build(c: httpx.Client, build: dict) -> dict:
    for _ in range(600):
        state = c.get(build["status_url"]).json()
        if state["state"] in ("done", "failed"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"build did not finish: {state}")


def test_list_vectors_and_plot(server):
    c = server.client
    data = c.get("/vectors").json()
    assert data["n_layers"] == 4 and [v["name"] for v in data["vectors"]] == sorted(NAMES)
    weeknd = c.get("/vectors/weeknd").json()
    assert weeknd["default_layers"] == [2] and weeknd["default_strength"] == 4.0 and weeknd["builtin"] is True
    assert weeknd["layers"] == [0, 1, 2, 3] and weeknd["plot"] is None
    assert c.get("/vectors/weeknd/plot").status_code == 404
    assert c.get("/vectors/nope").status_code == 404
    (server.store.folder / "toronto.sweep.png").write_bytes(PNG)
    try:
        plot = c.get("/vectors/toronto").json()["plot"]
        assert plot.startswith("/vectors/toronto/plot?v=")  # versioned: a browser never shows a stale plot
        r = c.get("/vectors/toronto/plot")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == PNG
    finally:
        (server.store.folder / "toronto.sweep.png").unlink()


def test_a_vector_file_changed_on_disk_is_reread(server, tiny_model):
    """`steerlab sweep` (another process) stores new defaults: the running server shows and applies them."""
    c, path = server.client, server.store.folder / "resaved.safetensors"
    vec = random_vector(tiny_model, range(tiny_model.n_layers), seed=7, name="resaved")
    vec.with_defaults(layers=[1]).save(path)
    try:
        assert c.get("/vectors/resaved").json()["default_layers"] == [1]  # a new file appears
        vec.with_defaults(layers=[3]).save(path)
        assert c.get("/vectors/resaved").json()["default_layers"] == [3]  # a changed file is re-read
        r = c.post("/generate", json={"prompt": "the cat", "steering": "resaved", "max_length": 2, "temperature": 0})
        assert r.json()["applied"][0]["layers"] == [3]
    finally:
        path.unlink()
    assert "resaved" not in [v["name"] for v in c.get("/vectors").json()["vectors"]]  # and a deleted one goes


def test_build_a_persona_in_the_background(server):
    c = server.client
    body = {"name": "kittens", "positive": ["the cat sat on the mat and purred", "a cat in the warm sun"],
            "negative": ["the man sat on the mat and talked", "a car in the warm sun"], "default_layers": [1],
            "default_strength": 3.0, "description": "cats"}
    gate, running = threading.Event(), threading.Event()  # the build waits: the server must stay responsive
    server.app.state.studio.build_worker.call(lambda: (running.set(), gate.wait(30)))
    assert running.wait(10)
    try:
        r = c.post("/vectors", json=body)
        assert r.status_code == 202, r.text
        build = r.json()
        assert build["state"] == "queued" and build["total"] == 4
        health = c.get("/health").json()
        assert [b["name"] for b in health["builds"]] == ["kittens"]
        assert c.post("/vectors", json=body).status_code == 409  # same name, being built
    finally:
        gate.set()
    done = _wait_build(c, build)
    assert done["state"] == "done" and done["progress"] == 1.0 and done["vector"]["default_layers"] == [1]
    assert "at least 4 pairs" in done["doctor"]["error"]  # two pairs: too few to grade, said so
    names = [v["name"] for v in c.get("/vectors").json()["vectors"]]
    assert "kittens" in names
    cmp = c.post("/compare", json=greedy(steering="kittens")).json()  # usable at once
    assert _brief(cmp["applied"]) == [{"vector": "kittens", "strength": 3.0, "layers": [1]}]
    assert (server.store.folder / "kittens.safetensors").exists()

    r = c.post("/vectors", json=body)
    assert r.status_code == 409 and "overwrite" in r.json()["error"]
    r = c.post("/vectors", json={**body, "name": "weeknd"})
    assert r.status_code == 409  # never replace a built-in silently
    r = c.post("/vectors", json={**body, "default_strength": 1.5, "overwrite": True})
    assert r.status_code == 202
    assert _wait_build(c, r.json())["vector"]["default_strength"] == 1.5
    four = {**body, "name": "kittens4", "positive": body["positive"] * 2, "negative": body["negative"] * 2}
    doctor = _wait_build(c, c.post("/vectors", json=four).json())["doctor"]
    assert doctor["grade"] in "ABCDF" and doctor["graded_layers"] == [1] and doctor["advice"]


def test_build_progress_streams_and_bad_requests(server):
    c = server.client
    body = {"name": "streamed", "positive": ["a b c", "d e f", "g h"], "negative": ["x y z", "u v w", "q r"]}
    build = c.post("/vectors", json=body).json()
    seen = []
    with c.stream("GET", build["events_url"]) as resp:
        event = None
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                seen.append((event, json.loads(line[5:])))
    assert seen[-1][0] == "done" and seen[-1][1]["progress"] == 1.0
    assert c.get("/builds/nope").status_code == 404
    for bad, needle in [({**body, "name": "bad name!"}, "invalid name"), ({**body, "name": "none"}, "no steering"),
                        ({**body, "positive": []}, "positive"), ({**body, "positive": ["  "]}, "non-blank"),
                        ({**body, "name": "ok2", "default_layers": [7]}, "out of range")]:
        r = c.post("/vectors", json=bad)
        assert r.status_code in (400, 422) and needle in r.json()["error"], r.text


# ---- the command -----------------------------------------------------------------------------
def test_serve_command_honours_env(tiny_dir, tmp_path):
    """`steerlab serve` in a subprocess: HOST, PORT and STRENGTH from the environment."""
    import os
    import sys

    exe = shutil.which("steerlab") or os.path.join(os.path.dirname(sys.executable), "steerlab")
    folder = tmp_path / "vecs"
    lm = load_model(str(tiny_dir), device="cpu")
    make_store(lm, folder)
    port = free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "STRENGTH": "0.5"}
    proc = subprocess.Popen([exe, "serve", "--model", str(tiny_dir), "--vectors", str(folder), "--no-build",
                             "--threads", "1", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url)
        data = httpx.get(f"{url}/vectors").json()
        assert data["strength_override"] == 0.5
        assert {v["default_strength"] for v in data["vectors"]} == {0.5}
        body = httpx.post(f"{url}/compare", json=greedy(steering="weeknd", n=4), timeout=60).json()
        assert body["applied"][0]["strength"] == 0.5
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}" in out


def test_precomputed_examples_run_in_their_mode(tiny_model, tmp_path):
    """A raw example is a completion, a chat example goes through the template; same as generate()."""
    from steerlab.generate import GenerationOptions, generate
    from steerlab.server.precompute import example_prompts, precompute

    assert {chat for _, chat in example_prompts(11)} == {True, False}
    store = make_store(tiny_model, tmp_path / "v")
    data = precompute(tiny_model, store, {"weeknd": None}, [("the cat", False), ("the cat", True)], max_new_tokens=3)
    raw, chat = data["personas"]["weeknd"]["examples"]
    assert (raw["chat"], chat["chat"]) == (False, True)
    for ex in (raw, chat):
        expected = generate(tiny_model, "the cat", [], options=GenerationOptions(max_new_tokens=3, chat=ex["chat"]))[0]
        assert ex["base"] == expected
