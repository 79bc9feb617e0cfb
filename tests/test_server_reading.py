"""The ``read`` field of /generate, /compare and /v1/chat/completions, and POST /read, on the tiny model."""

from __future__ import annotations

import json

import pytest
from test_server import events, greedy


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def server(tiny_studio):
    return tiny_studio


def check_row(row: dict, text: str, names: list[str]) -> None:
    assert "".join(row["tokens"]) == text
    assert set(row["values"]) == set(names)
    assert all(len(v) == len(row["tokens"]) for v in row["values"].values())


def test_generate_and_compare_return_readings_that_tile_the_text(server):
    c = server.client
    r = c.post("/generate", json=greedy(steering="weeknd", read=["tabby_cats", "weeknd"]))
    assert r.status_code == 200, r.text
    data = r.json()
    check_row(data["read"]["generated"], data["generated"], ["tabby_cats", "weeknd"])
    r = c.post("/compare", json=greedy(steering="weeknd", read=["weeknd"]))
    data = r.json()
    check_row(data["read"]["base"], data["base"], ["weeknd"])
    check_row(data["read"]["steered"], data["steered"], ["weeknd"])
    # the same reply read twice (cached reader) gives the same numbers
    again = c.post("/compare", json=greedy(steering="weeknd", read=["weeknd"])).json()
    assert again["read"] == data["read"]


def test_no_read_means_no_reading(server):
    before = server.app.state.studio.runner.stats()
    r = server.client.post("/generate", json=greedy(steering="weeknd"))
    assert "read" not in r.json()
    after = server.app.state.studio.runner.stats()
    assert after.get("calls", 0) == before.get("calls", 0)  # no extra work on the worker


def test_streamed_done_event_carries_the_readings(server):
    got = events(server.client, "/compare", greedy(steering="toronto", read=["toronto"], stream=True))
    kinds = [k for k, _ in got]
    assert kinds[0] == "start" and kinds[-1] == "done" and "delta" in kinds
    done = got[-1][1]
    check_row(done["read"]["steered"], done["steered"], ["toronto"])


def test_unknown_read_vector_is_refused_before_generating(server):
    r = server.client.post("/generate", json=greedy(steering="weeknd", read=["nope"]))
    assert r.status_code == 404 and "unknown vector 'nope'" in r.json()["error"]
    r = server.client.post("/generate", json=greedy(read=["bad name!"]))
    assert r.status_code == 422


def test_read_endpoint_monitors_any_text(server):
    r = server.client.post("/read", json={"text": "the cat sat on the mat", "read": ["tabby_cats"]})
    assert r.status_code == 200, r.text
    check_row(r.json()["read"], "the cat sat on the mat", ["tabby_cats"])
    as_reply = server.client.post("/read", json={"text": "the cat sat on the mat", "read": ["tabby_cats"],
                                                 "prompt": "tell me"}).json()
    assert as_reply["read"]["tokens"] == r.json()["read"]["tokens"]
    assert server.client.post("/read", json={"text": "x", "read": []}).status_code == 422


def test_openai_chat_returns_readings_plain_and_streamed(server):
    body = {"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 6, "temperature": 0,
            "steering": "weeknd", "read": ["weeknd"]}
    r = server.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    check_row(data["read"], data["choices"][0]["message"]["content"], ["weeknd"])
    chunks = []
    with server.client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunks.append(json.loads(line[5:]))
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    reads = [ch["read"] for ch in chunks if "read" in ch]
    assert len(reads) == 1 and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    check_row(reads[0], text, ["weeknd"])


def test_lens_endpoint(server):
    r = server.client.get("/vectors/weeknd/lens", params={"k": 3})
    assert r.status_code == 200, r.text
    rows = r.json()["layers"]
    assert [x["layer"] for x in rows] == [2, server.lm.n_layers - 1]  # active layer + the deepest
    assert all(len(x["promoted"]) == 3 and len(x["suppressed"]) == 3 for x in rows)
    assert server.client.get("/vectors/nope/lens").status_code == 404
    assert server.client.get("/vectors/weeknd/lens", params={"k": 0}).status_code == 422


# ---- readings streamed with each token ---------------------------------------------------------------
def test_streamed_readings_line_up_token_for_token_with_the_text(server):
    """Every token but the last (never fed back) gets a ``read`` event whose span tiles the text, with
    the values the unsteered model gives those tokens in one full forward pass."""
    import torch

    from steerlab.generate import GenerationOptions, encode_prompts, generation_kwargs
    from steerlab.hooks import capture

    n = 8
    evs = events(server.client, "/generate", greedy(read=["tabby_cats"], n=n, stream=True))
    text = "".join(d["text"] for e, d in evs if e == "delta")
    reads = [d for e, d in evs if e == "read"]
    done = next(d for e, d in evs if e == "done")
    assert done["generated"] == text.strip() and done["tokens"] == n
    assert len(reads) == n - 1 and reads[0]["start"] == 0
    assert all(a["end"] == b["start"] for a, b in zip(reads, reads[1:]))
    assert text.startswith(text[: reads[-1]["end"]]) and reads[-1]["end"] < len(text)
    lm = server.lm
    enc = encode_prompts(lm, ["the cat sat"], False)
    ids = lm.model.generate(**enc, **generation_kwargs(lm, GenerationOptions(max_new_tokens=n, chat=False)))[0]
    reader = server.app.state.studio.readers.get(lm, [server.app.state.studio.store.vectors["tabby_cats"]])
    base = reader.baselines[0]
    vec = reader.vectors[0]
    with torch.no_grad(), capture(lm, base.layers, stop_early=False) as store:
        lm.model(input_ids=ids[None])
    first = enc["input_ids"].shape[1]
    proj = torch.stack([store[x][0, first : first + n - 1].double() @ (vec.directions[x] / vec.directions[x].norm()).double()
                        for x in base.layers], dim=1)
    want = base.score(proj).tolist()
    assert [r["read"]["tabby_cats"] for r in reads] == pytest.approx(want, abs=2e-3)


def test_streamed_readings_only_when_asked(server):
    evs = events(server.client, "/compare", greedy(steering="weeknd", stream=True))
    assert not [e for e, _ in evs if e == "read"]
    evs = events(server.client, "/compare", greedy(steering="weeknd", stream=True, read=["weeknd"]))
    rows = {d["row"] for e, d in evs if e == "read"}
    assert rows == {"base", "steered"}
