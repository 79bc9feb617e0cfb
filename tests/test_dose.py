"""Doses, calibration, the governor and the one steering spec, on the tiny random model."""

from __future__ import annotations

import math

import click
import pytest
import torch
from helpers import random_vector

from steerlab import GenerationOptions, Steer, SteeringError, generate
from steerlab.calibrate import NEW_TOKENS, Window, _crossing, calibrate, with_window
from steerlab.generate import governor_for
from steerlab.hooks import capture
from steerlab.governor import HIGH, HIGH_MARGIN, LOW, LOW_MARGIN, Governor, _loops
from steerlab.spec import DOSE_FLOOR, blend_push, dose_strength, resolve, resolve_rows, strength_dose
from steerlab.steer_syntax import parse_steer

GREEDY = GenerationOptions(max_new_tokens=6)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def windowed(lm, *, max_strength=2.0, onset=1.0, layers=(1, 2), governor=False):
    """A random vector whose 'add' window says: concept from ``onset``, dose 1 = ``max_strength``."""
    vec = random_vector(lm, range(lm.n_layers)).with_defaults(layers=list(layers))
    key = "add+governor" if governor else "add"
    return vec.with_defaults(windows={key: {"layers": list(layers), "onset": onset, "max_strength": max_strength}},
                             governor=governor)


def test_dose_maps_linearly_onto_the_window(tiny_lm):
    vec = windowed(tiny_lm)  # lo = half the onset = 0.5, top = 2.0
    for dose, want in ((0.0, 0.0), (0.35, 0.5 + 0.35 * 1.5), (1.0, 2.0), (1.4, 0.5 + 1.4 * 1.5), (-0.5, -1.25)):
        assert resolve(Steer(vec, dose=dose), tiny_lm.n_layers).strength == pytest.approx(want)
    r = resolve(Steer(vec), tiny_lm.n_layers)  # a calibrated vector's default is a dose
    assert r.dose == pytest.approx(0.7) and r.strength == pytest.approx(0.5 + 0.7 * 1.5)
    # no onset measured (the concept never showed): the slider starts at half of dose 1
    assert resolve(Steer(windowed(tiny_lm, onset=None), dose=0.5), tiny_lm.n_layers).strength == pytest.approx(1.5)
    # the inverse, as the sweep uses it to store its pick as a dose
    assert strength_dose(vec.extra["windows"]["add"], 0.5 + 0.4 * 1.5) == pytest.approx(0.4)
    assert resolve(Steer(vec, strength=0.3), tiny_lm.n_layers).dose is None  # strength still works


def test_dose_on_other_layers_is_rescaled_and_says_so(tiny_lm):
    r = resolve(Steer(windowed(tiny_lm), dose=1.0, layers=(3,)), tiny_lm.n_layers)
    assert r.strength == pytest.approx(4.0) and "rescaled for 1 layer" in r.note  # same total push


def test_dose_at_other_positions_than_measured_says_so(tiny_lm):
    vec = windowed(tiny_lm)  # measured (no "positions" recorded: every position)
    assert resolve(Steer(vec, dose=1.0), tiny_lm.n_layers).note == ""
    r = resolve(Steer(vec, dose=1.0, positions="prompt"), tiny_lm.n_layers)
    assert r.strength == pytest.approx(2.0) and "measured steering positions 'all', not 'prompt'" in r.note
    prompt_vec = vec.with_defaults(positions="prompt",
                                   windows={"add": {**vec.extra["windows"]["add"], "positions": "prompt"}})
    assert resolve(Steer(prompt_vec, dose=1.0), tiny_lm.n_layers).note == ""


def test_dose_errors_say_what_to_do(tiny_lm):
    plain = random_vector(tiny_lm, [1])
    with pytest.raises(SteeringError, match="steerlab calibrate rand"):
        resolve(Steer(plain, dose=0.5), tiny_lm.n_layers)
    with pytest.raises(SteeringError, match="one of dose, strength or scale"):
        resolve(Steer(windowed(tiny_lm), dose=0.5, strength=0.2), tiny_lm.n_layers)
    with pytest.raises(SteeringError, match="outside"):
        resolve(Steer(windowed(tiny_lm), dose=9), tiny_lm.n_layers)
    with pytest.raises(SteeringError, match="unknown operator"):
        resolve(Steer(plain, operator="multiply"), tiny_lm.n_layers)


