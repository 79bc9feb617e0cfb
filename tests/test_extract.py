"""Extraction: masked, sink-aware pooling; early stop; batching; direction estimators."""

from __future__ import annotations

import pytest
import torch

from steerlab import SteeringError, build_vector
from steerlab.extract import pooled_activations, pooling_weights
from steerlab.methods import mean_diff, pca, probe

TEXTS = ["the cat sat on the mat", "toronto has a tall tower by the lake and cold winters", "money"]


def test_mean_pooling_excludes_first_token_and_padding():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])  # right- and left-padded rows
    w = pooling_weights(mask, "mean")
    assert torch.allclose(w[0], torch.tensor([0, 1, 1, 1, 0, 0]) / 3)
    assert torch.allclose(w[1], torch.tensor([0, 0, 0, 1, 1, 1]) / 3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_and_window_index_under_padding(side):
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    if side == "left":
        mask = mask.flip(1)
    w = pooling_weights(mask, "last")
    last0 = 2 if side == "right" else 4
    assert w[0].argmax().item() == last0 and w[0].sum() == 1
    assert w[1].argmax().item() == 4
    win = pooling_weights(mask, "window:2")
    expected = {2: [1, 2], 4: [3, 4]}[last0]
    assert set(win[0].nonzero().flatten().tolist()) == set(expected)


def test_one_token_text_falls_back_to_its_last_token():
    w = pooling_weights(torch.tensor([[0, 0, 1]]), "mean")
    assert w.tolist() == [[0.0, 0.0, 1.0]]
    with pytest.raises(SteeringError, match="unknown pooling"):
        pooling_weights(torch.tensor([[1]]), "median")


def test_padding_side_does_not_change_pooled_values(tiny_lm):
    tok = tiny_lm.tokenizer
    out = {}
    for side in ("left", "right"):
        tok.padding_side = side
        out[side], _ = pooled_activations(tiny_lm, TEXTS, [1, 3], progress=False)
    tok.padding_side = "right"
    for layer in (1, 3):
        torch.testing.assert_close(out["left"][layer], out["right"][layer], atol=1e-4, rtol=1e-4)


def test_early_stop_and_batching_match_full_unbatched_pass(tiny_lm):
    acts, _ = pooled_activations(tiny_lm, TEXTS, [1], batch_size=2, progress=False)
    for i, text in enumerate(TEXTS):
        enc = tiny_lm.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hs = tiny_lm.model(**enc, output_hidden_states=True).hidden_states[2][0]  # block 1
        expected = hs[1:].mean(0) if len(hs) > 1 else hs[-1]  # one-token text: its only token
        torch.testing.assert_close(acts[1][i], expected, atol=1e-5, rtol=1e-4)


def test_early_stop_skips_deeper_layers(tiny_lm):
    calls = []
    hook = tiny_lm.layers[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        pooled_activations(tiny_lm, TEXTS, [0, 1], progress=False)
    finally:
        hook.remove()
    assert calls == []


def test_norms_in_fp32(tiny_lm):
    half = type(tiny_lm)(model=tiny_lm.model.to(torch.bfloat16), tokenizer=tiny_lm.tokenizer, model_id="t")
    try:
        _, norms = pooled_activations(half, TEXTS, [1], progress=False)
        assert isinstance(norms[1][0], float) and norms[1][0] > 0
        vec = build_vector(half, TEXTS[:2], TEXTS[1:], layers=[1], progress=False)
        assert vec.directions[1].dtype == torch.float32
    finally:
        tiny_lm.model.to(torch.float32)


def _synthetic(n=40, h=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(h, generator=g)
    true /= true.norm()
    base = torch.randn(n, h, generator=g) * 3
    pos = base + 2.0 * true + 0.3 * torch.randn(n, h, generator=g)
    neg = base + 0.3 * torch.randn(n, h, generator=g)
    return pos, neg, true


@pytest.mark.parametrize("method", [mean_diff, pca, probe])
def test_methods_recover_a_known_direction(method):
    pos, neg, true = _synthetic()
    d = method(pos, neg)
    cos = torch.nn.functional.cosine_similarity(d, true, dim=0)
    assert cos > (0.99 if method is not probe else 0.9)


def test_pca_sign_and_determinism():
    pos, neg, true = _synthetic(seed=3)
    d1, d2 = pca(pos, neg), pca(pos, neg)
    assert torch.equal(d1, d2)
    assert d1 @ true > 0
    assert pca(neg, pos) @ true < 0  # swapping classes flips the sign
    with pytest.raises(SteeringError, match="paired"):
        pca(pos, neg[:-1])


def test_build_vector_metadata(tiny_lm):
    vec = build_vector(tiny_lm, TEXTS[:2], TEXTS[1:], layers=[1, 2], default_layers=[2], name="t",
                       method="pca", pooling="window:3", progress=False)
    assert vec.layers == [1, 2] and vec.default_layers == (2,)
    assert vec.method == "pca" and vec.pooling == "window:3" and len(vec.contrast_hash) == 16
    for layer in vec.layers:
        assert vec.directions[layer].norm().item() == pytest.approx(1.0, abs=1e-5)
        assert vec.norms[layer] > 0


def test_chat_building_pools_only_the_reply(tiny_lm):
    acts, _ = pooled_activations(tiny_lm, ["the cat sat"], [1], chat=True, progress=False)
    full, start = tiny_lm.format_reply("the cat sat")
    enc = tiny_lm.tokenizer(full, return_tensors="pt", add_special_tokens=False)
    n_prefix = len(tiny_lm.tokenizer(full[:start], add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        hs = tiny_lm.model(**enc, output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(acts[1][0], hs[n_prefix:].mean(0), atol=1e-5, rtol=1e-4)


def test_mean_centred_is_half_contrast_half_centring_on_the_models_own_replies(tiny_lm):
    pos, neg, own = TEXTS[:2], TEXTS[1:], ["a plain reply about nothing much", "another ordinary answer"]
    vec = build_vector(tiny_lm, pos, neg, layers=[1, 2], method="mean_centred", own_replies=own, progress=False)
    p, _ = pooled_activations(tiny_lm, pos, [1, 2], progress=False)
    n, _ = pooled_activations(tiny_lm, neg, [1, 2], progress=False)
    o, _ = pooled_activations(tiny_lm, own, [1, 2], progress=False)
    assert vec.method == "mean_centred"
    for layer in (1, 2):
        want = p[layer].mean(0) - 0.5 * (n[layer].mean(0) + o[layer].mean(0))
        torch.testing.assert_close(vec.directions[layer], want / want.norm(), atol=1e-5, rtol=1e-4)
    # without replies given, the model's own greedy replies to the shipped neutral prompts are read
    default = build_vector(tiny_lm, pos, neg, layers=[1], method="mean_centred", progress=False)
    plain = build_vector(tiny_lm, pos, neg, layers=[1], progress=False)
    assert float(default.directions[1] @ plain.directions[1]) < 0.999
