"""The embedded model: conversion cache, chat formatting, the attention sink, clean steering."""

from __future__ import annotations

import json

import pytest
import torch

from steerlab import GenerationOptions, Steer, generate
from steerlab.extract import pooled_activations
from steerlab.hooks import capture, run_until_captured
from steerlab.models import DEFAULT_MODEL, resolve_model_source

pytestmark = pytest.mark.model


def test_embedded_model_is_cached_as_safetensors(real_lm):
    folder, model_id = resolve_model_source(None)
    assert model_id == DEFAULT_MODEL == real_lm.model_id
    from pathlib import Path

    files = {p.name for p in Path(folder).iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    cfg = json.loads((Path(folder) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert "quantization_config" not in cfg
    assert real_lm.n_layers == 30 and real_lm.hidden_size == 576


def test_chat_template_is_applied_unless_raw(real_lm):
    chat = real_lm.format_prompt("Hello")
    assert chat.startswith("<|im_start|>system") and chat.endswith("<|im_start|>assistant\n")
    assert real_lm.format_prompt("Hello", chat=False) == "Hello"


def test_first_position_is_an_attention_sink_and_mean_pooling_skips_it(real_lm):
    text = "The weather today is mild with a light breeze from the lake."
    enc = real_lm.tokenizer(text, return_tensors="pt")
    with capture(real_lm, [12], stop_early=True) as store, torch.no_grad():
        run_until_captured(real_lm, **enc)
    norms = store[12][0].norm(dim=-1)
    assert norms[0] > 20 * norms[1:].max()  # the sink
    acts, stats = pooled_activations(real_lm, [text], [12], progress=False)
    typical = stats[12][0] / stats[12][1]
    assert typical == pytest.approx(float(norms[1:].mean()), rel=1e-4)
    assert acts[12][0].norm() < 2 * typical  # not dominated by the sink


def test_steering_changes_real_output_and_cleans_up(real_lm, real_vectors):
    opts = GenerationOptions(max_new_tokens=24)
    base = generate(real_lm, "Describe a typical morning routine.", options=opts)
    steered = generate(real_lm, "Describe a typical morning routine.", [Steer(real_vectors["tabby_cats"], strength=0.5, layers=(12,))], options=opts)
    assert steered != base
    assert generate(real_lm, "Describe a typical morning routine.", options=opts) == base
