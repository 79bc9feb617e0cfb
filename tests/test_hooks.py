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
    with steer(tiny_lm, [Steer(vec, strength=1.5)]):
        after = _block_outputs(tiny_lm, text, [0, 1, 2, 3])
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    delta = vec.directions[2] * 1.5 * vec.norms[2]
    torch.testing.assert_close(after[2], before[2] + delta)
    assert not torch.allclose(before[3], after[3])


def test_removal_restores_logits_bit_for_bit(tiny_lm):
    ref = logits(tiny_lm, ["the cat sat", "money saved today is"])
    vec = random_vector(tiny_lm, [0, 1, 3])
    with steer(tiny_lm, [Steer(vec, strength=3.0)]):
        steered = logits(tiny_lm, ["the cat sat", "money saved today is"])
    assert not torch.equal(ref, steered)
    assert torch.equal(ref, logits(tiny_lm, ["the cat sat", "money saved today is"]))


def test_hooks_removed_on_exception(tiny_lm):
    ref = logits(tiny_lm, ["the cat sat"])
    hooks_before = [dict(layer._forward_hooks) for layer in tiny_lm.layers]
    vec = random_vector(tiny_lm, [1])
    with pytest.raises(RuntimeError, match="boom"), steer(tiny_lm, [Steer(vec, strength=2.0)]):
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
    with steer(tiny_lm, [Steer(vec, strength=3.0)]), torch.no_grad():
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


def _hook(lm, vec, layer=1, gain=None, **entry):
    """The hook steer() would register at ``layer`` for one row steered by ``Steer(vec, **entry)``."""
    from steerlab.hooks import _make_steer_hook, plan
    from steerlab.spec import resolve

    adds, groups = plan(lm, [[resolve(Steer(vec, layers=(layer,), **entry), lm.n_layers)]])
    hook = _make_steer_hook(adds.get(layer), groups.get(layer, []), gain)
    if groups.get(layer) or gain is not None:
        return lambda out, position_ids=None: hook(None, (), {"position_ids": position_ids}, out)
    return lambda out, position_ids=None: hook(None, (), out)


def test_hook_accepts_tuple_and_tensor_outputs(tiny_lm):
    vec = random_vector(tiny_lm, [1])
    x = torch.randn(2, 5, tiny_lm.hidden_size)
    delta = vec.deltas(strength=1.0)[1].reshape(1, 1, -1)
    for entry in ({}, {"positions": "generated"}):
        hook = _hook(tiny_lm, vec, strength=1.0, **entry)
        out_tensor, out_tuple = hook(x), hook((x, "cache"))
        assert isinstance(out_tensor, torch.Tensor) and isinstance(out_tuple, tuple)
        assert out_tuple[1] == "cache" and torch.equal(out_tensor, out_tuple[0])
    assert torch.equal(_hook(tiny_lm, vec, strength=1.0)(x), x + delta)


def test_generated_positions_leave_the_prompt_alone(tiny_lm):
    vec = random_vector(tiny_lm, [1])
    d = vec.deltas(strength=1.0)[1]
    hook = _hook(tiny_lm, vec, strength=1.0, positions="generated")
    x = torch.randn(1, 6, tiny_lm.hidden_size)
    out = hook(x)
    assert torch.equal(out[:, :-1], x[:, :-1]) and torch.allclose(out[:, -1:], x[:, -1:] + d)
    step = torch.randn(1, 1, tiny_lm.hidden_size)
    assert torch.allclose(hook(step), step + d)


def test_prompt_positions_steer_the_prompt_and_leave_new_tokens_alone(tiny_lm):
    vec = random_vector(tiny_lm, [1])
    d = vec.deltas(strength=1.0)[1]
    hook = _hook(tiny_lm, vec, strength=1.0, positions="prompt")
    x = torch.randn(2, 6, tiny_lm.hidden_size)
    assert torch.allclose(hook(x), x + d)  # the prefill: every prompt position
    step = torch.randn(2, 1, tiny_lm.hidden_size)
    assert torch.equal(hook(step), step)  # a cached decoding step


def test_prompt_positions_in_generation_differ_from_all_and_from_none(tiny_lm):
    from steerlab.generate import GenerationOptions, generate

    vec = random_vector(tiny_lm, [1, 2])
    opts = GenerationOptions(max_new_tokens=12)
    texts = generate(tiny_lm, ["hello there"] * 3, [[], [Steer(vec, scale=40.0)],
                                                   [Steer(vec, scale=40.0, positions="prompt")]], options=opts)
    assert len(set(texts)) == 3, texts


def test_positions_from_n_use_position_ids(tiny_lm):
    vec = random_vector(tiny_lm, [1])
    d = vec.deltas(strength=1.0)[1]
    hook = _hook(tiny_lm, vec, strength=1.0, positions=3)
    x = torch.randn(1, 6, tiny_lm.hidden_size)
    out = hook(x)  # no position ids: positions 0..5
    assert torch.equal(out[:, :3], x[:, :3]) and torch.allclose(out[:, 3:], x[:, 3:] + d)
    step = torch.randn(2, 1, tiny_lm.hidden_size)
    out = hook(step, position_ids=torch.tensor([[2], [7]]))  # row 0 still before position 3
    assert torch.equal(out[0], step[0]) and torch.allclose(out[1], step[1] + d)


