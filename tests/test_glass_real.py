"""Glass box on the real embedded model: readings separate held-out texts, line up with the text,
the lens names the concept, and the doctor grades the built-in personas and finds planted bad pairs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from steerlab.personas import builtin_names, get_persona

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def held_out(real_lm):
    """Per persona: a vector built on the even pairs at its default layers, and its reader."""
    from steerlab import build_vector
    from steerlab.reading import Reader

    out = {}
    for name in builtin_names():
        p = get_persona(name)
        vec = build_vector(real_lm, p.positive[0::2], p.negative[0::2], layers=list(p.default_layers), name=name,
                           pooling=p.pooling, chat=p.chat, progress=False)
        out[name] = (p, Reader(real_lm, [vec]))
    return out


@pytest.mark.parametrize("name", builtin_names())
def test_held_out_positives_read_higher_than_negatives(held_out, name):
    """Odd pairs were never seen by the vector; measured margins: tabby_cats 1.40, toronto 1.12, weeknd 0.92."""
    persona, reader = held_out[name]
    pos = torch.tensor([r.mean(name) for r in reader.read(list(persona.positive[1::2]))])
    neg = torch.tensor([r.mean(name) for r in reader.read(list(persona.negative[1::2]))])
    assert float(pos.mean() - neg.mean()) > 0.6
    assert float((pos[:, None] > neg[None, :]).float().mean()) > 0.85  # AUC over held-out texts
    assert float((pos > neg).float().mean()) >= 0.9  # each positive above its own negative


def test_concept_words_carry_the_concept(held_out):
    _, reader = held_out["tabby_cats"]
    r = reader.read("I adopted a striped kitten last week")[0]
    by_token = {t.text.strip(): t.values["tabby_cats"] for t in r.tokens}
    assert by_token["kitten"] > 3 and by_token["striped"] > 3
    assert by_token["week"] < 1 and by_token["last"] < 1


def test_readings_line_up_with_a_generated_reply(real_lm, held_out):
    from steerlab import generate

    _, reader = held_out["tabby_cats"]
    prompt = "Describe a typical morning routine."
    reply = generate(real_lm, prompt, [(reader.vectors[0], 0.1)])[0]
    reading = reader.read_replies([prompt], [reply])[0]
    assert "".join(t.text for t in reading.tokens) == reply
    assert len(reading.tokens) == len(real_lm.tokenizer(reply, add_special_tokens=False)["input_ids"])
    assert all(reply[t.start:t.end] == t.text for t in reading.tokens)


def test_lens_of_the_last_layer_names_the_concept(real_vectors, real_lm):
    from steerlab.lens import logit_lens

    wanted = {"tabby_cats": {"kitten", "kittens", "feline", "cat", "cats"}, "toronto": {"toronto", "ontario", "canada"},
              "weeknd": {"instrumentation", "acoustic", "melodies", "voc", "instrument", "instruments"}}
    for name, words in wanted.items():
        (row,) = logit_lens(real_lm, real_vectors[name], layers=[29], k=8)
        assert words & {t.strip().lower() for t, _ in row.promoted}, (name, row.promoted)


def test_doctor_grades_the_built_in_personas(real_lm):
    """Measured: weeknd B (89, pair 22 named), tabby_cats B (87), toronto C (79)."""
    from steerlab.doctor import doctor_persona

    grades = {}
    for name in builtin_names():
        p = get_persona(name)
        diag = doctor_persona(real_lm, p, layers=list(p.default_layers))
        grades[name] = diag.grade
        assert diag.grade in "ABC", (name, diag.to_dict())
        assert not diag.confounds, diag.confounds
    assert grades


def test_doctor_names_planted_swapped_pairs(real_lm):
    from steerlab.doctor import doctor_persona

    p = get_persona("tabby_cats")
    pos, neg = list(p.positive), list(p.negative)
    for i in (6, 18):  # pairs 7 and 19
        pos[i], neg[i] = neg[i], pos[i]
    clean = doctor_persona(real_lm, p, layers=list(p.default_layers))
    bad = doctor_persona(real_lm, replace(p, positive=tuple(pos), negative=tuple(neg)), layers=list(p.default_layers))
    assert [o.pair for o in bad.outliers] == [7, 19]
    assert bad.advice[0].startswith("drop or rewrite pairs 7 and 19 (lines 34, 82)")
    assert bad.score < clean.score - 10


CAT_PROMPTS = ["What should I feed my new kitten?", "Why does my cat knead the blanket?",
               "How do I stop my cat scratching the sofa?", "Is it normal for a tabby to sleep all day?",
               "What toys do cats like best?", "My cat keeps meowing at night. Why?",
               "How often should I clean the litter box?", "Can cats eat tuna?"]
OTHER_PROMPTS = ["How do I change a flat bicycle tyre?", "What is a good stretching routine for runners?",
                 "Explain how a credit card works.", "Suggest a name for a fantasy novel.",
                 "How do solar panels make electricity?", "What is the capital of Australia?",
                 "Give me a recipe for banana bread.", "How can I improve my handwriting?"]


def test_conditional_steering_fires_on_matching_prompts(real_lm, real_vectors):
    """Steer with weeknd only when the prompt reads as tabby_cats (mean >= 1). Measured: 7/8 vs 1/8."""
    from steerlab.conditional import Condition, Conditional, conditional_rows
    from steerlab.hooks import Steer

    entry = Conditional(Steer(real_vectors["weeknd"]), Condition(real_vectors["tabby_cats"], 1.0, "mean"))
    rows, _ = conditional_rows(real_lm, CAT_PROMPTS + OTHER_PROMPTS, [entry])
    fired = [bool(r) for r in rows]
    assert sum(fired[:8]) >= 6 and sum(fired[8:]) <= 2


def test_never_firing_condition_leaves_real_output_identical(real_lm, real_vectors):
    from steerlab import GenerationOptions, generate
    from steerlab.conditional import Condition, Conditional, conditional_rows
    from steerlab.hooks import Steer

    prompts = CAT_PROMPTS[:2] + OTHER_PROMPTS[:1]
    entry = Conditional(Steer(real_vectors["weeknd"], strength=0.6), Condition(real_vectors["tabby_cats"], 100.0))
    rows, _ = conditional_rows(real_lm, prompts, [entry])
    opts = GenerationOptions(max_new_tokens=16)
    assert generate(real_lm, prompts, rows, options=opts) == generate(real_lm, prompts, None, options=opts)


@pytest.mark.parametrize("on", ["prompt", "text"])
def test_when_that_never_fires_leaves_real_output_identical(real_lm, real_vectors, on):
    """Steer.when, on the prompt and on the text: an impossible threshold is exactly unsteered, per row."""
    from steerlab import GenerationOptions, generate
    from steerlab.spec import Steer, When

    prompts = CAT_PROMPTS[:2] + OTHER_PROMPTS[:1]
    opts = GenerationOptions(max_new_tokens=16)
    entry = Steer(real_vectors["weeknd"], strength=0.6, when=When(real_vectors["tabby_cats"], 100.0, on=on))
    report: dict = {}
    assert generate(real_lm, prompts, [entry], options=opts, report=report) == generate(real_lm, prompts, None,
                                                                                      options=opts)
    assert not any(row[0]["fired"] for row in report["conditions"])


def test_when_on_the_prompt_fires_on_matching_prompts(real_lm, real_vectors):
    from steerlab import GenerationOptions, generate
    from steerlab.spec import Steer, When

    entry = Steer(real_vectors["weeknd"], strength=0.4, when=When(real_vectors["tabby_cats"], 1.0, "mean"))
    report: dict = {}
    generate(real_lm, CAT_PROMPTS + OTHER_PROMPTS, [entry], options=GenerationOptions(max_new_tokens=2), report=report)
    fired = [row[0]["fired"] for row in report["conditions"]]
    assert sum(fired[:8]) >= 6 and sum(fired[8:]) <= 2
