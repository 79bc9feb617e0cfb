"""steerlab.quantize: int8 / int4 weight-only linear layers, and steering on a quantised model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from torch import nn

from steerlab import GenerationOptions, Steer, SteeringVector
from steerlab.errors import ModelLoadError
from steerlab.generate import generate
from steerlab.hooks import steer
from steerlab.models import LoadedModel, load_model
from steerlab.quantize import GROUP, Int4Linear, Int8Linear, quantize_model

PROMPTS = ["the cat sat on", "hello there"]


def _quantised_tiny(mode: str) -> LoadedModel:
    model, tok = make_tiny("llama")
    quantize_model(model, mode)
    return LoadedModel(model=model, tokenizer=tok, model_id="tiny-llama")


@pytest.mark.parametrize(("cls", "tol"), [(Int8Linear, 0.02), (Int4Linear, 0.12)])
def test_layer_computes_with_its_own_dequantised_weight_and_near_the_original(cls, tol):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    q = cls(lin)
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        y, ref = q(x), lin(x)
        via_weight = x @ q.weight.T + lin.bias
    assert y.shape == ref.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, via_weight, rtol=0.02, atol=0.02)  # bfloat16 activations
    assert float((y - ref).norm() / ref.norm()) < tol


def _rel_err(layer: nn.Module, w: torch.Tensor) -> float:
    return float((layer.weight - w).norm() / w.norm())


def test_int4_keeps_weights_that_are_already_on_a_4_bit_grid():
    """Groups of 32 on 16 levels (as a Q4_1 GGUF stores them) come back up to bfloat16 rounding, closer than int8."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 128 // GROUP, GROUP), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans the grid, as a min-max quantiser makes it
    scale = 0.01 + 0.1 * torch.rand(64, 128 // GROUP, 1, generator=g)
    low = -torch.rand(64, 128 // GROUP, 1, generator=g)
    w = (codes * scale + low).reshape(64, 128)
    lin = nn.Linear(128, 64, bias=False)
    lin.weight.data = w
    err4 = _rel_err(Int4Linear(lin), w)
    assert err4 < 0.005  # bfloat16 keeps 8 significant bits: ~0.2-0.4 % per number
    assert err4 < _rel_err(Int8Linear(lin), w) / 2


def test_int4_mode_swaps_every_linear_and_keeps_the_head_at_int8():
    model, _ = make_tiny("llama")
    n = sum(type(m) is nn.Linear for m in model.modules())
    assert quantize_model(model, "int4") == n
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    assert next(model.parameters()).dtype == torch.float32  # the residual stream keeps its dtype


def test_unknown_mode_is_refused():
    model, _ = make_tiny("llama")
    with pytest.raises(ModelLoadError, match="int8, int4"):
        quantize_model(model, "int3")
    assert quantize_model(model, "none") == 0


def _block_output(lm: LoadedModel, text: str, layer: int) -> torch.Tensor:
    """Block ``layer``'s output, captured by a hook registered last (after any steering hook)."""
    got = []
    handle = lm.layers[layer].register_forward_hook(
        lambda _m, _a, out: got.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        with torch.no_grad():
            lm.model(**lm.tokenizer([text], return_tensors="pt"))
    finally:
        handle.remove()
    return got[0]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_steering_adds_exactly_on_a_quantised_model(mode):
    lm = _quantised_tiny(mode)
    d = torch.randn(lm.hidden_size)
    vec = SteeringVector(directions={1: d}, norms={1: 2.0}, model_id=lm.model_id, name="v")
    before = [_block_output(lm, "the cat sat on", x) for x in (0, 1)]
    with steer(lm, [Steer(vec, strength=1.5)]):
        after = [_block_output(lm, "the cat sat on", x) for x in (0, 1)]
    assert torch.equal(before[0], after[0])
    torch.testing.assert_close(after[1], before[1] + vec.directions[1] * 1.5 * vec.norms[1])


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generation_on_a_quantised_model_zero_strength_is_plain(mode):
    lm = _quantised_tiny(mode)
    vec = SteeringVector(directions={1: torch.randn(lm.hidden_size)}, norms={1: 10.0}, model_id=lm.model_id,
                         name="v", default_strength=0.5)
    opts = GenerationOptions(max_new_tokens=8)
    plain = generate(lm, PROMPTS, None, options=opts)
    assert generate(lm, PROMPTS, [[Steer(vec, strength=0.0)]] * 2, options=opts) == plain
    assert generate(lm, PROMPTS, [[Steer(vec, strength=8.0)]] * 2, options=opts) != plain


def test_load_model_quantises_a_local_folder_and_the_lens_reads_the_head(tiny_dir):
    from steerlab.lens import logit_lens

    lm = load_model(str(tiny_dir), device="cpu", quantize="int8")
    assert isinstance(lm.model.get_output_embeddings(), Int8Linear)
    vec = SteeringVector(directions={1: torch.randn(lm.hidden_size)}, norms={1: 1.0}, model_id=lm.model_id, name="v")
    rows = logit_lens(lm, vec, k=3, readable=False)
    assert len(rows) == 1 and len(rows[0].promoted) == 3
    assert all(type(m) is nn.Linear for m in load_model(str(tiny_dir), device="cpu").model.modules()
               if isinstance(m, (nn.Linear, Int8Linear)))  # without quantize: untouched


@pytest.mark.model
def test_embedded_model_decoder_weights_survive_int4_better_than_int8(real_lm):
    """SmolLM2's decoder weights came from Q4_1 blocks of 32: int4 stores them on the same grid."""
    for lin in (real_lm.layers[3].mlp.down_proj, real_lm.layers[20].self_attn.q_proj):
        w = lin.weight.detach()
        err4 = _rel_err(Int4Linear(lin), w)
        assert err4 < 0.004
        assert err4 < _rel_err(Int8Linear(lin), w) / 2


def test_cli_quantize_option_on_generate_compare_and_serve(tiny_dir, monkeypatch):
    from click.testing import CliRunner

    from steerlab.cli import main

    def run(*args: str):  # noqa: ANN202
        return CliRunner().invoke(main, list(args))

    r = run("generate", "the cat", "--model", str(tiny_dir), "--quantize", "int4", "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("STEERLAB_QUANTIZE", "int8")
    r = run("generate", "the cat", "--model", str(tiny_dir), "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    r = run("compare", "the cat", "--model", str(tiny_dir), "--quantize", "int3")
    assert r.exit_code == 2 and "int3" in r.output
    r = run("serve", "--engine", "vllm", "--quantize", "int8")
    assert r.exit_code == 1 and "--quantize is for the transformers engine" in r.output