def test_norm_preserve_keeps_norms(tiny_lm):
    vec = random_vector(tiny_lm, [1])
    x = torch.randn(2, 4, tiny_lm.hidden_size)
    out = _hook(tiny_lm, vec, scale=5.0, operator="add_norm")(x)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(out, x)


def _unit(vec, layer=1):
    u = vec.directions[layer].float()
    return u / u.norm()


def test_target_adds_only_what_is_missing(tiny_lm):
    vec = random_vector(tiny_lm, [1])
    u, n = _unit(vec), vec.norms[1]
    x = torch.randn(1, 6, tiny_lm.hidden_size)
    x[0, 1:] -= ((x[0, 1:] @ u)[:, None] + 0.5 * n) * u  # below the target (a random draw may not be)
    x[0, 0] += 5 * n * u  # already far past the target: untouched
    out = _hook(tiny_lm, vec, strength=0.5, operator="target")(x)
    proj = out[0] @ u
    assert torch.equal(out[0, 0], x[0, 0])
    torch.testing.assert_close(proj[1:], torch.full((5,), 0.5 * n), rtol=1e-4, atol=1e-4)
    rest = out - (out @ u)[..., None] * u  # the orthogonal part never changes
    torch.testing.assert_close(rest, x - (x @ u)[..., None] * u, rtol=1e-4, atol=1e-4)


def test_cap_keeps_the_component_in_range(tiny_lm):
    vec = random_vector(tiny_lm, [1])
    u, n = _unit(vec), vec.norms[1]
    x = torch.randn(1, 8, tiny_lm.hidden_size) + torch.linspace(-3, 3, 8)[None, :, None] * n * u
    proj = _hook(tiny_lm, vec, strength=-0.5, operator="cap")(x)[0] @ u  # [-0.5 n, 0]
    assert float(proj.max()) <= 1e-4 and float(proj.min()) >= -0.5 * n - 1e-3
    inside = ((x[0] @ u) > -0.5 * n) & ((x[0] @ u) < 0)
    torch.testing.assert_close(proj[inside], (x[0] @ u)[inside])


def test_rotate_turns_toward_the_direction_and_keeps_norms(tiny_lm):
    vec = random_vector(tiny_lm, [1])
    u = _unit(vec)
    x = torch.randn(1, 5, tiny_lm.hidden_size)
    angle = lambda t: torch.rad2deg(torch.acos((t @ u) / t.norm(dim=-1)))  # noqa: E731
    out = _hook(tiny_lm, vec, strength=1 / 9, operator="rotate")(x)  # 10 degrees
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(angle(out), angle(x) - 10, atol=1e-3, rtol=1e-4)
    full = _hook(tiny_lm, vec, strength=3.0, operator="rotate")(x)  # 270 degrees: stops at u
    torch.testing.assert_close(full / full.norm(dim=-1, keepdim=True), u.expand_as(full), atol=1e-5, rtol=1e-4)


def test_operators_leave_attention_sinks_alone(tiny_lm):
    vec = random_vector(tiny_lm, [1])
    x = torch.randn(1, 3, tiny_lm.hidden_size) * 0.1 - 2 * vec.norms[1] * _unit(vec)  # below every target
    x[0, 0] *= 100 * vec.norms[1] / x[0, 0].norm()
    for op in ("target", "rotate", "cap"):
        out = _hook(tiny_lm, vec, strength=0.5, operator=op)(x)
        assert torch.equal(out[0, 0], x[0, 0]) and not torch.equal(out[0, 1:], x[0, 1:])


def test_gain_scales_each_rows_steering(tiny_lm):
    vec = random_vector(tiny_lm, [1])
    d = vec.deltas(strength=1.0)[1]
    x = torch.randn(2, 3, tiny_lm.hidden_size)
    out = _hook(tiny_lm, vec, strength=1.0, gain=torch.tensor([1.0, 0.25]).reshape(2, 1, 1))(x)
    torch.testing.assert_close(out[0], x[0] + d)
    torch.testing.assert_close(out[1], x[1] + 0.25 * d)


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


def test_stream_yields_each_rows_text_as_generate_returns_it(tiny_lm):
    """``stream`` (the CLI's path when a person watches) is ``generate`` token by token, per row."""
    from steerlab import stream

    vec = random_vector(tiny_lm, [1])
    prompts, rows = ["the cat sat", "money saved"], [[Steer(vec, strength=3.0)], []]
    parts = {0: "", 1: ""}
    for row, delta in stream(tiny_lm, prompts, rows, options=GREEDY):
        parts[row] += delta
    assert [parts[0].strip(), parts[1].strip()] == generate(tiny_lm, prompts, rows, options=GREEDY)
