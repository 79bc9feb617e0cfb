"""Token readings, logit lens and vector geometry on tiny random models: the math, not the model."""

from __future__ import annotations

import pytest
import torch

from steerlab import SteeringError, SteeringVector
from steerlab.anatomy import layer_profile, neighbour_cosines, similarity
from steerlab.hooks import capture, run_until_captured
from steerlab.lens import final_norm, logit_lens
from steerlab.reading import Reader, projections

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEUTRAL = ["a computer runs programs", "money saved today is money", "the future of technology is bright",
           "toronto has a tall tower by the lake"]
TEXTS = ["the cat sat on the mat", "cold winters by the lake", "x"]


def vector(hidden: int = 64, layers=(1, 2), seed: int = 0, name: str = "v") -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    dirs = {x: torch.randn(hidden, generator=g) for x in layers}
    return SteeringVector({x: d / d.norm() for x, d in dirs.items()}, {x: 1.0 for x in layers}, "tiny", name=name)


def test_token_spans_tile_the_text(tiny_lm):
    reader = Reader(tiny_lm, [vector()], neutral=NEUTRAL)
    for text, reading in zip(TEXTS + ["  two  spaces\nand a newline "], reader.read(TEXTS + ["  two  spaces\nand a newline "])):
        assert "".join(t.text for t in reading.tokens) == text
        assert [t.text for t in reading.tokens] == [text[t.start:t.end] for t in reading.tokens]
        ids = tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(reading.tokens) == len(ids)  # one reading per token


def test_projection_is_the_block_output_after_a_sink(tiny_lm):
    """Readings project exactly the block output of an unbatched pass over [sink] + text."""
    vec = vector()
    d = {1: vec.directions[1][None], 2: vec.directions[2][None]}
    (spans, proj), = projections(tiny_lm, ["the cat sat on the mat"], d)
    tok = tiny_lm.tokenizer
    ids = [tok.bos_token_id] + tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    with capture(tiny_lm, [2], stop_early=False) as store:
        run_until_captured(tiny_lm, input_ids=torch.tensor([ids]))
    want = store[2][0, 1:].float() @ vec.directions[2]
    torch.testing.assert_close(proj[2][:, 0], want, atol=1e-4, rtol=1e-4)
    assert len(spans) == len(ids) - 1


def test_batching_and_padding_do_not_change_readings(tiny_lm):
    vec = vector()
    batched = Reader(tiny_lm, [vec], neutral=NEUTRAL, batch_size=8).read(TEXTS)
    single = Reader(tiny_lm, [vec], neutral=NEUTRAL, batch_size=1).read(TEXTS)
    for a, b in zip(batched, single):
        assert a.values("v") == pytest.approx(b.values("v"), abs=1e-4)


def test_neutral_texts_read_mean_zero_sd_one(tiny_lm):
    reader = Reader(tiny_lm, [vector(), vector(seed=1, name="w", layers=(3,))], neutral=NEUTRAL)
    vals = {n: [v for r in reader.read(NEUTRAL) for v in r.values(n)] for n in ("v", "w")}
    for _n, xs in vals.items():
        t = torch.tensor(xs, dtype=torch.float64)
        assert float(t.mean()) == pytest.approx(0.0, abs=1e-6)
        assert float(t.std()) == pytest.approx(1.0, abs=1e-6)


def test_reading_is_linear_in_the_direction_sign(tiny_lm):
    vec = vector()
    up = Reader(tiny_lm, [vec], neutral=NEUTRAL).read(TEXTS[:2])
    down = Reader(tiny_lm, [-vec], neutral=NEUTRAL).read(TEXTS[:2])
    for a, b in zip(up, down):
        assert a.values("v") == pytest.approx([-x for x in b.values("v")], abs=1e-4)


def test_layers_override_and_errors(tiny_lm):
    vec = vector(layers=(1, 2, 3))
    assert Reader(tiny_lm, [vec], layers=[3], neutral=NEUTRAL).baselines[0].layers == (3,)
    with pytest.raises(SteeringError, match="no direction at layers"):
        Reader(tiny_lm, [vec], layers=[0], neutral=NEUTRAL)
    with pytest.raises(SteeringError, match="distinct names"):
        Reader(tiny_lm, [vec, vec], neutral=NEUTRAL)
    with pytest.raises(SteeringError, match="hidden size"):
        Reader(tiny_lm, [vector(hidden=32)], neutral=NEUTRAL)


