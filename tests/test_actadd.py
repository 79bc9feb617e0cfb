"""ActAdd-style pair vectors: padding, the per-position front injection, the single-vector build."""

from __future__ import annotations

import pytest
import torch
from helpers import hidden_states

from steerlab import SteeringError
from steerlab.actadd import (
    actadd,
    actadd_delta,
    actadd_generate,
    build_pair_vector,
    encode_raw,
    pad_pair,
    pair_residuals,
)
from steerlab.hooks import add_at_front, capture


def _hidden(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states


def test_pad_pair_follows_the_tokenizer_and_pads_with_spaces(tiny_lm):
    tok = tiny_lm.tokenizer
    space = tok(" ", add_special_tokens=False)["input_ids"]
    assert encode_raw(tiny_lm, "the cat") == tok("the cat")["input_ids"]  # the model's usual tokenisation
    pos, neg = pad_pair(tiny_lm, "the cat", "a computer runs programs", prepend_bos=True)
    assert len(pos) == len(neg) and pos[0] == neg[0] == tok.bos_token_id
    short = encode_raw(tiny_lm, "the cat", prepend_bos=True)
    assert pos[: len(short)] == short and pos[len(short):] == space * (len(pos) - len(short))
    assert pad_pair(tiny_lm, "the cat", "the dog", prepend_bos=False)[0][0] != tok.bos_token_id
    with pytest.raises(SteeringError, match="non-empty"):
        pad_pair(tiny_lm, "the cat", "  ")
    with pytest.raises(SteeringError, match="same tokens"):
        pad_pair(tiny_lm, "the cat", "the cat")


def test_pair_residuals_are_block_outputs(tiny_lm):
    """Layer i of the pair = hidden_states[i + 1] of each padded prompt (the layer convention)."""
    pos, neg = pad_pair(tiny_lm, "the cat", "toronto has a tall tower")
    res = pair_residuals(tiny_lm, "the cat", "toronto has a tall tower", layers=[0, 2])
    for layer in (0, 2):
        torch.testing.assert_close(res[layer][0], _hidden(tiny_lm, pos)[layer + 1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res[layer][1], _hidden(tiny_lm, neg)[layer + 1][0], rtol=1e-5, atol=1e-5)
    delta = actadd_delta(tiny_lm, "the cat", "toronto has a tall tower", layer=2, coefficient=3.0)
    torch.testing.assert_close(delta, 3.0 * (res[2][0] - res[2][1]))
    with_bos = actadd_delta(tiny_lm, "the cat", "toronto has a tall tower", layer=2, prepend_bos=True)
    assert float(with_bos[0].abs().max()) == 0.0  # a shared BOS position differs by nothing


def _block_outputs(lm, ids, layers):
    """Block outputs read by our own capture hook, registered after any steering hook (transformers 5
    records ``output_hidden_states`` before forward hooks run)."""
    with capture(lm, layers, stop_early=False) as store, torch.no_grad():
        lm.model(input_ids=torch.tensor([ids]))
    return {k: v.clone() for k, v in store.items()}


def test_add_at_front_adds_only_at_the_first_positions(tiny_lm):
    ids = encode_raw(tiny_lm, "the future of technology is bright")
    base = _block_outputs(tiny_lm, ids, [0, 1, 2])
    delta = torch.randn(3, tiny_lm.hidden_size)
    with add_at_front(tiny_lm, 1, delta):
        steered = _block_outputs(tiny_lm, ids, [0, 1, 2])
    assert torch.equal(steered[0], base[0])  # blocks before the layer: untouched
    torch.testing.assert_close(steered[1][0, :3], base[1][0, :3] + delta)
    assert torch.equal(steered[1][0, 3:], base[1][0, 3:])
    assert not torch.allclose(steered[2][0, 3:], base[2][0, 3:])  # later positions feel it through attention
    assert torch.equal(_block_outputs(tiny_lm, ids, [1])[1], base[1])  # hook removed on exit


def test_cached_generation_matches_uncached(tiny_lm):
    """Cached steps (one token each) are past the front and left alone, as with full recomputation."""
    ids = torch.tensor([encode_raw(tiny_lm, "the cat sat on the mat")])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tiny_lm.tokenizer.pad_token_id,
              attention_mask=torch.ones_like(ids))
    with actadd(tiny_lm, "the cat", "a computer", layer=1, coefficient=4.0):
        cached = tiny_lm.model.generate(ids, use_cache=True, **kw)
        uncached = tiny_lm.model.generate(ids, use_cache=False, **kw)
    assert cached.tolist() == uncached.tolist()


def test_coefficient_zero_is_unsteered_and_short_prompt_refused(tiny_lm):
    prompt = "the cat sat on the mat and purred"
    base = actadd_generate(tiny_lm, prompt, max_new_tokens=6)
    assert actadd_generate(tiny_lm, prompt, "the cat", "a car", layer=2, coefficient=0.0, max_new_tokens=6) == base
    ids = torch.tensor([encode_raw(tiny_lm, prompt)])
    with torch.no_grad():
        plain = tiny_lm.model(input_ids=ids).logits
        with actadd(tiny_lm, "the cat", "a car", layer=2, coefficient=8.0):
            steered = tiny_lm.model(input_ids=ids).logits
    assert not torch.allclose(plain[0, -1], steered[0, -1])
    with pytest.raises(SteeringError, match="longer prompt"):
        actadd_generate(tiny_lm, "the", "the cat sat on the mat", "a computer runs programs", layer=1)


def test_build_pair_vector(tiny_lm):
    vec = build_pair_vector(tiny_lm, "the cat", "a computer runs", layer=2, name="cat_pc")
    assert vec.layers == list(range(tiny_lm.n_layers)) and vec.default_layers == (2,)
    assert vec.name == "cat_pc" and vec.method == "actadd_pair:mean"
    assert vec.extra["pair"] == ["the cat", "a computer runs"]
    pos, neg = pad_pair(tiny_lm, "the cat", "a computer runs")
    diff = (_hidden(tiny_lm, pos)[3][0] - _hidden(tiny_lm, neg)[3][0])[1:].mean(0)  # layer 2 = hidden_states[3]
    torch.testing.assert_close(vec.directions[2], diff / diff.norm(), rtol=1e-4, atol=1e-5)
    assert vec.default_strength == 0.5
    assert vec.extra["difference_strength"]["2"] == pytest.approx(float(diff.norm()) / vec.norms[2], rel=1e-3)
    last = build_pair_vector(tiny_lm, "the cat", "a computer runs", layer=2, layers=[2], reduce="last")
    d = (_hidden(tiny_lm, pos)[3][0] - _hidden(tiny_lm, neg)[3][0])[-1]
    assert last.layers == [2]
    torch.testing.assert_close(last.directions[2], d / d.norm(), rtol=1e-4, atol=1e-5)
    with pytest.raises(SteeringError, match="no direction"):
        build_pair_vector(tiny_lm, "the cat", "the cat", layer=1)


def test_hidden_states_helper_agrees(tiny_lm):
    """Guard: helpers.hidden_states (tokenizer default) and encode_raw differ only by the BOS."""
    assert len(hidden_states(tiny_lm, "the cat")) == tiny_lm.n_layers + 1


def test_cli_build_pair(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from steerlab import SteeringVector
    from steerlab.cli import main

    out = tmp_path / "vecs"
    args = ["build", "--pair", "the cat", "a computer", "--name", "cat_pc", "--out", str(out), "--model", str(tiny_dir),
            "--prompt", "the cat"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "cat_pc: built from pair 'the cat' - 'a computer'" in r.output and "steered:" in r.output
    vec = SteeringVector.load(out / "cat_pc.safetensors")
    assert vec.default_layers == (1,) and len(vec.layers) == 4  # default layer ~ depth / 8, directions everywhere
    r = CliRunner().invoke(main, args + ["--layer", "2", "--force"])
    assert r.exit_code == 0, r.output
    assert SteeringVector.load(out / "cat_pc.safetensors").layers == [2]
