"""steerlab.compiled: decoding through one torch.compile graph, with steering as data in it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from helpers import random_vector
from torch._dynamo.utils import counters

from steerlab import GenerationOptions, Steer
from steerlab import compiled
from steerlab.generate import generate
from steerlab.hooks import steer, watch
from steerlab.models import LoadedModel

PROMPTS = ["the cat sat on", "hello there"]
OPTS = GenerationOptions(max_new_tokens=12, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def pair(one_torch_thread):
    """The same tiny model twice: eager, and with compiled decoding enabled."""
    lms = []
    for _ in range(2):
        model, tok = make_tiny("llama", seed=3)
        lms.append(LoadedModel(model=model, tokenizer=tok, model_id="tiny-llama"))
    compiled.enable(lms[1])
    return lms[0], lms[1]


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def test_compiled_decoding_gives_eager_greedy_tokens_and_new_vectors_reuse_the_graph(pair):
    eager, comp = pair
    plain = generate(eager, PROMPTS[0], None, options=OPTS)
    before = _graphs()
    assert generate(comp, PROMPTS[0], None, options=OPTS) == plain
    assert _graphs() > before  # the decode step was compiled
    traced = _graphs()
    for seed, layers in ((1, (1, 2)), (2, (0, 3)), (3, (2,))):
        vec = random_vector(eager, layers, seed=seed)
        want = generate(eager, PROMPTS[0], [Steer(vec, strength=6.0)], options=OPTS)
        assert want != plain  # the vector changes the reply ...
        assert generate(comp, PROMPTS[0], [Steer(vec, strength=6.0)], options=OPTS) == want  # ... compiled too
    assert _graphs() == traced  # steering is data in the graph: other vectors compile nothing new
    with steer(comp, [Steer(vec, strength=6.0)]):  # and those generations did run compiled
        assert compiled.generate_settings(comp, {"max_new_tokens": 8}, 4)["cache_implementation"] == "static"
    assert generate(comp, PROMPTS[0], None, options=OPTS) == plain  # and nothing stays behind


def test_governor_gain_written_between_steps_reaches_the_compiled_step(pair):
    eager, comp = pair
    vec = random_vector(eager, (1, 2), seed=5)
    entry = [Steer(vec, strength=6.0, governor=True)]
    reports: list[dict] = [{}, {}]
    want = generate(eager, PROMPTS[0], entry, options=OPTS, report=reports[0])
    assert generate(comp, PROMPTS[0], entry, options=OPTS, report=reports[1]) == want
    assert reports[0]["gains"] == reports[1]["gains"]
    assert min(reports[0]["gains"][0]) < 1.0  # the random model's text "breaks": the gain did move


def test_rows_steered_differently_in_one_batch(pair):
    eager, comp = pair
    vec = random_vector(eager, (1, 3), seed=7)
    rows = [[], [Steer(vec, strength=6.0)]]
    assert generate(comp, PROMPTS, rows, options=OPTS) == generate(eager, PROMPTS, rows, options=OPTS)


def test_other_hooks_decode_eagerly_and_still_apply(pair):
    eager, comp = pair
    vec = random_vector(eager, (1, 2), seed=9)
    entry = [Steer(vec, strength=6.0, operator="target")]
    with steer(comp, entry):
        assert compiled.generate_settings(comp, {"max_new_tokens": 8}, 4) == {"disable_compile": True}
    with watch(comp, {1: torch.ones(1, comp.hidden_size)}):
        assert compiled.generate_settings(comp, {"max_new_tokens": 8}, 4) == {"disable_compile": True}
    assert generate(comp, PROMPTS[0], entry, options=OPTS) == generate(eager, PROMPTS[0], entry, options=OPTS)
    settings = compiled.generate_settings(comp, {"max_new_tokens": 8}, 300)
    assert settings["cache_implementation"] == "static" and settings["max_cache_len"] == 3 * compiled.CACHE_STEP


def test_without_enable_nothing_changes(pair, monkeypatch):
    eager, _ = pair
    assert eager.slots is None and compiled.generate_settings(eager, {}, 4) == {}
    monkeypatch.setenv(compiled.ENV, "1")
    assert compiled.wanted(None) and not compiled.wanted(False)
    monkeypatch.setenv(compiled.ENV, "0")
    assert not compiled.wanted(None)


def test_load_model_and_the_cli_take_compile(tiny_dir, monkeypatch):
    from click.testing import CliRunner

    from steerlab.cli import main
    from steerlab.models import load_model

    assert load_model(str(tiny_dir), device="cpu", compile=True).slots is not None
    assert load_model(str(tiny_dir), device="cpu").slots is None
    monkeypatch.setenv(compiled.ENV, "1")
    assert load_model(str(tiny_dir), device="cpu").slots is not None
    assert load_model(str(tiny_dir), device="cpu", compile=False).slots is None
    # one new token: the prompt's pass only, nothing to compile
    r = CliRunner().invoke(main, ["generate", "the cat", "--model", str(tiny_dir), "--compile", "--max-new-tokens", "1"])
    assert r.exit_code == 0, r.output
    assert "--compile" in CliRunner().invoke(main, ["compare", "--help"]).output
