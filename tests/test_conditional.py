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


# ---- conditions as a field of the steering spec (Steer.when) ---------------------------------------
from steerlab.spec import When, resolve  # noqa: E402, I001


def _push_cond():
    return vec(0, "push"), vec(1, "cond")


@pytest.mark.parametrize("on", ["prompt", "text"])
def test_when_that_never_fires_is_byte_identical_to_unsteered(tiny_lm, on):
    push, cond = _push_cond()
    report: dict = {}
    out = generate(tiny_lm, PROMPTS, [Steer(push, when=When(cond, threshold=1e9, on=on))], options=OPTS, report=report)
    assert out == generate(tiny_lm, PROMPTS, None, options=OPTS)
    assert [[c["fired"] for c in row] for row in report["conditions"]] == [[False]] * 3


def test_when_on_prompt_fires_per_row_in_one_batch(tiny_lm):
    push, cond = _push_cond()
    means = [r.mean("cond") for r in Reader(tiny_lm, [cond]).read(PROMPTS)]
    threshold = sorted(means)[1]
    report: dict = {}
    out = generate(tiny_lm, PROMPTS, [Steer(push, when=When(cond, threshold=threshold))], options=OPTS, report=report)
    fired = [row[0]["fired"] for row in report["conditions"]]
    assert fired == [m >= threshold for m in means] and sum(fired) == 2
    for p, f, o in zip(PROMPTS, fired, out):
        assert o == generate(tiny_lm, p, [push] if f else None, options=OPTS)[0]


def test_when_on_text_opens_a_row_gate_from_the_second_token(tiny_lm):
    """Always true on the text: the first two reply tokens are unsteered (read one token late), the rest steered."""
    push, cond = _push_cond()
    report: dict = {}
    gated = generate(tiny_lm, PROMPTS, [Steer(push, when=When(cond, threshold=-1e9, on="text"))], options=OPTS,
                     report=report)
    assert gated != generate(tiny_lm, PROMPTS, None, options=OPTS)
    for row in report["conditions"]:
        assert row[0]["fired"] and row[0]["first_steered_token"] == 2 and row[0]["on"] == "text"
    # the gate's own first token equals the unsteered one (nothing was steered before it)
    base = [tiny_lm.tokenizer(x)["input_ids"][:1] for x in generate(tiny_lm, PROMPTS, None, options=OPTS)]
    assert [tiny_lm.tokenizer(x)["input_ids"][:1] for x in gated] == base


def test_text_gate_follows_the_reading_of_the_reply(tiny_lm):
    """The gate opens exactly when the running mean of the reply's readings crosses the threshold."""
    from steerlab.conditional import decide, text_gate_for
    from steerlab.generate import eos_ids

    push, cond = _push_cond()
    rows = [[resolve(Steer(push, when=When(cond, threshold=0.0, on="text")), tiny_lm.n_layers)]]
    rows, _ = decide(tiny_lm, PROMPTS[:1], rows)
    gate = text_gate_for(tiny_lm, rows, 1, eos_ids(tiny_lm.tokenizer))
    seen = []
    ids = torch.tensor([[5, 6, 7]])
    with gate.watching():
        for step in range(4):
            with torch.no_grad():
                tiny_lm.model(input_ids=ids)
            gate(ids, torch.zeros(1, 10))
            seen.append(float(gate.gate[0, 0, 0]))
            ids = torch.cat([ids, torch.tensor([[8 + step]])], dim=1)
    assert seen[0] == 0.0  # the prompt's last token is not read
    assert gate.summary()[0][0]["tokens_read"] == 3
    mean = float(gate.sum[0, 0] / gate.count[0, 0])
    assert seen[-1] == (1.0 if mean >= 0 else 0.0)


def test_when_checks_its_input():
    push, cond = _push_cond()
    with pytest.raises(SteeringError, match="mean or peak"):
        When(cond, stat="max")
    with pytest.raises(SteeringError, match="prompt or text"):
        When(cond, on="reply")
    from steerlab.spec import parse_when

    assert parse_when("tabby_cats>=1.5") == ("tabby_cats", 1.5)
    assert parse_when("tabby_cats") == ("tabby_cats", None)
    with pytest.raises(SteeringError, match="NAME>=X"):
        parse_when("tabby_cats>1")
    r = resolve(Steer(push, when=When(cond, 0.5, "peak", "text")), 4).describe()
    assert r["when"] == {"vector": "cond", "threshold": 0.5, "stat": "peak", "on": "text"}


def test_steer_refuses_text_conditions_without_a_gate(tiny_lm):
    from steerlab.hooks import steer

    push, cond = _push_cond()
    with pytest.raises(SteeringError, match="need a gate"), steer(tiny_lm, [Steer(push, when=When(cond, on="text"))]):
        pass
