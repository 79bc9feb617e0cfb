"""Scores for steered text, and layer x strength sweeps that yield one row per cell.

Prints nothing and knows nothing about the command line; formulas are documented in
``docs/sweeps.md``. Per generated text (steered output ``y`` for prompt ``p``, base output
``b`` for the same prompt):

* concept similarity ``cos(E(y), E(description))`` with the sentence embedder ``E``;
  concept component ``C = clip((cos_y - cos_b) / max(ref - cos_b, 0.05), 0, 1)`` where ``ref``
  is how similar the persona's own positive texts are to its description;
* keyword hits (whole-word, case-insensitive), a second, simpler concept signal;
* perplexity of ``y`` under the *unsteered* model given ``p``; relative to the base output's:
  ``F_ppl = clip(1 - log(ppl_y / ppl_b) / log(PPL_LIMIT), 0, 1)``;
* repeated n-gram rate ``rep`` (share of word 3-grams that already occurred in the text):
  ``F_rep = clip(1 - rep / REP_LIMIT, 0, 1)``;
* fluency ``F = F_ppl * F_rep`` and combined score ``S = 2 C F / (C + F)`` (harmonic mean,
  AxBench-style), averaged over prompts.

The whole sweep (settings, pick, files) is :mod:`steerlab.sweeps`; this module is its scores and grid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import SteeringError
from .extract import neutral_prompts  # re-exported: sweeps and calibration read it from here
from .prompt_cache import PromptCache, generate_from_cache, perplexities

if TYPE_CHECKING:
    from .embed import Embedder
    from .generate import GenerationOptions
    from .models import LoadedModel
    from .vectors import SteeringVector

PPL_LIMIT = 50.0  # a text 50x as perplexing as the base output has fluency 0
REP_LIMIT = 0.5  # half the 3-grams repeated: fluency 0
MIN_HEADROOM = 0.05  # floor of (ref - cos_b) in the concept component
DEFAULT_REFERENCE = 0.5  # ref when no on-concept example texts are known
__all__ = ["Cell", "LayerSignal", "PromptCache", "Scored", "SweepRow", "combined", "concept_component",
           "default_layer_spec", "fluency_component", "generate_from_cache", "grid", "keyword_hits",
           "layer_signal", "neutral_prompts", "parse_layer_groups", "perplexities", "pick_best",
           "reference_similarity", "repeated_ngram_rate", "score_texts", "summary", "sweep", "words"]
_WORD = re.compile(r"[\w']+")


# ---- text-only scores ------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repeated_ngram_rate(text: str, n: int = 3) -> float:
    """Share of the word n-grams of ``text`` that already occurred earlier in it (0 = none)."""
    w = words(text)
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def keyword_hits(text: str, keywords: Sequence[str]) -> int:
    """How many times any keyword occurs as whole word(s), case-insensitive (a trailing 's counts)."""
    low = " ".join(words(text))
    total = 0
    for kw in keywords:
        kw_words = words(kw)
        if kw_words:
            total += len(re.findall(r"(?<![\w'])" + re.escape(" ".join(kw_words)) + r"(?:'s)?(?![\w'])", low))
    return total


def concept_component(cos_y: float, cos_b: float, ref: float) -> float:
    """Concept gain over the base output, as a share of the way to the reference similarity."""
    return _clip((cos_y - cos_b) / max(ref - cos_b, MIN_HEADROOM))


def fluency_component(ppl_y: float, ppl_b: float, rep: float) -> float:
    """Fluency in [0, 1]: relative perplexity and repeated n-grams must both be low."""
    if not math.isfinite(ppl_y) or not math.isfinite(ppl_b):
        return 0.0
    f_ppl = _clip(1.0 - math.log(max(ppl_y, 1e-9) / max(ppl_b, 1e-9)) / math.log(PPL_LIMIT))
    f_rep = _clip(1.0 - rep / REP_LIMIT)
    return f_ppl * f_rep


def combined(concept: float, fluency: float) -> float:
    """Harmonic mean: high only when the text is both on-concept and fluent."""
    return 0.0 if concept + fluency <= 0 else 2 * concept * fluency / (concept + fluency)


def _clip(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo if not math.isfinite(x) else min(hi, max(lo, x))


# ---- model-based scores ----------------------------------------------------------------------
def reference_similarity(embedder: Embedder, texts: Sequence[str], description: str) -> float:
    """Mean similarity of on-concept example texts (a persona's positives) to ``description``."""
    return float(sum(embedder.similarity(texts, description)) / len(texts)) if texts else DEFAULT_REFERENCE


# ---- generation-free signal per layer ----------------------------------------------------------
@dataclass(frozen=True)
class LayerSignal:
    """How well a direction built on some contrast pairs separates the *other* pairs, at one layer."""

    layer: int
    auc: float  # P(held-out positive projects above held-out negative)
    effect: float  # Cohen's d of the held-out projections
    accuracy: float  # share of held-out pairs whose positive projects above its own negative


def layer_signal(lm: LoadedModel, positive: Sequence[str], negative: Sequence[str], layers: Sequence[int], *,
                 pooling: str = "mean", chat: bool = False, method: str = "mean_diff", folds: int = 2,
                 batch_size: int = 16) -> list[LayerSignal]:
    """Cross-validated separation along the direction, per layer (no generation).

    Pair ``i`` goes to fold ``i % folds``; each fold is scored with a direction estimated on
    the others and the fold metrics are averaged. One batched pass over the texts serves
    every layer.
    """
    from .extract import pooled_activations

    n = min(len(positive), len(negative))
    if n < 2 * folds:
        raise SteeringError(f"the layer signal needs at least {2 * folds} contrast pairs, got {n}")
    kw: dict[str, Any] = dict(pooling=pooling, chat=chat, batch_size=batch_size, progress=False)
    pos, _ = pooled_activations(lm, list(positive[:n]), layers, **kw)
    neg, _ = pooled_activations(lm, list(negative[:n]), layers, **kw)
    return signal_of_pooled(pos, neg, method=method, folds=folds)


def signal_of_pooled(pos: dict[int, torch.Tensor], neg: dict[int, torch.Tensor], *, method: str = "mean_diff",
                     folds: int = 2) -> list[LayerSignal]:
    """:func:`layer_signal` from pooled activations (``{layer: [N, H]}``, pairs aligned) made earlier:
    no forward pass (a build hands its own to the doctor)."""
    from .methods import get_method

    n = min(min(len(t) for t in pos.values()), min(len(t) for t in neg.values()))
    if n < 2 * folds:
        raise SteeringError(f"the layer signal needs at least {2 * folds} contrast pairs, got {n}")
    _, fn = get_method(method)
    pos = {x: t[:n] for x, t in pos.items()}
    neg = {x: t[:n] for x, t in neg.items()}
    idx = torch.arange(n)
    out = []
    for layer in sorted(pos):
        aucs, effects, accs = [], [], []
        for k in range(folds):
            test, train = idx % folds == k, idx % folds != k
            d = fn(pos[layer][train], neg[layer][train]).float()
            d = d / d.norm().clamp_min(1e-12)
            p, q = pos[layer][test] @ d, neg[layer][test] @ d
            above, ties = (p[:, None] > q[None, :]).float().mean(), (p[:, None] == q[None, :]).float().mean()
            aucs.append(float(above + 0.5 * ties))
            sd = torch.sqrt((p.var() + q.var()) / 2).clamp_min(1e-12)
            effects.append(float((p.mean() - q.mean()) / sd))
            accs.append(float((p > q).float().mean()))
        out.append(LayerSignal(layer, sum(aucs) / folds, sum(effects) / folds, sum(accs) / folds))
    return out


# ---- sweeps ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One point of a sweep: steer at ``layers`` together, ``strength`` per layer. ``()``: base."""

    layers: tuple[int, ...]
    strength: float = 0.0

    @property
    def label(self) -> str:
        return "+".join(map(str, self.layers)) if self.layers else "base"


@dataclass(frozen=True)
class Scored:
    """One generated text and its scores (see the module docstring)."""

    prompt: str
    text: str
    cos: float
    hits: int
    ppl: float
    rep: float
    concept: float
    fluency: float
    score: float


@dataclass(frozen=True)
class SweepRow:
    """Averages over the prompts for one cell (``layers == ()``: the unsteered base)."""

    layers: tuple[int, ...]
    strength: float
    setting: str
    n: int
    concept_sim: float  # mean cos(E(y), E(description))
    concept_gain: float  # mean cos_y - cos_b
    keyword_rate: float  # share of outputs with at least one keyword
    ppl: float  # geometric mean perplexity under the unsteered model
    ppl_ratio: float  # geometric mean of ppl_y / ppl_b
    rep: float  # mean repeated 3-gram rate
    concept: float  # mean C
    fluency: float  # mean F
    score: float  # mean S
    score_se: float  # standard error of S over prompts
    outputs: tuple[Scored, ...] = ()

    @property
    def label(self) -> str:
        return Cell(self.layers).label

    @property
    def is_base(self) -> bool:
        return not self.layers

    def to_dict(self, *, outputs: bool = False) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "outputs"}
        d["layers"] = list(self.layers)
        d["label"] = self.label
        if outputs:
            d["outputs"] = [o.__dict__ for o in self.outputs]
        return d


def _row(cell: Cell, setting: str, scored: list[Scored], base: SweepRow | None) -> SweepRow:
    n = len(scored)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    logs = [math.log(s.ppl) for s in scored if math.isfinite(s.ppl) and s.ppl > 0]
    if base is not None:
        ratios = [math.log(s.ppl / b.ppl) for s, b in zip(scored, base.outputs)
                  if math.isfinite(s.ppl) and math.isfinite(b.ppl) and s.ppl > 0 and b.ppl > 0]
        gain = mean([s.cos - b.cos for s, b in zip(scored, base.outputs)])
    else:
        ratios, gain = [0.0], 0.0
    scores = [s.score for s in scored]
    m = mean(scores)
    se = math.sqrt(sum((x - m) ** 2 for x in scores) / (n - 1) / n) if n > 1 else 0.0
    return SweepRow(
        layers=cell.layers, strength=cell.strength, setting=setting, n=n,
        concept_sim=mean([s.cos for s in scored]), concept_gain=gain,
        keyword_rate=mean([float(s.hits > 0) for s in scored]),
        ppl=math.exp(mean(logs)) if logs else float("nan"),
        ppl_ratio=math.exp(mean(ratios)) if ratios else float("nan"),
        rep=mean([s.rep for s in scored]), concept=mean([s.concept for s in scored]),
        fluency=mean([s.fluency for s in scored]), score=m, score_se=se, outputs=tuple(scored),
    )


def score_texts(lm: LoadedModel, embedder: Embedder, prompts: Sequence[str], texts: Sequence[str], *, description: str,
                keywords: Sequence[str] = (), reference: float | None = None, base: Sequence[Scored] | None = None,
                chat: bool | None = None, description_embedding: torch.Tensor | None = None,
                cache: PromptCache | None = None) -> list[Scored]:
    """Score ``texts[i]`` (the reply to ``prompts[i]``) against the base reply ``base[i]``.

    Without ``base`` the texts are the base: their concept and fluency components are 0 and
    1 by definition. Run it outside any steering context: perplexity is the unsteered model's.
    """
    ref = DEFAULT_REFERENCE if reference is None else reference
    desc = description_embedding if description_embedding is not None else embedder.encode([description])[0]
    cos = (embedder.encode(texts) @ desc).tolist()
    ppl = perplexities(lm, prompts, texts, chat=chat, cache=cache)
    out = []
    for i, (p, t) in enumerate(zip(prompts, texts)):
        rep = repeated_ngram_rate(t)
        if base is None:
            c, f = 0.0, fluency_component(ppl[i], ppl[i], rep)
        elif not t.strip():
            c, f = 0.0, 0.0  # an empty reply carries no concept and is no answer
        else:
            b = base[i]
            c, f = concept_component(cos[i], b.cos, ref), fluency_component(ppl[i], b.ppl, rep)
        out.append(Scored(p, t, cos[i], keyword_hits(t, keywords), ppl[i], rep, c, f, combined(c, f)))
    return out


def sweep(lm: LoadedModel, vector: SteeringVector, cells: Sequence[Cell], *, prompts: Sequence[str], embedder: Embedder,
          description: str, keywords: Sequence[str] = (), reference: float | None = None,
          options: GenerationOptions | None = None, batch_size: int = 64, base: SweepRow | None = None,
          setting: str = "") -> Iterator[SweepRow]:
    """Generate and score every cell over ``prompts``; yield the base row, then one row per cell.

    Rows of one ``model.generate`` batch carry different cells (per-row steering), in
    cell-major order so rows come out steadily. ``base``: a base row from an earlier sweep
    over the same prompts and generation options, to skip regenerating it (it is not
    yielded again). Rows are yielded as soon as all their prompts are scored.
    """
    from .generate import GenerationOptions, generate
    from .hooks import Steer

    opts = options or GenerationOptions()
    prompts = list(prompts)
    if not prompts:
        raise SteeringError("a sweep needs at least one prompt")
    desc = embedder.encode([description])[0]
    cache = PromptCache(lm, prompts, chat=opts.chat)
    kw: dict[str, Any] = dict(description=description, keywords=keywords, reference=reference, chat=opts.chat,
                              description_embedding=desc, cache=cache)
    if base is None:
        texts: list[str] = []
        for i in range(0, len(prompts), batch_size):
            texts += generate(lm, prompts[i : i + batch_size], None, options=opts)
        base = _row(Cell(()), "", score_texts(lm, embedder, prompts, texts, **kw), None)
        yield base
    elif base.n != len(prompts):
        raise SteeringError(f"the base row has {base.n} prompts, this sweep {len(prompts)}")
    jobs = [(c, p) for c in range(len(cells)) for p in range(len(prompts))]
    done: dict[int, list[Scored | None]] = {c: [None] * len(prompts) for c in range(len(cells))}
    left = {c: len(prompts) for c in range(len(cells))}
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        rows = [[Steer(vector, strength=cells[c].strength, layers=cells[c].layers)] if cells[c].layers
                and cells[c].strength else [] for c, _ in chunk]
        batch = [prompts[p] for _, p in chunk]
        if opts.positions == "generated" and opts.temperature == 0:  # reuse the cached prompt prefill
            texts = generate_from_cache(lm, cache, batch, rows, options=opts)
        else:
            texts = generate(lm, batch, rows, options=opts)
        for c in sorted({c for c, _ in chunk}):
            idx = [k for k, (cc, _) in enumerate(chunk) if cc == c]
            sub = [base.outputs[chunk[k][1]] for k in idx]
            scored = score_texts(lm, embedder, [prompts[chunk[k][1]] for k in idx], [texts[k] for k in idx],
                                 base=sub, **kw)
            for k, s in zip(idx, scored):
                done[c][chunk[k][1]] = s
            left[c] -= len(idx)
            if left[c] == 0:
                yield _row(cells[c], setting, done.pop(c), base)  # type: ignore[arg-type]


def half_scores(row: SweepRow) -> tuple[float, float]:
    """Mean combined score on the even-numbered and on the odd-numbered prompts."""
    s = [o.score for o in row.outputs]
    even, odd = s[0::2], s[1::2] or s[0::2]
    return sum(even) / max(1, len(even)), sum(odd) / max(1, len(odd))


def pick_best(rows: Sequence[SweepRow]) -> SweepRow:
    """The steered cell that does well on *both* halves of the prompts (the larger of its two
    half-means being no help): ``max(min(S_even, S_odd))``. A cell that wins on a few prompts by
    luck rarely wins on both halves, so the pick generalises better than the sharpest mean peak
    (ties: higher mean, then weaker, then fewer layers)."""
    steered = [r for r in rows if not r.is_base]
    if not steered:
        raise SteeringError("no steered cells to choose from")
    return max(steered, key=lambda r: (round(min(half_scores(r)), 6), round(r.score, 6),
                                       -r.strength * len(r.layers), -len(r.layers)))


# ---- inputs and summaries ------------------------------------------------------------------------
def parse_layer_groups(spec: str, n_layers: int) -> list[tuple[int, ...]]:
    """Rows of a sweep from a layer spec; each row is a group of layers steered together.

    Commas separate rows. A number or slice alone gives one row per layer (``4:24:2`` is ten
    single-layer rows); ``+`` joins layers into one row (``6+8+10+12+14``), slices included
    (``6:15:2+`` is the same group: a trailing ``+`` makes a lone slice one group).
    """
    from .layers import parse_layers

    rows: list[tuple[int, ...]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "+" in part:
            items = [x for x in part.split("+") if x.strip()]
            if not items:
                raise SteeringError(f"empty layer group {part!r}: write e.g. 6+8+10 or 6:15:2+")
            group = sorted({layer for x in items for layer in parse_layers(x, n_layers)})
            rows.append(tuple(group))
        else:
            rows.extend((layer,) for layer in parse_layers(part, n_layers))
    if not rows:
        raise SteeringError(f"no layers in {spec!r}: write e.g. 4:24:2, 8,10,12 or 6+8+10+12+14")
    return list(dict.fromkeys(rows))


def grid(groups: Sequence[tuple[int, ...]], strengths: Sequence[float]) -> list[Cell]:
    """Every (layer group, strength) cell, layer-major."""
    return [Cell(tuple(g), float(s)) for g in groups for s in strengths]


def default_layer_spec(n_layers: int) -> str:
    """About ten single layers from ~15% to ~80% depth (``4:24:2`` on a 30-layer model)."""
    start, stop = round(n_layers * 0.15), round(n_layers * 0.8)
    step = max(1, (stop - start) // 10)
    return f"{start}:{stop}:{step}"


def summary(rows: Sequence[SweepRow], best: SweepRow) -> dict:
    """A small JSON-able record of a sweep (for the vector's metadata)."""
    base = next((r for r in rows if r.is_base), None)
    keys = ("score", "concept", "fluency", "concept_sim", "concept_gain", "keyword_rate", "ppl_ratio", "rep")
    steered = [r for r in rows if not r.is_base]
    return {
        "best": {"layers": list(best.layers), "strength": best.strength, "setting": best.setting,
                 **{k: round(getattr(best, k), 4) for k in keys}},
        "base": {k: round(getattr(base, k), 4) for k in ("concept_sim", "keyword_rate", "ppl", "rep")} if base else {},
        "prompts": best.n,
        "layers": list(dict.fromkeys(r.label for r in steered)),
        "strengths": sorted({r.strength for r in steered}),
        "settings": list(dict.fromkeys(r.setting for r in steered)),
    }
