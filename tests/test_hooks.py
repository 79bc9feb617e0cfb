"""Steering hooks: exact maths, cleanup, per-row batches, KV cache, tuple/tensor outputs."""

from __future__ import annotations

import pytest
import torch
from helpers import hidden_states, logits, random_vector

from steerlab import GenerationOptions, Steer, SteeringError, generate, steer
from steerlab.hooks import capture, run_until_captured

GREEDY = GenerationOptions(max_new_tokens=12, repetition_penalty=1.0)


def test_output_hidden_states_index_is_block_output(tiny_lm):
    """Convention: layer i == hidden_states[i + 1] == output of block i."""
    hs = hidden_states(tiny_lm, "the cat sat on the mat")
    enc = tiny_lm.tokenizer("the cat sat on the mat", return_tensors="pt")
    with capture(tiny_lm, [0, 2], stop_early=False) as store, torch.no_grad():
        run_until_captured(tiny_lm, **enc)
    assert torch.equal(store[0], hs[1])
    assert torch.equal(store[2], hs[3])


def _block_outputs(lm, text, layers):
    with capture(lm, layers, stop_early=False) as store, torch.no_grad():
        run_until_captured(lm, **lm.tokenizer(text, return_tensors="pt"))
    return dict(store)


def test_patch_is_exact_at_layer_and_absent_before(tiny_lm):
    """Blocks before L are untouched; block L's output is original + patch.

    (transformers 5 records ``output_hidden_states`` before forward hooks run, so the
    steered stream is read with our own capture hook, registered after the steering one.)
    """
    vec = random_vector(tiny_lm, [2])
    text = "toronto has a tall tower"
    before = _block_outputs(tiny_lm, text, [0, 1, 2, 3])
    with vec.applied(tiny_lm, strength=1.5):
        after = _block_outputs(tiny_lm, text, [0, 1, 2, 3])
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    delta = vec.directions[2] * 1.5 * vec.norms[2]
    torch.testing.assert_close(after[2], before[2] + delta)
    assert not torch.allclose(before[3], after[3])


def test_removal_restores_logits_bit_for_bit(tiny_lm):
    ref = logits(tiny_lm, ["the cat sat", "money saved today is"])
    vec = random_vector(tiny_lm, [0, 1, 3])
    with vec.applied(tiny_lm, strength=3.0):
        steered = logits(tiny_lm, ["the cat sat", "money saved today is"])
    assert not torch.equal(ref, steered)
    assert torch.equal(ref, logits(tiny_lm, ["the cat sat", "money saved today is"]))


def test_hooks_removed_on_exception(tiny_lm):
    ref = logits(tiny_lm, ["the cat sat"])
    hooks_before = [dict(layer._forward_hooks) for layer in tiny_lm.layers]
    vec = random_vector(tiny_lm, [1])
    with pytest.raises(RuntimeError, match="boom"), vec.applied(tiny_lm, strength=2.0):
        assert len(tiny_lm.layers[1]._forward_hooks) == len(hooks_before[1]) + 1
        raise RuntimeError("boom")
    assert [dict(layer._forward_hooks) for layer in tiny_lm.layers] == hooks_before
    assert torch.equal(ref, logits(tiny_lm, ["the cat sat"]))


def test_zero_strength_and_self_difference_equal_no_steering(tiny_lm):
    vec = random_vector(tiny_lm, [1, 2])
    base = generate(tiny_lm, "the cat", options=GREEDY)
    assert generate(tiny_lm, "the cat", [Steer(vec, strength=0.0)], options=GREEDY) == base
    assert generate(tiny_lm, "the cat", [vec - vec], options=GREEDY) == base
    assert generate(tiny_lm, "the cat", [Steer(vec, strength=4.0)], options=GREEDY) != base


