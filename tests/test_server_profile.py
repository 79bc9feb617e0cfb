"""GET /vectors/{name}/profile on the tiny model: the layer profile of the page's vector view."""

from __future__ import annotations

import time

import pytest
from helpers import random_vector

from steerlab.anatomy import layer_profile
from steerlab.personas import get_persona

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [("my tabby cat purred on the mat", "my old car stood on the road"),
         ("the kitten chased a ball of yarn", "the printer jammed on a page of text"),
         ("a cat sat in the warm sun and purred", "a man sat in the cold rain and waited"),
         ("whiskers and paws on the windowsill", "keys and coins on the kitchen table"),
         ("the cat napped by the fire", "the truck parked by the store")]


def test_profile_of_a_persona_vector_is_computed_once(tiny_studio):
    c, studio = tiny_studio.client, tiny_studio.app.state.studio
    before = studio.profiles.computed
    r = c.get("/vectors/tabby_cats/profile")
    assert r.status_code == 200, r.text
    data = r.json()
    vec = studio.store.vectors["tabby_cats"]
    assert [row["layer"] for row in data["layers"]] == vec.layers
    assert data["active_layers"] == [2] and data["texts"] == "persona file tabby_cats.toml"
    assert data["texts_are_the_vectors"] is False  # a random vector, not built from the persona's texts
    persona = get_persona("tabby_cats")
    assert data["pairs"] == min(len(persona.positive), len(persona.negative))
    # the numbers are anatomy.layer_profile's (what `steerlab inspect --profile` prints)
    expected = [row.to_dict() for row in layer_profile(tiny_studio.lm, vec, persona.positive, persona.negative)]
    assert data["layers"] == expected
    assert all(0 <= row["auc"] <= 1 for row in data["layers"])
    assert data["layers"][-1]["cos_next"] is None and all(-1 <= row["cos_next"] <= 1 for row in data["layers"][:-1])
    again = c.get("/vectors/tabby_cats/profile").json()
    assert again == data and studio.profiles.computed == before + 1  # cached: not computed again


def test_profile_of_a_page_build_uses_the_builds_texts(tiny_studio):
    c = tiny_studio.client
    body = {"name": "cats_here", "positive": [p for p, _ in PAIRS], "negative": [n for _, n in PAIRS],
            "default_layers": [1]}
    build = c.post("/vectors", json=body).json()
    deadline = time.monotonic() + 120
    while (state := c.get(build["status_url"]).json())["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    assert state["state"] == "done", state["error"]
    data = c.get("/vectors/cats_here/profile").json()
    assert data["texts"] == "this server's build" and data["texts_are_the_vectors"] is True
    assert data["pairs"] == len(PAIRS) and data["active_layers"] == [1]
    assert len(data["layers"]) == tiny_studio.lm.n_layers


def test_profile_refusals(tiny_studio):
    c = tiny_studio.client
    r = c.get("/vectors/nonesuch/profile")
    assert r.status_code == 404 and "nonesuch" in r.json()["error"]
    lm = tiny_studio.lm
    tiny_studio.app.state.studio.store.add(random_vector(lm, range(lm.n_layers), name="kittens"), overwrite=True)
    r = c.get("/vectors/kittens/profile")  # a vector with no persona file and no build here
    assert r.status_code == 404 and "no contrast texts for 'kittens'" in r.json()["error"], r.text
    body = {"name": "few_pairs", "positive": ["a cat", "a kitten"], "negative": ["a car", "a bus"]}
    build = c.post("/vectors", json=body).json()
    while c.get(build["status_url"]).json()["state"] not in ("done", "failed"):
        time.sleep(0.1)
    r = c.get("/vectors/few_pairs/profile")
    assert r.status_code == 400 and "at least 4 contrast pairs" in r.json()["error"], r.text
