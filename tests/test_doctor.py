"""The contrast-set doctor: its math on synthetic activations, text confounds, and a tiny-model run."""

from __future__ import annotations

import pytest
import torch

from steerlab import SteeringError
from steerlab import doctor as dr

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted(n: int = 24, hidden: int = 32, *, signal: float = 3.0, flip: tuple[int, ...] = (), seed: int = 0):
    """Pooled activations of n pairs whose differences share one direction (some flipped)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.zeros(hidden)
    d[0] = 1.0
    neg = torch.randn(n, hidden, generator=g)
    step = torch.ones(n)
    step[list(flip)] = -1.0
    pos = neg + signal * step[:, None] * d + 0.5 * torch.randn(n, hidden, generator=g)
    return pos, neg


def test_leave_one_out_cosines_find_flipped_pairs():
    pos, neg = planted(flip=(6, 18))
    cos = dr.leave_one_out_cosines(pos, neg)
    assert cos.shape == (24,)
    assert set(torch.nonzero(cos < 0).flatten().tolist()) == {6, 18}
    assert float(cos[[i for i in range(24) if i not in (6, 18)]].min()) > 0.5
    with pytest.raises(SteeringError):
        dr.leave_one_out_cosines(pos[:1], neg[:1])


def test_leave_one_out_excludes_the_pair_itself():
    pos, neg = planted(n=3)
    diffs = pos - neg
    want = torch.nn.functional.cosine_similarity(diffs[0], diffs[1:].mean(0), dim=0)
    assert float(dr.leave_one_out_cosines(pos, neg)[0]) == pytest.approx(float(want), abs=1e-5)


def test_bootstrap_stability_is_high_for_a_clear_signal_and_low_for_noise():
    clear = dr.bootstrap_cosines(*planted(signal=3.0))
    noise = dr.bootstrap_cosines(*planted(signal=0.0))
    assert float(clear.mean()) > 0.95 > float(noise.mean())
    assert torch.equal(dr.bootstrap_cosines(*planted(), seed=3), dr.bootstrap_cosines(*planted(), seed=3))


def test_confounds_questions_length_openings_and_template_words():
    pos = [f"My cat number {i} purrs loudly in the sun and the stripes shine." for i in range(10)]
    neg = [f"Do you like car number {i}?" for i in range(10)]
    found, facts = dr.text_confounds(pos, neg, pos_tokens=[14] * 10, neg_tokens=[7] * 10,
                                     concept_words=["cat", "purrs"])
    text = " | ".join(found)
    assert "the positives are 100% longer" in text
    assert "the negatives are questions far more often (all them vs 0%)" in text
    assert "100% of the positives start with 'my'" in text and "100% of the negatives start with 'do'" in text
    assert "'stripes'" in text and "'cat'" not in text and "'purrs'" not in text  # concept words are not template
    assert facts["questions_negative"] == 1.0


def test_clean_mirrored_pairs_have_no_confounds():
    pos = ["My tabby cat naps in the sun.", "The kitten chased a string.", "Whiskers twitch at night?"]
    neg = ["My old uncle naps in the sun.", "The toddler chased a ball.", "Leaves rustle at night?"]
    found, _ = dr.text_confounds(pos, neg, pos_tokens=[7, 6, 5], neg_tokens=[7, 6, 5])
    assert found == []


def test_grade_points_and_letters():
    best, lost = dr.grade_points(auc=0.99, consistency=0.5, stability=0.99, outliers=0, n_pairs=40, confounds=0)
    assert best == 100.0 and lost == []
    worse, lost = dr.grade_points(auc=0.8, consistency=0.1, stability=0.8, outliers=4, n_pairs=40, confounds=2)
    assert worse < 60 and len(lost) == 5
    assert [dr.letter(s) for s in (95, 85, 75, 65, 10)] == ["A", "B", "C", "D", "F"]
    # every check at its worst loses 120 points: the score stops at 0 and is an F (it once raised StopIteration
    # and failed the page's build of a 5-pair set on the tiny model)
    hopeless, lost = dr.grade_points(auc=0.5, consistency=-0.5, stability=0.1, outliers=20, n_pairs=20, confounds=3)
    assert hopeless == 0.0 and dr.letter(hopeless) == "F" and len(lost) == 5


def test_diagnose_names_the_pairs_to_drop_with_their_lines():
    pos, neg = planted(flip=(6, 18))
    texts_p = [f"positive text number {i}" for i in range(24)]
    texts_n = [f"negative text number {i}" for i in range(24)]
    acts_p, acts_n = {5: pos, 6: pos * 1.1}, {5: neg, 6: neg * 1.1}
    diag = dr.diagnose(acts_p, acts_n, {5: 0.95, 6: 0.96}, positive=texts_p, negative=texts_n,
                       pos_tokens=[4] * 24, neg_tokens=[4] * 24, grade_layers=[5, 6],
                       lines=[10 + 4 * i for i in range(24)], name="t", concept_words=["positive", "negative"])
    assert [o.pair for o in diag.outliers] == [7, 19]
    assert [o.line for o in diag.outliers] == [34, 82]
    assert diag.advice[0].startswith("drop or rewrite pairs 7 and 19 (lines 34, 82)")
    assert diag.grade in "BCD" and diag.layers[0].against == 2
    clean = dr.diagnose({5: planted()[0]}, {5: planted()[1]}, {5: 0.99}, positive=texts_p, negative=texts_n,
                        pos_tokens=[4] * 24, neg_tokens=[4] * 24, grade_layers=[5],
                        concept_words=["positive", "negative"])
    assert clean.grade == "A" and clean.outliers == () and clean.score > diag.score
    assert "nothing to fix" in clean.advice[0]


def test_positive_lines_in_a_toml_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "x"\n[[pairs]]\npositive = "a"\nnegative = "b"\n\n[[pairs]]\n  positive = "c"\nnegative = "d"\n')
    assert dr.positive_lines(str(path), 2) == [3, 7]
    assert dr.positive_lines(str(tmp_path / "missing.toml"), 2) == [None, None]


def test_doctor_on_a_tiny_model(tiny_lm):
    pos = ["the cat sat on the mat and purred", "a cat in the warm sun", "the cat purred", "my cat sat",
           "the cat is warm", "a cat by the lake"]
    neg = ["the man sat on the mat and talked", "a car in the warm sun", "the man talked", "my car sat",
           "the car is warm", "a car by the lake"]
    diag = dr.doctor(tiny_lm, pos, neg, grade_layers=[2], concept_words=["cat"])
    assert [h.layer for h in diag.layers] == [0, 1, 2, 3]
    assert diag.grade in "ABCDF" and diag.grade_layers == (2,)
    assert all(0 <= h.auc <= 1 and -1 <= h.consistency <= 1 for h in diag.layers)
    with pytest.raises(SteeringError, match="paired"):
        dr.doctor(tiny_lm, pos, neg[:-1])
    with pytest.raises(SteeringError, match="at least 4 pairs"):
        dr.doctor(tiny_lm, pos[:3], neg[:3])


def test_the_builds_own_activations_give_the_doctors_answer_without_a_pass(tiny_lm):
    """``build_vector(on_pooled=...)`` hands its pooled activations to the doctor (what ``steerlab build``
    and POST /vectors do): the diagnosis equals the doctor's own passes, and no forward pass runs."""
    from steerlab.evaluate import layer_signal, signal_of_pooled
    from steerlab.extract import build_vector
    from steerlab.personas import Persona

    pos = ["the cat sat on the mat and purred", "a cat in the warm sun", "the cat purred", "my cat sat",
           "the cat is warm", "a cat by the lake"]
    neg = ["the man sat on the mat and talked", "a car in the warm sun", "the man talked", "my car sat",
           "the car is warm", "a car by the lake"]
    got: list = []
    vec = build_vector(tiny_lm, pos, neg, layers=range(tiny_lm.n_layers), default_layers=[2], progress=False,
                       on_pooled=lambda p, n: got.append((p, n)))
    (pooled,) = got
    assert sorted(pooled[0]) == vec.layers and pooled[0][2].shape == (6, tiny_lm.hidden_size)
    by_pass = layer_signal(tiny_lm, pos, neg, vec.layers)
    assert [(s.layer, round(s.auc, 5), round(s.effect, 4)) for s in signal_of_pooled(*pooled)] == \
        [(s.layer, round(s.auc, 5), round(s.effect, 4)) for s in by_pass]
    persona = Persona(name="cats", description="", keywords=("cat",), positive=tuple(pos), negative=tuple(neg),
                      default_layers=(2,))
    passes = []
    handle = tiny_lm.model.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        reused = dr.checkup(tiny_lm, dr.as_built(persona, vec), vec.active_layers, pooled=pooled)
    finally:
        handle.remove()
    assert passes == []  # no text read again
    fresh = dr.doctor_persona(tiny_lm, persona)  # the full doctor: its own pass over every layer
    assert reused == {"grade": fresh.grade, "score": round(fresh.score, 1), "advice": list(fresh.advice),
                      "graded_layers": [2]}
    with pytest.raises(SteeringError, match="not those of these 5 pairs"):
        dr.doctor(tiny_lm, pos[:5], neg[:5], pooled=pooled)
