"""Layer lookup across architectures, one numbering convention, clear failures."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from helpers import random_vector

from steerlab import GenerationOptions, LayerError, generate
from steerlab.layers import find_layers, parse_layers
from steerlab.models import LoadedModel

ARCHS = ["llama", "mistral", "qwen2", "gemma", "phi", "gpt2", "gpt_neox", "opt"]


@pytest.mark.parametrize("arch", ARCHS)
def test_steering_works_on_common_architectures(arch):
    model, tok = make_tiny(arch)
    lm = LoadedModel(model=model, tokenizer=tok, model_id=f"tiny-{arch}")
    assert lm.n_layers == 4 and lm.hidden_size == 64
    opts = GenerationOptions(max_new_tokens=6, repetition_penalty=1.0)
    base = generate(lm, "the cat sat", options=opts)
    vec = random_vector(lm, [1, 2])
    with torch.no_grad():
        steered = generate(lm, "the cat sat", [(vec, 8.0)], options=opts)
    assert steered != base
    assert generate(lm, "the cat sat", options=opts) == base


def test_unknown_architecture_fails_clearly():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(torch.nn.Linear(2, 2))

    with pytest.raises(LayerError, match="could not find the decoder layers of Weird"):
        find_layers(Weird())


def test_parse_layers():
    assert parse_layers("12", 30) == [12]
    assert parse_layers("10,12,14", 30) == [10, 12, 14]
    assert parse_layers("4:24:2", 30) == list(range(4, 24, 2))
    assert parse_layers("-1", 30) == [29]
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    with pytest.raises(LayerError, match="out of range"):
        parse_layers("30", 30)
    with pytest.raises(LayerError, match="cannot read layer spec"):
        parse_layers("middle", 30)
