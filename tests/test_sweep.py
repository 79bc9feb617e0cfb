"""Sweeps: the generator's mechanics on a tiny model, the CLI's files and metadata, a real sweep."""

from __future__ import annotations

import csv
import json
import math

import pytest
from click.testing import CliRunner

from steerlab import SteeringVector
from steerlab import evaluate as ev
from steerlab.cli import main
from steerlab.generate import GenerationOptions

from helpers import random_vector

PERSONA = """
name = "kittens"
description = "the cat sat on the mat and purred"
keywords = ["cat", "purred"]
default_layers = [2]
default_strength = 2.0
[[pairs]]
positive = "the cat sat on the mat and purred"
negative = "the man sat on the mat and talked"
[[pairs]]
positive = "a cat in the warm sun"
negative = "a car in the warm sun"
[[pairs]]
positive = "the cat purred in the sun"
negative = "the car stopped in the sun"
[[pairs]]
positive = "my cat sat on the mat"
negative = "my bag sat on the mat"
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small products: far faster on one thread


@pytest.fixture(scope="session")
def tiny_embedder_dir(tmp_path_factory):
    """A random tiny BERT encoder folder: stands in for all-MiniLM-L6-v2 in mechanics tests."""
    import torch
    from transformers import BertConfig, BertModel

    from conftest import make_tokenizer

    path = tmp_path_factory.mktemp("tiny-embedder")
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_embedder(tiny_embedder_dir):
    from steerlab.embed import load_embedder

    return load_embedder(tiny_embedder_dir)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_sweep_yields_base_then_every_cell(tiny_lm, tiny_embedder):
    vec = random_vector(tiny_lm, [1, 2], strength=1.0)
    prompts = ["the cat", "the future of technology", "money saved"]
    cells = ev.grid([(1,), (1, 2)], [0.0, 3.0])
    rows = list(ev.sweep(tiny_lm, vec, cells, prompts=prompts, embedder=tiny_embedder, description="a cat",
                         keywords=["cat"], options=GenerationOptions(max_new_tokens=6), batch_size=5,
                         setting="s"))
    assert rows[0].is_base and rows[0].concept == 0 and rows[0].fluency == pytest.approx(1.0)
    assert [(r.layers, r.strength) for r in rows[1:]] == [(c.layers, c.strength) for c in cells]
    assert all(r.n == 3 and len(r.outputs) == 3 and r.setting == "s" for r in rows[1:])
    # strength 0 is the base: same texts (greedy), so no gain and a perplexity ratio of 1
    zero = rows[1]
    assert [o.text for o in zero.outputs] == [o.text for o in rows[0].outputs]
    assert zero.concept_gain == pytest.approx(0, abs=1e-6) and zero.ppl_ratio == pytest.approx(1, rel=1e-4)
    # a strong push changes the text
    assert [o.text for o in rows[2].outputs] != [o.text for o in rows[0].outputs]
    for r in rows:
        assert 0 <= r.score <= 1 and 0 <= r.concept <= 1 and 0 <= r.fluency <= 1 and math.isfinite(r.ppl)
    # reusing the base row gives the same cells without regenerating it
    again = list(ev.sweep(tiny_lm, vec, cells[2:], prompts=prompts, embedder=tiny_embedder, description="a cat",
                          options=GenerationOptions(max_new_tokens=6), base=rows[0]))
    assert len(again) == 2 and [o.text for o in again[0].outputs] == [o.text for o in rows[3].outputs]
    best = ev.pick_best(rows)
    assert not best.is_base and best.score == max(r.score for r in rows[1:])


def test_sweep_command_writes_files_and_round_trips_metadata(tiny_dir, tiny_embedder_dir, tmp_path):
    persona = tmp_path / "kittens.toml"
    persona.write_text(PERSONA)
    vectors, out = tmp_path / "vecs", tmp_path / "sweep"
    assert run("build", persona, "--out", vectors, "--model", tiny_dir).exit_code == 0
    (tmp_path / "personas").mkdir(exist_ok=True)  # make it a known persona (layer signal, reference)
    (tmp_path / "personas" / "kittens.toml").write_text(PERSONA)
    before = SteeringVector.load(vectors / "kittens.safetensors")
    args = ("sweep", "kittens", "--layers", "1,2,1+3", "--strengths", "1,4", "--prompts", 3, "--max-new-tokens", 5,
            "--batch-size", 4, "--vectors", vectors, "--model", tiny_dir, "--embedder", tiny_embedder_dir,
            "--out", out)
    r = run(*args, "--no-save")
    assert r.exit_code == 0, r.output
    assert "layer signal" in r.output and "best: layer(s)" in r.output and "--no-save" in r.output
    assert SteeringVector.load(vectors / "kittens.safetensors").metadata() == before.metadata()
    assert not (vectors / "kittens.sweep.png").exists()

    r = run(*args)
    assert r.exit_code == 0, r.output
    for name in ("cells.csv", "cells.json", "generations.jsonl", "heatmap.png", "strength.png", "dose.png", "sweep.png"):
        assert (out / name).stat().st_size > 0, name
    with (out / "cells.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [row["label"] for row in table] == ["base", "1", "1", "2", "2", "1+3", "1+3"]
    data = json.loads((out / "cells.json").read_text())
    best = data["best"]
    assert len(data["rows"]) == 7 and len(data["layer_signal"]) == 3
    assert (out / "generations.jsonl").read_text().count("\n") == 7 * 3
    assert (vectors / "kittens.sweep.png").read_bytes() == (out / "sweep.png").read_bytes()

    vec = SteeringVector.load(vectors / "kittens.safetensors")
    assert list(vec.default_layers) == best["layers"] and vec.default_strength == best["strength"]
    assert vec.extra["sweep"]["best"]["layers"] == best["layers"]
    assert vec.extra["sweep"]["plot"] == "kittens.sweep.png" and vec.extra["positions"] == "all"
    assert vec.extra["operator"] == "add" and vec.extra["governor"] is False  # what is read back when steering
    # the window is re-measured at the chosen layers and the pick becomes the default dose: one setting
    window = vec.extra["windows"]["add"]
    assert window["layers"] == best["layers"] and 0 < vec.extra["default_dose"] <= 1
    from steerlab.spec import resolve

    r = resolve(vec, 4)
    if best["strength"] <= window["max_strength"]:
        assert r.strength == pytest.approx(best["strength"], rel=1e-2)
    assert "held_out" in vec.extra["sweep"] and "min(S on even" in vec.extra["sweep"]["pick"]
    assert all(vec.directions[k].equal(before.directions[k]) for k in before.layers)  # only metadata changed


def test_sweep_command_compares_settings(tiny_dir, tiny_embedder_dir, tmp_path):
    persona = tmp_path / "kittens.toml"
    persona.write_text(PERSONA)
    vectors = tmp_path / "vecs"
    assert run("build", persona, "--out", vectors, "--model", tiny_dir).exit_code == 0
    r = run("sweep", "kittens", "--layers", "2", "--strengths", "2", "--prompts", 2, "--max-new-tokens", 4,
            "--positions", "all,prompt,generated", "--norm-preserve", "off,on", "--vectors", vectors, "--model",
            tiny_dir, "--embedder", tiny_embedder_dir, "--out", tmp_path / "s", "--no-save")
    assert r.exit_code == 0, r.output
    for label in ("pos=all", "pos=prompt", "pos=generated", "pos=all,norm", "pos=prompt,norm", "pos=generated,norm"):
        assert f"[{label}]" in r.output
    assert len(json.loads((tmp_path / "s" / "cells.json").read_text())["rows"]) == 7


@pytest.mark.parametrize("bad, hint", [
    (("--strengths", "a,b"), "comma-separated numbers"),
    (("--positions", "some"), "choose from all, prompt, generated"),
    (("--layers", "99"), "out of range"),
])
def test_sweep_command_rejects_bad_options(tiny_dir, tmp_path, bad, hint):
    persona = tmp_path / "kittens.toml"
    persona.write_text(PERSONA)
    vectors = tmp_path / "vecs"
    assert run("build", persona, "--out", vectors, "--model", tiny_dir).exit_code == 0
    r = run("sweep", "kittens", *bad, "--vectors", vectors, "--model", tiny_dir, "--no-save")
    assert r.exit_code != 0 and hint in r.output


@pytest.mark.model
def test_real_sweep_picks_an_on_concept_fluent_cell(real_lm, tmp_path, monkeypatch):
    """tabby_cats on SmolLM2: 3 layers x 3 strengths, 6 prompts, 32 tokens, through the CLI."""
    from steerlab.personas import build_persona, get_persona

    vectors, out = tmp_path / "vecs", tmp_path / "sweep"
    vec = build_persona(real_lm, get_persona("tabby_cats"), layers=[8, 12, 16], progress=False)
    vec.save(vectors / "tabby_cats.safetensors")
    monkeypatch.setattr("steerlab.sweep_command.load_lm", lambda *a, **k: real_lm)  # the session's model
    r = run("sweep", "tabby_cats", "--layers", "8,12,16", "--strengths", "0.2,0.4,0.7", "--prompts", 6,
            "--max-new-tokens", 32, "--vectors", vectors, "--out", out)
    assert r.exit_code == 0, r.output
    data = json.loads((out / "cells.json").read_text())
    rows = {(tuple(x["layers"]), x["strength"]): x for x in data["rows"]}
    base, best = rows[((), 0.0)], data["best"]
    assert best["concept_sim"] > base["concept_sim"] + 0.1 and best["concept"] > 0.3
    assert best["fluency"] > 0.4 and best["ppl_ratio"] < 20 and best["rep"] < 0.2
    # the strongest push at the middle layer degenerates and must not win
    assert rows[((12,), 0.7)]["score"] < best["score"] and rows[((12,), 0.7)]["fluency"] < best["fluency"]
    # at least one layer shows a held-out separation before any generation
    assert max(s["auc"] for s in data["layer_signal"]) > 0.9
    loaded = SteeringVector.load(vectors / "tabby_cats.safetensors")
    assert list(loaded.default_layers) == best["layers"] and loaded.default_strength == best["strength"]
    assert (vectors / "tabby_cats.sweep.png").exists() and (out / "heatmap.png").exists()
