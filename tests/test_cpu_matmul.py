"""steerlab.cpu_matmul: decode-step products as mm(W, x.T), scoped to a generation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from steerlab import GenerationOptions, Steer, SteeringVector
from steerlab.cpu_matmul import SMALL_ROWS, _choice, decode_matmuls, measure
from steerlab.generate import generate

PROMPTS = ["the cat sat on", "a b c", "hello there", "one two three four"]


def _linears(lm) -> list[nn.Linear]:  # noqa: ANN001
    return [m for m in lm.model.modules() if type(m) is nn.Linear]


@pytest.mark.parametrize("rows", [1, 2, 3, SMALL_ROWS, SMALL_ROWS + 1, 40])
def test_same_numbers_as_f_linear_for_every_row_count(tiny_lm, monkeypatch, rows):
    monkeypatch.setenv("STEERLAB_CPU_MATMUL", "on")
    lin = nn.Linear(32, 48)
    x = torch.randn(rows, 32)
    ref = lin(x)
    with decode_matmuls(tiny_lm):  # patches the model's layers, not this one
        assert "forward" not in lin.__dict__
    layer = _linears(tiny_lm)[0]
    with torch.no_grad(), decode_matmuls(tiny_lm):
        assert "forward" in layer.__dict__
        y = layer(torch.randn(1, rows, layer.in_features))  # runs the patched path
        assert y.shape == (1, rows, layer.out_features)
    assert "forward" not in layer.__dict__  # restored
    from steerlab.cpu_matmul import _mm

    torch.testing.assert_close(_mm(x, lin.weight, True) + lin.bias, ref, rtol=1e-5, atol=1e-5)


def test_generation_gives_the_same_tokens_with_and_without(tiny_lm, monkeypatch):
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector(directions={1: nn.functional.normalize(torch.randn(tiny_lm.hidden_size, generator=g), dim=0)},
                         norms={1: 4.0}, model_id=tiny_lm.model_id, name="v")
    opts = GenerationOptions(max_new_tokens=12)
    rows = [[], [Steer(vec, strength=0.5)], [], [Steer(vec, strength=-0.5)]]
    out = {}
    for mode in ("off", "on"):
        monkeypatch.setenv("STEERLAB_CPU_MATMUL", mode)
        out[mode] = (generate(tiny_lm, PROMPTS[:1], None, options=opts), generate(tiny_lm, PROMPTS, rows, options=opts))
    assert out["on"] == out["off"]
    assert all("forward" not in m.__dict__ for m in _linears(tiny_lm))


def test_restored_after_an_exception_and_subclasses_left_alone(tiny_lm, monkeypatch):
    monkeypatch.setenv("STEERLAB_CPU_MATMUL", "on")

    class Quantised(nn.Linear):
        pass

    tiny_lm.model.extra_head = Quantised(4, 4)
    try:
        with pytest.raises(RuntimeError, match="boom"), decode_matmuls(tiny_lm):
            assert "forward" not in tiny_lm.model.extra_head.__dict__
            raise RuntimeError("boom")
        assert all("forward" not in m.__dict__ for m in _linears(tiny_lm))
    finally:
        del tiny_lm.model.extra_head


def test_choice_off_for_other_dtypes_and_env_and_measured_once(tiny_lm, monkeypatch):
    monkeypatch.setenv("STEERLAB_CPU_MATMUL", "off")
    assert _choice(tiny_lm) == (False, False)
    monkeypatch.setenv("STEERLAB_CPU_MATMUL", "auto")
    from steerlab.cpu_matmul import _MEASURED

    _MEASURED.pop(tiny_lm.model, None)
    first = _choice(tiny_lm)
    assert _MEASURED[tiny_lm.model] == first and _choice(tiny_lm) is _MEASURED[tiny_lm.model]  # measured once per model
    one, few = measure(torch.randn(256, 64))
    assert isinstance(one, bool) and isinstance(few, bool)
    tiny_lm.model.to(torch.bfloat16)
    try:
        monkeypatch.setenv("STEERLAB_CPU_MATMUL", "on")
        assert _choice(tiny_lm) == (False, False)  # float32 only: other dtypes keep F.linear
    finally:
        tiny_lm.model.to(torch.float32)