def test_replies_are_read_in_their_prompts_context(tiny_lm):
    reader = Reader(tiny_lm, [vector()], neutral=NEUTRAL)
    alone = reader.read("the cat sat")[0]
    in_context = reader.read_replies(["tell me about the lake"], ["the cat sat"])[0]
    assert "".join(t.text for t in in_context.tokens) == "the cat sat"
    assert in_context.values("v") != pytest.approx(alone.values("v"))  # the context changes the residuals


def test_to_dict_is_json_ready(tiny_lm):
    import json

    d = Reader(tiny_lm, [vector()], neutral=NEUTRAL).read("the cat")[0].to_dict()
    assert json.loads(json.dumps(d))["tokens"][0]["read"].keys() == {"v"}
    assert set(d) == {"text", "tokens", "mean", "peak"}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox", "phi"])
def test_logit_lens_equals_norm_then_unembedding(arch):
    from conftest import make_tiny
    from steerlab.models import LoadedModel

    model, tok = make_tiny(arch)
    lm = LoadedModel(model=model, tokenizer=tok, model_id=arch)
    norm = final_norm(model)
    assert norm is not None
    vec = vector(layers=(1, 3))
    rows = logit_lens(lm, vec, k=5, readable=False)
    assert [r.layer for r in rows] == [1, 3]
    with torch.no_grad():
        h = norm(vec.directions[3][None])[0]
        if getattr(norm, "bias", None) is not None:
            h = h - norm.bias
        logits = model.get_output_embeddings().weight @ h
    top = torch.topk(logits, 5)
    assert [v for _, v in rows[1].promoted] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert rows[1].promoted[0][1] >= rows[1].promoted[-1][1] > rows[1].suppressed[-1][1] >= rows[1].suppressed[0][1]
    # a flipped direction swaps promoted and suppressed
    flipped = logit_lens(lm, -vec, layers=[3], k=5, readable=False)[0]
    assert [t for t, _ in flipped.promoted] == [t for t, _ in rows[1].suppressed]


def test_readable_lens_lists_only_word_tokens(tiny_lm):
    for row in logit_lens(tiny_lm, vector(), k=5):
        for text, _ in row.promoted + row.suppressed:
            assert any(c.isalnum() for c in text) and "\ufffd" not in text


def test_similarity_matrix_and_neighbour_cosines():
    a, b = vector(layers=(1, 2, 3), name="a"), vector(layers=(2, 3), seed=1, name="b")
    sim = similarity([a, b, -a.select([2, 3]).with_defaults(layers=[2])])
    assert sim.layers == (2, 3)
    for x in sim.layers:
        m = sim.per_layer[x]
        torch.testing.assert_close(torch.diagonal(m), torch.ones(3))
        torch.testing.assert_close(m, m.T)
        assert float(m[0, 2]) == pytest.approx(-1.0, abs=1e-5)
    assert sim.pairs() == [("a", "b"), ("a", "a"), ("b", "a")]
    assert similarity([a, b], layers=[3]).layers == (3,)
    with pytest.raises(SteeringError, match="share no layer"):
        similarity([a.select([1]), b])
    with pytest.raises(SteeringError, match="at least two"):
        similarity([a])
    cos = neighbour_cosines(a)
    assert cos[3] is None
    assert cos[1] == pytest.approx(float(a.directions[1] @ a.directions[2]), abs=1e-6)


def test_layer_profile_recovers_a_planted_contrast(tiny_lm):
    from steerlab.extract import build_vector

    pos = ["the cat sat on the mat and purred", "a cat in the warm sun", "the cat purred", "my cat sat"] * 2
    neg = ["the man sat on the mat and talked", "a car in the warm sun", "the man talked", "my car sat"] * 2
    vec = build_vector(tiny_lm, pos, neg, layers=[0, 1, 2, 3], progress=False)
    rows = layer_profile(tiny_lm, vec, pos, neg)
    assert [r.layer for r in rows] == [0, 1, 2, 3]
    assert all(0.0 <= r.auc <= 1.0 for r in rows)
    assert rows[-1].cos_next is None and all(-1 <= r.cos_next <= 1 for r in rows[:-1])
