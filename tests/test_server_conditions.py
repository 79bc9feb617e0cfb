"""The ``when`` field of a steering entry over HTTP, on the tiny model: fired or not, per row, before generating."""

from __future__ import annotations

import pytest
from test_server import events, greedy

pytestmark = pytest.mark.usefixtures("one_torch_thread")




def entry(threshold: float, on: str = "prompt", **kw) -> list[dict]:
    return [{"vector": "weeknd", "when": {"vector": "tabby_cats", "threshold": threshold, "on": on, **kw}}]


@pytest.mark.parametrize("on", ["prompt", "text"])
def test_a_condition_that_never_fires_is_unsteered(tiny_studio, on):
    r = tiny_studio.client.post("/compare", json=greedy(steering=entry(99, on)))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["base"] == data["steered"]
    (applied,) = data["applied"]
    assert applied["fired"] is False and applied["when"]["vector"] == "tabby_cats" and applied["when"]["on"] == on


def test_a_condition_that_always_fires_steers_as_without_it(tiny_studio):
    c = tiny_studio.client
    data = c.post("/compare", json=greedy(steering=entry(-99, stat="peak"))).json()
    plain = c.post("/compare", json=greedy(steering=[{"vector": "weeknd"}])).json()
    assert data["steered"] == plain["steered"] != data["base"]
    assert data["applied"][0]["fired"] is True and "value" in data["applied"][0]["when"]


def test_text_condition_reports_when_it_fired_in_the_stream(tiny_studio):
    evs = events(tiny_studio.client, "/generate", greedy(steering=entry(-99, "text"), stream=True))
    start = next(d for e, d in evs if e == "start")
    assert start["applied"][0]["fired"] is None  # known once the row is done
    done = next(d for e, d in evs if e == "done")
    assert done["applied"][0]["fired"] is True and done["applied"][0]["first_steered_token"] == 2


def test_unknown_or_bad_condition_is_refused_before_generating(tiny_studio):
    c = tiny_studio.client
    before = tiny_studio.app.state.studio.runner.stats()["batches"]
    r = c.post("/generate", json=greedy(steering=[{"vector": "weeknd", "when": {"vector": "nope"}}]))
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = c.post("/generate", json=greedy(steering=entry(1.0, stat="max")))
    assert r.status_code == 422
    r = c.post("/generate", json=greedy(steering=entry(1.0, on="reply")))
    assert r.status_code == 422
    assert tiny_studio.app.state.studio.runner.stats()["batches"] == before


def test_chat_reports_prompt_conditions(tiny_studio):
    r = tiny_studio.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "the cat sat"}],
                                                         "max_tokens": 4, "temperature": 0, "steering": entry(99)})
    assert r.status_code == 200, r.text
    assert r.json()["steering"][0]["fired"] is False