def test_dose_zero_is_unsteered_and_dose_changes_output(tiny_lm):
    vec = windowed(tiny_lm, max_strength=20.0)
    base = generate(tiny_lm, "the cat", None, options=GREEDY)
    assert generate(tiny_lm, "the cat", [Steer(vec, dose=0.0)], options=GREEDY) == base
    assert generate(tiny_lm, "the cat", [Steer(vec, dose=1.0)], options=GREEDY) != base


def test_a_governed_window_falls_back_with_a_note(tiny_lm):
    vec = windowed(tiny_lm, governor=True)
    r = resolve(Steer(vec, dose=0.5, governor=False), tiny_lm.n_layers)
    assert r.strength == pytest.approx(1.25) and "measured with the governor" in r.note


def test_crossing_interpolates_on_a_log_scale():
    xs, ys = [0.1, 0.2, 0.4], [1.0, 0.8, 0.2]
    x = _crossing(xs, ys, 0.5, rising=False)
    assert 0.2 < x < 0.4 and x == pytest.approx(math.exp((math.log(0.2) + math.log(0.4)) / 2))
    assert _crossing(xs, ys, 0.1, rising=False) is None
    assert _crossing(xs, [0.0, 0.3, 0.9], 0.3, rising=True) == pytest.approx(0.2)


def test_calibrate_measures_a_ladder_and_stores_the_window(tiny_lm):
    vec = random_vector(tiny_lm, range(tiny_lm.n_layers)).with_defaults(layers=[1, 2])
    w = calibrate(tiny_lm, vec, strengths=[0.5, 2.0, 8.0, 32.0], prompts=["the cat", "a dog ran"])
    assert isinstance(w, Window) and [r.strength for r in w.rungs] == [0.5, 2.0, 8.0, 32.0]
    assert w.layers == (1, 2) and w.concept_measure == "reading" and len(w.base_replies) == 2
    # the tiny random model is unsure of everything: its unsteered entropy is near log(vocab)
    assert w.base_entropy is not None and w.base_entropy > 0.5 * math.log(tiny_lm.model.config.vocab_size)
    assert all(0.0 <= r.fluency <= 1.0 for r in w.rungs)
    # the window's dose 1 is never past a measured breakdown
    assert w.breakdown is None or w.max_strength <= w.breakdown
    stored = with_window(vec, w)
    assert stored.extra["windows"]["add"]["max_strength"] == pytest.approx(w.max_strength, rel=1e-3)
    r = resolve(Steer(stored, dose=0.5), tiny_lm.n_layers)
    stored_w = stored.extra["windows"]["add"]
    assert r.strength == pytest.approx(dose_strength(stored_w, 0.5))
    top, lo = stored_w["max_strength"], DOSE_FLOOR * min(stored_w["onset"] or stored_w["max_strength"], stored_w["max_strength"])
    assert r.strength == pytest.approx(lo + 0.5 * (top - lo), rel=1e-3)


def test_scoring_reads_each_prompt_once_and_matches_a_full_forward(tiny_lm):
    """calibrate._score runs the prompts once and reuses their cache for every row: the perplexities
    and readings must be those of a plain full forward over each row."""
    from steerlab.calibrate import _replies, _score
    from steerlab.generate import GenerationOptions

    vec = random_vector(tiny_lm, range(tiny_lm.n_layers))
    prompts = ["the cat sat", "a dog ran far away today"]  # different lengths: left padding
    rows = [[]] * 2 + [[Steer(vec, strength=s, layers=(1,))] for s in (1.0, 8.0) for _ in prompts]
    ids, mask, width, _ = _replies(tiny_lm, prompts * 3, rows, GenerationOptions(max_new_tokens=6))
    means, sds = {1: 0.1, 2: -0.2}, {1: 1.5, 2: 0.5}
    replies = [r[width:][mask[i, width:]].tolist() for i, r in enumerate(ids)]
    ppl, reading = _score(tiny_lm, vec, (1, 2), prompts * 3, replies, means, sds, batch_size=4)
    m = mask.long()
    with capture(tiny_lm, [1, 2], stop_early=False) as store:
        logits = tiny_lm.model(input_ids=ids, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp_min(0)).logits
    logp = torch.log_softmax(logits[:, width - 1 : -1].float(), -1).gather(-1, ids[:, width:, None])[..., 0]
    rm = mask[:, width:].float()
    want_ppl = torch.exp(-(logp * rm).sum(-1) / rm.sum(-1).clamp_min(1))
    z = sum(((store[x][:, width:].float() @ (vec.directions[x] / vec.directions[x].norm())) - means[x]) / sds[x]
            for x in (1, 2)) / 2
    want_reading = (z * rm).sum(-1) / rm.sum(-1).clamp_min(1)
    assert ppl == pytest.approx(want_ppl.tolist(), rel=1e-4)
    assert reading == pytest.approx(want_reading.tolist(), rel=1e-4, abs=1e-5)


