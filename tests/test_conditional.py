"""Conditional steering on the prompt: rows whose condition fails are exactly unsteered."""

from __future__ import annotations

import pytest
import torch

from steerlab import GenerationOptions, SteeringError, SteeringVector, generate
from steerlab.conditional import Condition, Conditional, conditional_rows
from steerlab.hooks import Steer
from steerlab.reading import Reader

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NEUTRAL = ["a computer runs programs", "money saved today is money", "the future of technology is bright"]
PROMPTS = ["the cat sat on the mat", "toronto has a tall tower", "money saved today"]
OPTS = GenerationOptions(max_new_tokens=6, chat=False)


def vec(seed: int, name: str) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    dirs = {x: torch.randn(64, generator=g) for x in (1, 2)}
    return SteeringVector({x: d / d.norm() for x, d in dirs.items()}, {x: 1.0 for x in dirs}, "tiny", name=name,
                          default_strength=8.0)


def test_never_firing_condition_is_byte_identical_to_unsteered(tiny_lm):
    push, cond = vec(0, "push"), vec(1, "cond")
    rows, stats = conditional_rows(tiny_lm, PROMPTS, [Conditional(Steer(push), Condition(cond, threshold=1e9))],
                                   reader=Reader(tiny_lm, [cond], neutral=NEUTRAL))
    assert rows == [[], [], []] and set(stats[0]) == {"cond.peak", "cond.mean"}
    assert generate(tiny_lm, PROMPTS, rows, options=OPTS) == generate(tiny_lm, PROMPTS, None, options=OPTS)


def test_rows_fire_on_their_own_readings_in_one_batch(tiny_lm):
    push, cond = vec(0, "push"), vec(1, "cond")
    reader = Reader(tiny_lm, [cond], neutral=NEUTRAL)
    peaks = [r.peak("cond") for r in reader.read(PROMPTS)]
    threshold = sorted(peaks)[1]  # the two highest fire, the lowest does not
    rows, stats = conditional_rows(tiny_lm, PROMPTS, [Conditional(Steer(push), Condition(cond, threshold))],
                                   reader=reader)
    assert [bool(r) for r in rows] == [p >= threshold for p in peaks]
    assert [s["cond.peak"] for s in stats] == pytest.approx(peaks)
    batched = generate(tiny_lm, PROMPTS, rows, options=OPTS)
    for p, r, out in zip(PROMPTS, rows, batched):
        assert out == generate(tiny_lm, p, r, options=OPTS)[0]  # per row, as if alone
    assert batched != generate(tiny_lm, PROMPTS, None, options=OPTS)


def test_unconditional_entries_and_mean_stat(tiny_lm):
    push, cond = vec(0, "push"), vec(1, "cond")
    reader = Reader(tiny_lm, [cond], neutral=NEUTRAL)
    rows, _ = conditional_rows(tiny_lm, PROMPTS, [push, Conditional(Steer(push), Condition(cond, -1e9, "mean"))],
                               reader=reader)
    assert all(len(r) == 2 for r in rows)
    with pytest.raises(SteeringError, match="condition vectors"):
        conditional_rows(tiny_lm, PROMPTS, [Conditional(Steer(push), Condition(vec(2, "other")))], reader=reader)
