"""``steerlab serve --engine vllm``: the studio's API with vLLM generating, a real server on loopback.

Runs in the vLLM environment (``make test-vllm``); skips elsewhere. Starts the ``steerlab``
command of this environment as a subprocess on the embedded SmolLM2 (CPU, fp32, 1 GiB KV
cache): it builds the persona vectors with transformers, then starts vLLM (2-4 minutes on a
2-core machine). Then: concurrent requests with different steering and none, which vLLM
batches together; steered rows show their concept, plain rows equal the same request alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import free_port, stop_group, wait_healthy

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is an optional engine: `make vllm-install`, then `make test-vllm`")
httpx = pytest.importorskip("httpx")

CATS = ("cat", "purr", "kitten", "whisker", "feline", "paw", "meow", "tabby")
PROMPTS = ["What should I cook for dinner tonight?", "Give me three tips for saving money."]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    folder = tmp_path_factory.mktemp("vllm-vectors")
    log = folder / "server.log"
    cmd = [str(Path(sys.executable).parent / "steerlab"), "serve", "--engine", "vllm", "--port", str(port),
           "--vectors", str(folder), "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-gib", "1"]
    env = {**os.environ, "STEERLAB_PERSONAS": str(folder / "personas")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, timeout=900, poll=2, log=log.read_text)
        yield url
    finally:
        stop_group(proc)
    print(f"\nserver log tail:\n{log.read_text()[-1500:]}")


def _cats(text: str) -> bool:
    return any(k in text.lower() for k in CATS)


def test_health_says_vllm(server):
    h = httpx.get(f"{server}/health").json()
    assert h["engine"] == "vllm" and h["device"] == "cpu" and h["dtype"] == "float32"
    assert {"tabby_cats", "toronto", "weeknd"} <= set(h["vectors"]) and h["n_layers"] == 30


def test_concurrent_mixed_steering_shares_vllm_and_only_steered_rows_change(server):
    cat = [{"vector": "tabby_cats"}]  # its default dose: 0.1 at layers 6-14
    greedy = {"max_length": 32, "temperature": 0}  # /generate samples at 0.7 by default (the seed's)
    requests = [
        ("/compare", {"prompt": PROMPTS[0], "steering": cat, "max_length": 32}),
        ("/generate", {"prompt": PROMPTS[1], **greedy}),
        ("/generate", {"prompt": PROMPTS[1], "steering": cat, **greedy}),
        ("/generate", {"prompt": PROMPTS[0], "steering": "toronto", **greedy}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 32,
                                  "temperature": 0, "steering": cat}),
        ("/generate", {"prompt": PROMPTS[0], **greedy}),
    ]
    answers: list[dict | None] = [None] * len(requests)

    def send(i: int) -> None:
        path, body = requests[i]
        r = httpx.post(server + path, json=body, timeout=600)
        r.raise_for_status()
        answers[i] = r.json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = {p: httpx.post(f"{server}/generate", json={"prompt": p, **greedy}, timeout=600).json()["generated"]
             for p in PROMPTS}
    cmp, plain1, cat1, toronto0, chat, plain0 = answers
    print("\n" + json.dumps({"compare": [cmp["base"], cmp["steered"]], "plain1": plain1["generated"],
                             "cat1": cat1["generated"], "toronto0": toronto0["generated"],
                             "chat": chat["choices"][0]["message"]["content"], "alone": alone}, indent=1))
    # the plain rows, batched with steered ones, equal the same requests sent alone
    assert cmp["base"] == plain0["generated"] == alone[PROMPTS[0]]
    assert plain1["generated"] == alone[PROMPTS[1]]
    # the steered rows show their concept, and differ from the plain ones
    assert _cats(cmp["steered"]) and _cats(cat1["generated"]) and _cats(chat["choices"][0]["message"]["content"])
    assert not _cats(alone[PROMPTS[0]]) and not _cats(alone[PROMPTS[1]])
    assert toronto0["generated"] != alone[PROMPTS[0]]
    # /compare sent its two rows to vLLM together; other requests were in flight beside them
    assert cmp["batch"]["rows"] >= 2 and max(a["batch"]["jobs"] for a in (cmp, plain1, cat1, plain0)) >= 2
    assert chat["choices"][0]["finish_reason"] in ("stop", "length") and chat["usage"]["completion_tokens"] > 0


def test_streaming_deltas_add_up_to_the_answer(server):
    body = {"prompt": PROMPTS[1], "steering": "tabby_cats", "max_length": 24, "stream": True}
    events = []
    with httpx.stream("POST", f"{server}/compare", json=body, timeout=600) as r:
        assert r.status_code == 200
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    done = events[-1][1]
    assert events[0][0] == "start" and events[-1][0] == "done"
    for row in ("base", "steered"):
        text = "".join(d["text"] for k, d in events if k == "delta" and d["row"] == row)
        assert text.strip() == done[row]
    assert sum(k == "delta" for k, _ in events) >= 10  # token by token, not one lump


def test_bad_steering_is_a_clear_error_and_builds_serve_at_once(server):
    r = httpx.post(f"{server}/generate", json={"prompt": "Hi", "steering": [{"vector": "tabby_cats", "layers": [99]}]})
    assert r.status_code == 400 and "99" in r.json()["error"]
    r = httpx.post(f"{server}/compare", json={"prompt": "Hi", "steering": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    # a vector built while vLLM serves (transformers builds it) steers vLLM's next request
    build = {"name": "ocean", "positive": ["The waves crash on the sandy beach.", "Sailors cross the deep blue sea.",
                                           "Whales and dolphins swim in the ocean.", "The tide rolls over the coral reef."],
             "negative": ["The train leaves the station at noon.", "She filed the tax forms on Monday.",
                          "The library opens at nine.", "He painted the kitchen wall white."],
             "default_layers": [10, 12, 14], "default_strength": 0.15}
    b = httpx.post(f"{server}/vectors", json=build).json()
    for _ in range(300):
        b = httpx.get(f"{server}/builds/{b['id']}").json()
        if b["state"] in ("done", "failed"):
            break
        time.sleep(1)
    assert b["state"] == "done", b
    out = httpx.post(f"{server}/compare", json={"prompt": PROMPTS[0], "steering": "ocean", "max_length": 32},
                     timeout=600).json()
    print("\nocean:", out["steered"])
    assert out["steered"] != out["base"]
    assert any(k in out["steered"].lower() for k in ("ocean", "sea", "wave", "beach", "fish", "coral", "whale", "tide"))