def test_per_row_steering_matches_individual_runs(tiny_lm):
    a, b = random_vector(tiny_lm, [1], seed=1), random_vector(tiny_lm, [2], seed=2)
    prompts = ["the cat sat", "the future of technology is", "money saved"]
    rows = [[Steer(a, strength=3.0)], [], [Steer(b, strength=2.0), Steer(a, strength=-1.0)]]
    batched = generate(tiny_lm, prompts, rows, options=GREEDY)
    single = [generate(tiny_lm, [p], r, options=GREEDY)[0] for p, r in zip(prompts, rows)]
    assert batched == single
    assert batched[1] == generate(tiny_lm, [prompts[1]], options=GREEDY)[0]


def test_steering_applies_during_cached_decoding(tiny_lm):
    """Every step after prefill sees one token; it must be steered too."""
    vec = random_vector(tiny_lm, [1])
    seen: list[int] = []
    hook = tiny_lm.layers[1].register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).shape[1]))
    try:
        cached = generate(tiny_lm, "the cat", [Steer(vec, strength=3.0)], options=GREEDY)
    finally:
        hook.remove()
    assert seen[0] > 1 and set(seen[1:]) == {1}, "expected prefill then one-token steps"
    # Same result without the cache: every step recomputes the whole (steered) sequence.
    enc = tiny_lm.tokenizer(tiny_lm.format_prompt("the cat"), return_tensors="pt", add_special_tokens=False)
    with vec.applied(tiny_lm, strength=3.0), torch.no_grad():
        out = tiny_lm.model.generate(**enc, max_new_tokens=12, do_sample=False, use_cache=False,
                                     eos_token_id=None, pad_token_id=tiny_lm.tokenizer.pad_token_id)
    uncached = tiny_lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert cached[0].startswith(uncached[: len(cached[0])]) or uncached.startswith(cached[0])


class _TupleBlock(torch.nn.Module):
    """Wraps a block so it returns a tuple, like older transformers versions."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return out if isinstance(out, tuple) else (out,)


def test_hook_accepts_tuple_and_tensor_outputs(tiny_lm):
    vec = random_vector(tiny_lm, [1])
    x = torch.randn(2, 5, tiny_lm.hidden_size)
    from steerlab.hooks import _make_steer_hook

    delta = vec.deltas(strength=1.0)[1].reshape(1, 1, -1)
    hook = _make_steer_hook(delta, "all", False)
    out_tensor = hook(None, (), x)
    out_tuple = hook(None, (), (x, "cache"))
    assert isinstance(out_tensor, torch.Tensor) and isinstance(out_tuple, tuple)
    assert out_tuple[1] == "cache"
    assert torch.equal(out_tensor, out_tuple[0]) and torch.equal(out_tensor, x + delta)


def test_generated_positions_leave_the_prompt_alone(tiny_lm):
    from steerlab.hooks import _make_steer_hook

    x = torch.randn(1, 6, tiny_lm.hidden_size)
    d = torch.ones(1, 1, tiny_lm.hidden_size)
    out = _make_steer_hook(d, "generated", False)(None, (), x)
    assert torch.equal(out[:, :-1], x[:, :-1]) and torch.equal(out[:, -1:], x[:, -1:] + 1)
    step = torch.randn(1, 1, tiny_lm.hidden_size)
    assert torch.equal(_make_steer_hook(d, "generated", False)(None, (), step), step + 1)


def test_norm_preserve_keeps_norms(tiny_lm):
    from steerlab.hooks import _make_steer_hook

    x = torch.randn(2, 4, tiny_lm.hidden_size)
    d = torch.randn(1, 1, tiny_lm.hidden_size) * 5
    out = _make_steer_hook(d, "all", True)(None, (), x)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(out, x)


def test_errors_are_clear(tiny_lm):
    vec = random_vector(tiny_lm, [1])
    with pytest.raises(SteeringError, match="out of range"):
        with steer(tiny_lm, [Steer(vec, layers=(99,))]):
            pass
    with pytest.raises(SteeringError, match="positions"):
        with steer(tiny_lm, [vec], positions="sometimes"):
            pass
    with pytest.raises(SteeringError, match="2 prompts but steering for 3 rows"):
        generate(tiny_lm, ["a", "b"], [[], [], []], options=GREEDY)
    with pytest.raises(SteeringError, match="cannot steer with"):
        with steer(tiny_lm, ["weeknd"]):
            pass