def test_governor_lowers_breaking_rows_and_restores_them():
    gov = Governor([True, True, False], device=torch.device("cpu"), dtype=torch.float32)
    flat = torch.zeros(3, 1000)  # entropy log(1000) = 6.9 nats: every row "breaking"
    ids = torch.arange(12).repeat(3, 1)
    gov(ids, flat)
    gov(ids, flat)
    g = gov.gain[:, 0, 0]
    assert g[0] < 1 and g[1] < 1 and g[2] == 1  # the ungoverned row is never touched
    sharp = torch.full((3, 1000), -50.0)
    sharp[:, 0] = 50.0  # entropy ~0: recovered
    for _ in range(12):
        gov(ids, sharp)
    assert torch.equal(gov.gain[:, 0, 0], torch.ones(3))
    assert len(gov.gains[0]) == 14 and gov.summary()[0]["steps_lowered"] >= 2 and gov.summary()[2] == {}


def test_loop_detection_finds_repeated_four_grams():
    loop = torch.tensor([[1, 2, 3, 4, 9, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    assert _loops(loop).tolist() == [True, False]


def test_governor_runs_inside_generate_and_reports(tiny_lm):
    vec = windowed(tiny_lm, max_strength=20.0, governor=True)
    report: dict = {}
    out = generate(tiny_lm, ["the cat", "a dog"], [[Steer(vec, dose=1.0)], []], options=GREEDY, report=report)
    assert len(out) == 2 and report["governor"][1] == {} and report["governor"][0]["steps"] == 6
    assert report["steering"][0][0]["governor"] is True and report["steering"][1] == []
    # the tiny random model's entropy is ~log(vocab): the governor eases off at once
    assert report["governor"][0]["min_gain"] < 1


@pytest.mark.parametrize(("spec", "want"), [
    ("cats", ("cats", {})),
    ("cats:0.3", ("cats", {"strength": 0.3})),
    ("cats:dose=0.5", ("cats", {"dose": 0.5})),
    ("cats:dose=0.5:op=target:governor=off", ("cats", {"dose": 0.5, "operator": "target", "governor": False})),
    ("cats:positions=from:3", None),  # ':' separates fields: from:N is not expressible here
    ("cats:positions=generated", ("cats", {"positions": "generated"})),
])
def test_parse_steer(spec, want):
    if want is None:
        with pytest.raises(click.BadParameter):
            parse_steer(spec)
    else:
        assert parse_steer(spec) == want


def test_parse_steer_errors_show_the_form():
    with pytest.raises(click.BadParameter, match="dose=0.5"):
        parse_steer("cats:volume=3")


def test_optimize_trains_the_direction_toward_the_positives(tiny_lm):
    from steerlab.extract import build_vector
    from steerlab.optimize import optimize_vector

    pos = ["the cat sat on the mat", "a cat purrs softly", "my cat naps all day", "the cat wants fish"]
    neg = ["the car sat in the lot", "a car hums softly", "my car parks all day", "the car wants fuel"]
    start = build_vector(tiny_lm, pos, neg, layers=[1, 2], default_layers=[1, 2], default_strength=0.5,
                         progress=False, name="cats")
    losses: list[float] = []
    vec = optimize_vector(tiny_lm, start, pos, neg, steps=12, lr=0.05, progress=False,
                          on_step=lambda i, loss: losses.append(loss))
    assert vec.method == "optimize" and vec.layers == start.layers and len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns
    for layer in (1, 2):
        assert float(vec.directions[layer].norm()) == pytest.approx(1.0, abs=1e-4)
        assert not torch.equal(vec.directions[layer], start.directions[layer])
    assert vec.default_strength > 0 and "windows" not in vec.extra  # a new direction: measure it again
    assert all(p.grad is None or not p.requires_grad for p in tiny_lm.model.parameters())


def test_store_measures_builtin_vectors_built_before_dose_windows(tiny_lm, tmp_path):
    from steerlab.store import VectorStore

    store = VectorStore(tmp_path, tiny_lm)
    for name in ("weeknd", "toronto", "tabby_cats"):  # as an older steerlab left them: no window
        store.add(random_vector(tiny_lm, range(tiny_lm.n_layers), name=name).with_defaults(layers=[1]))
    notes: list[str] = []
    assert store.ensure_builtins(notify=notes.append) == []  # nothing rebuilt...
    assert all(VectorStore(tmp_path, tiny_lm).vectors[n].extra["windows"] for n in ("weeknd", "toronto"))  # ...measured
    assert any("measuring the dose window of tabby_cats" in n for n in notes)


def test_a_blend_that_pushes_too_hard_says_so(tiny_lm):
    a, b = windowed(tiny_lm), windowed(tiny_lm)  # dose 1 = strength 2.0 at layers 1, 2
    (row,) = resolve_rows([[Steer(a, dose=0.3), Steer(b, dose=0.3)]], tiny_lm.n_layers)
    assert blend_push(row) == pytest.approx(2 * (0.5 + 0.3 * 1.5) / 2.0) and all(not r.note for r in row)
    (row,) = resolve_rows([[Steer(a, dose=1.0), Steer(b, dose=1.0)]], tiny_lm.n_layers)
    assert blend_push(row) == pytest.approx(2.0) and all("blend: together the 2 entries push 2.00x" in r.note for r in row)
    # a single entry is never flagged, and unmeasured parts (a strength) do not count
    (row,) = resolve_rows([[Steer(a, dose=1.4)]], tiny_lm.n_layers)
    assert not row[0].note
    (row,) = resolve_rows([[Steer(a, dose=1.0), Steer(random_vector(tiny_lm, [1]), strength=5.0)]], tiny_lm.n_layers)
    assert blend_push(row) == pytest.approx(1.0) and not row[0].note


def test_governor_thresholds_follow_the_models_measured_entropy(tiny_lm):
    gov = Governor.for_model([True], 3.1, device=torch.device("cpu"), dtype=torch.float32)
    assert (gov.high, gov.low) == pytest.approx((3.1 + HIGH_MARGIN, 3.1 + LOW_MARGIN))
    plain = Governor.for_model([True], None, device=torch.device("cpu"), dtype=torch.float32)
    assert (plain.high, plain.low) == (HIGH, LOW)
    vec = windowed(tiny_lm, governor=True).with_defaults(base_entropy=6.0)
    rows = resolve_rows([[Steer(vec, dose=1.0)], []], tiny_lm.n_layers)
    assert governor_for(tiny_lm, rows, 2).high == pytest.approx(6.0 + HIGH_MARGIN)
    # an entry steering only the prompt leaves the decoding steps alone: nothing to govern
    assert governor_for(tiny_lm, resolve_rows([[Steer(vec, dose=1.0, positions="prompt")]], tiny_lm.n_layers), 1) is None


def test_the_models_entropy_is_taken_from_a_sibling_vector(tiny_lm):
    from dataclasses import replace

    from steerlab.calibrate import with_known_entropy

    a = random_vector(tiny_lm, range(tiny_lm.n_layers), name="a").with_defaults(base_entropy=2.5)
    b = random_vector(tiny_lm, range(tiny_lm.n_layers), seed=1, name="b")
    assert with_known_entropy(b, [a]).extra["base_entropy"] == 2.5
    assert "base_entropy" not in with_known_entropy(b, [replace(a, model_id="another/model")]).extra
    assert with_known_entropy(b.with_defaults(base_entropy=1.0), [a]).extra["base_entropy"] == 1.0


def test_a_ladder_on_given_unsteered_replies_matches_one_that_makes_them(tiny_lm):
    """measure() hands the unsteered replies it generated for the model's entropy to calibrate(),
    which then generates only the ladder's rows: the window must be the one it would measure alone."""
    from steerlab.calibrate import _replies, _reply_ids

    vec = random_vector(tiny_lm, range(tiny_lm.n_layers)).with_defaults(layers=[1, 2])
    prompts = ["the cat", "a dog ran"]
    opts = GenerationOptions(max_new_tokens=NEW_TOKENS)
    base = _reply_ids(*_replies(tiny_lm, prompts, [[]] * 2, opts))
    alone = calibrate(tiny_lm, vec, strengths=[0.5, 8.0], prompts=prompts)
    given = calibrate(tiny_lm, vec, strengths=[0.5, 8.0], prompts=prompts, base=base)
    assert given.base_replies == alone.base_replies and given.base_entropy == pytest.approx(alone.base_entropy)
    for a, g in zip(alone.rungs, given.rungs):
        assert g.replies == a.replies
        assert (g.fluency, g.reading) == pytest.approx((a.fluency, a.reading), rel=1e-4, abs=1e-6)
