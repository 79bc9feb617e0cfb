"""The built-in personas steer the embedded SmolLM2-135M-Instruct visibly and readably at their defaults.

Greedy decoding, the first six shipped neutral prompts, 48 new tokens. For each persona, at its
default layers / strength / positions, steered outputs must mention the concept (persona keywords,
whole words) on at least 3 of 6 prompts while the unsteered outputs do on at most 1, and every
steered output must stay readable (see :func:`readable`). A deliberately bad dose (strength 3.0 at
the default layers) must fail the same readability check, so the thresholds can fail.
Figures, examples and how the defaults were chosen: ``docs/personas.md``.
"""

from __future__ import annotations

import re
from collections import Counter
from importlib import resources

import pytest

from steerlab import GenerationOptions, Steer, generate
from steerlab.personas import build_persona, builtin_names, get_persona

pytestmark = pytest.mark.model

N_PROMPTS = 6
NEW_TOKENS = 48
MIN_STEERED_HITS = 3  # of N_PROMPTS
MAX_BASE_HITS = 1
BAD_STRENGTH = 3.0

# Readability thresholds, per generated text.
MIN_WORDS = 12  # 48 tokens are 20-38 words here; a broken dose often hits EOS after 1-5
MIN_DISTINCT = 0.4  # distinct / all whitespace-separated words: catches loops
MAX_TOP_TOKEN = 0.3  # share of the most frequent token: catches one-token loops
MIN_PROSE_CHARS = 0.7  # share of letters, spaces and ordinary punctuation: catches symbol soup
MIN_CHARS_PER_TOKEN = 2.5  # English prose is ~4 chars/token; invented-word gibberish is ~1.5-2
_PROSE = set(".,;:!?'\"-()")


def neutral_prompts(n: int) -> list[str]:
    text = resources.files("steerlab").joinpath("data", "neutral_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")][:n]


def mentions(text: str, keywords) -> bool:
    """Any keyword as a whole word/phrase, case-insensitive ('cat' hits "cat's", not "category")."""
    low = text.lower()
    return any(re.search(r"(?<![a-z])" + re.escape(k) + r"(?![a-z])", low) for k in keywords)


def text_stats(tokenizer, text: str) -> dict[str, float]:
    words = text.lower().split()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {
        "words": len(words),
        "distinct": len(set(words)) / max(len(words), 1),
        "top_token": Counter(ids).most_common(1)[0][1] / len(ids) if ids else 1.0,
        "prose_chars": sum(c.isalpha() or c.isspace() or c in _PROSE for c in text) / max(len(text), 1),
        "chars_per_token": len(text) / max(len(ids), 1),
    }


def readable(tokenizer, text: str) -> bool:
    s = text_stats(tokenizer, text)
    return (s["words"] >= MIN_WORDS and s["distinct"] >= MIN_DISTINCT and s["top_token"] <= MAX_TOP_TOKEN
            and s["prose_chars"] >= MIN_PROSE_CHARS and s["chars_per_token"] >= MIN_CHARS_PER_TOKEN)


def _generate_rows(lm, prompts, row_steering, positions: str) -> list[str]:
    """One batched generate call: len(row_steering) settings x prompts."""
    rows = [steering for steering in row_steering for _ in prompts]
    opts = GenerationOptions(max_new_tokens=NEW_TOKENS, positions=positions)
    return generate(lm, [p for _ in row_steering for p in prompts], rows, options=opts)


@pytest.fixture(scope="module")
def personas():
    return {name: get_persona(name) for name in builtin_names()}


@pytest.fixture(scope="module")
def vectors(real_lm, real_vectors, personas):
    """``build_persona(real_lm, get_persona(name), progress=False)`` per persona (conftest's, shared)."""
    return {name: real_vectors.get(name) or build_persona(real_lm, p, progress=False) for name, p in personas.items()}


@pytest.fixture(scope="module")
def default_runs(real_lm, personas, vectors):
    """Base and each persona at its defaults; one generate call per positions setting."""
    prompts = neutral_prompts(N_PROMPTS)
    by_positions: dict[str, list[str]] = {}
    for name, p in personas.items():
        by_positions.setdefault(p.positions, []).append(name)
    out: dict[str, list[str]] = {}
    for positions, names in sorted(by_positions.items()):
        settings = [[]] if "base" not in out else []
        settings += [[Steer(vectors[n], strength=vectors[n].default_strength, layers=tuple(vectors[n].active_layers),
                          governor=False)]
                     for n in names]
        texts = _generate_rows(real_lm, prompts, settings, positions)
        chunks = [texts[i : i + N_PROMPTS] for i in range(0, len(texts), N_PROMPTS)]
        if "base" not in out:
            out["base"] = chunks.pop(0)
        out.update(zip(names, chunks))
    return out


def test_builtin_personas_ship_usable_defaults(personas, real_lm):
    assert set(personas) >= {"tabby_cats", "toronto", "weeknd"}
    for name, p in personas.items():
        assert len(p.positive) == len(p.negative) >= 32, name
        assert p.default_layers and all(0 <= x < real_lm.n_layers for x in p.default_layers), name
        assert 0 < p.default_strength <= 1.0 and p.positions in ("all", "generated"), name
        others = [k for other, q in personas.items() if other != name for k in q.keywords]
        crossed = [k for k in others if any(mentions(t, [k]) for t in p.positive + p.negative)]
        assert not crossed, f"{name} mentions other personas' keywords: {crossed}"


@pytest.mark.parametrize("name", ["tabby_cats", "toronto", "weeknd"])
def test_default_steering_mentions_the_concept_and_stays_readable(name, personas, default_runs, real_lm):
    kw = personas[name].keywords
    base, steered = default_runs["base"], default_runs[name]
    base_hits = sum(mentions(t, kw) for t in base)
    hits = sum(mentions(t, kw) for t in steered)
    detail = "\n".join(f"  {mentions(t, kw):d} {text_stats(real_lm.tokenizer, t)} {t!r}" for t in steered)
    assert base_hits <= MAX_BASE_HITS, f"{name}: base outputs already mention the concept ({base_hits})"
    assert hits >= MIN_STEERED_HITS, f"{name}: only {hits}/{N_PROMPTS} steered outputs on concept\n{detail}"
    unreadable = [t for t in steered if not readable(real_lm.tokenizer, t)]
    assert not unreadable, f"{name}: {len(unreadable)} unreadable steered outputs\n{detail}"
    assert all(readable(real_lm.tokenizer, t) for t in base)


def test_thresholds_fail_for_a_bad_dose(personas, vectors, real_lm):
    """Strength 3.0 at each persona's default layers breaks the text: the readability check must say so."""
    prompts = neutral_prompts(N_PROMPTS)
    names = sorted(personas)
    for positions in sorted({personas[n].positions for n in names}):
        group = [n for n in names if personas[n].positions == positions]
        settings = [[Steer(vectors[n], strength=BAD_STRENGTH, layers=tuple(vectors[n].active_layers),
                           governor=False)] for n in group]
        texts = _generate_rows(real_lm, prompts, settings, positions)
        for i, name in enumerate(group):
            chunk = texts[i * N_PROMPTS : (i + 1) * N_PROMPTS]
            ok = sum(readable(real_lm.tokenizer, t) for t in chunk)
            assert ok <= 1, f"{name} at strength {BAD_STRENGTH}: {ok}/{N_PROMPTS} outputs pass as readable: {chunk}"
