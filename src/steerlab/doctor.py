"""The contrast-set doctor: grade a set of positive/negative pairs before any generation.

Forward passes only: one pooled pass over the texts at every layer examined, or none when a build
hands over its own (``pooled``); the held-out layer signal comes from the same activations
(:func:`steerlab.evaluate.signal_of_pooled`). What it measures, per layer:

* **separability**: cross-validated AUC of held-out positives vs negatives along the direction;
* **consistency**: mean cosine of each pair's difference ``pos_i - neg_i`` to the mean difference
  of the *other* pairs (leave-one-out, so a pair never votes for itself);
* **outliers**: pairs whose difference points the other way (leave-one-out cosine < 0, averaged
  over the grading layers), reported by pair number and file line;
* **stability**: cosine of the mean difference of bootstrap resamples of the pairs to the full one;
* **confounds** (text only): length difference between the sides, questions / exclamations on
  one side only, the same opening word, and words on most texts of one side only that are not
  the concept (not in the keywords or description): template tokens.

One grade (A-F) from the grading layers (the persona's default layers) and concrete advice.
Thresholds are documented in ``docs/glassbox.md``. Prints nothing.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import SteeringError

if TYPE_CHECKING:
    from .models import LoadedModel
    from .personas import Persona
    from .vectors import SteeringVector

_WORD = re.compile(r"[A-Za-z][A-Za-z']*")
_STOP = set("a an the and or but of to in on at for with by from as is are was were be been it its this that "
            "i you he she we they my your his her our their me him us them not no so if then than".split())
GRADES = ((90, "A"), (80, "B"), (70, "C"), (60, "D"), (0, "F"))


@dataclass(frozen=True)
class LayerHealth:
    layer: int
    auc: float
    consistency: float  # mean leave-one-out cosine of pair differences
    against: int  # pairs whose difference points the other way at this layer
    stability: float  # mean bootstrap cosine

    def to_dict(self) -> dict:
        return {"layer": self.layer, "auc": round(self.auc, 4), "consistency": round(self.consistency, 4),
                "against": self.against, "stability": round(self.stability, 4)}


@dataclass(frozen=True)
class Outlier:
    pair: int  # 1-based
    line: int | None  # line of the positive text in its file, when known
    cosine: float  # leave-one-out cosine, mean over the grading layers
    positive: str
    negative: str

    def to_dict(self) -> dict:
        return {"pair": self.pair, "line": self.line, "cosine": round(self.cosine, 4),
                "positive": self.positive, "negative": self.negative}


@dataclass(frozen=True)
class Diagnosis:
    name: str
    n_pairs: int
    grade_layers: tuple[int, ...]
    layers: tuple[LayerHealth, ...]
    outliers: tuple[Outlier, ...]
    confounds: tuple[str, ...]
    score: float
    grade: str
    advice: tuple[str, ...]
    facts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "grade": self.grade, "score": round(self.score, 1), "n_pairs": self.n_pairs,
                "grade_layers": list(self.grade_layers), "advice": list(self.advice),
                "confounds": list(self.confounds), "outliers": [o.to_dict() for o in self.outliers],
                "facts": self.facts, "layers": [x.to_dict() for x in self.layers]}


# ---- the math, on pooled activations -------------------------------------------------------------
def leave_one_out_cosines(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``[N]``: cosine of each pair's difference to the mean difference of the other pairs."""
    diffs = (pos - neg).double()
    n = diffs.shape[0]
    if n < 2:
        raise SteeringError("the doctor needs at least 2 pairs")
    others = (diffs.sum(0, keepdim=True) - diffs) / (n - 1)
    return torch.nn.functional.cosine_similarity(diffs, others, dim=1).float()


def bootstrap_cosines(pos: torch.Tensor, neg: torch.Tensor, *, samples: int = 100, seed: int = 0) -> torch.Tensor:
    """``[samples]``: cosine of the mean difference of pairs resampled with replacement to the full mean."""
    diffs = (pos - neg).double()
    full = diffs.mean(0)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, diffs.shape[0], (samples, diffs.shape[0]), generator=g)
    means = diffs[idx].mean(1)
    return torch.nn.functional.cosine_similarity(means, full[None], dim=1).float()


# ---- text confounds ------------------------------------------------------------------------------
def _share(texts: Sequence[str], pred: Callable[[str], object]) -> float:
    return sum(1 for t in texts if pred(t)) / max(len(texts), 1)


def _side(share_pos: float, share_neg: float) -> tuple[str, float, float] | None:
    if share_pos - share_neg >= 0.3:
        return "positives", share_pos, share_neg
    if share_neg - share_pos >= 0.3:
        return "negatives", share_neg, share_pos
    return None


def _amount(share: float) -> str:
    return "all" if share >= 0.999 else f"{share:.0%} of"


def text_confounds(positive: Sequence[str], negative: Sequence[str], *, pos_tokens: Sequence[int],
                   neg_tokens: Sequence[int], concept_words: Sequence[str] = ()) -> tuple[list[str], dict]:
    """Differences between the sides that are not the concept: (findings as sentences, facts)."""
    found: list[str] = []
    lp, ln = sum(pos_tokens) / len(pos_tokens), sum(neg_tokens) / len(neg_tokens)
    facts: dict[str, Any] = {"tokens_positive": round(lp, 1), "tokens_negative": round(ln, 1)}
    rel = (lp - ln) / max(min(lp, ln), 1e-9)
    facts["length_difference"] = round(rel, 3)
    if abs(rel) >= 0.25:
        longer, shorter = ("positives", "negatives") if rel > 0 else ("negatives", "positives")
        found.append(f"the {longer} are {abs(rel):.0%} longer than the {shorter} ({max(lp, ln):.1f} vs "
                     f"{min(lp, ln):.1f} tokens): length becomes part of the direction; match the lengths")
    for what, pred in (("questions", lambda t: "?" in t), ("exclamations", lambda t: "!" in t)):
        sp, sn = _share(positive, pred), _share(negative, pred)
        facts[f"{what}_positive"], facts[f"{what}_negative"] = round(sp, 3), round(sn, 3)
        side = _side(sp, sn)
        if side:
            found.append(f"the {side[0]} are {what} far more often ({_amount(side[1])} them vs {side[2]:.0%}); "
                         f"write the other side as {what} too")
    concept = {w.lower() for c in concept_words for w in _WORD.findall(c)}
    first = lambda texts: Counter(w[0].lower() for t in texts if (w := _WORD.findall(t)))  # noqa: E731
    fp, fn = first(positive), first(negative)
    for where, mine, other, texts, others in (("positives", fp, fn, positive, negative),
                                              ("negatives", fn, fp, negative, positive)):
        if mine:
            word, count = mine.most_common(1)[0]
            if word not in concept and count / len(texts) >= 0.5 and other.get(word, 0) / len(others) < 0.2:
                found.append(f"{count / len(texts):.0%} of the {where} start with {word!r} (the other side "
                             f"{other.get(word, 0) / len(others):.0%}): vary the openings or match them")
    words = lambda texts: Counter(w for t in texts for w in {x.lower() for x in _WORD.findall(t)})  # noqa: E731
    wp, wn = words(positive), words(negative)
    template: list[tuple[str, str, float]] = []
    for where, mine, other, texts, others in (("positives", wp, wn, positive, negative),
                                              ("negatives", wn, wp, negative, positive)):
        for w, c in mine.most_common():
            if c / len(texts) < 0.5:
                break
            if w in _STOP or w in concept or other.get(w, 0) / len(others) > 0.1:
                continue
            template.append((where, w, c / len(texts)))
    facts["template_words"] = [[s, w, round(x, 3)] for s, w, x in template]
    for where, w, share in template:
        found.append(f"{share:.0%} of the {where} contain {w!r}, the other side almost never, and it is not a "
                     "concept keyword: a template token (add it to the keywords if it is the concept)")
    return found, facts


# ---- grade ---------------------------------------------------------------------------------------
def grade_points(*, auc: float, consistency: float, stability: float, outliers: int, n_pairs: int,
                 confounds: int) -> tuple[float, list[str]]:
    """Score out of 100 and the reasons points were lost (see docs/glassbox.md)."""
    lost: list[tuple[float, str]] = [
        (min(40.0, max(0.0, 0.97 - auc) * 200), f"held-out AUC {auc:.2f}"),
        (min(25.0, max(0.0, 0.35 - consistency) * 100), f"pair consistency {consistency:.2f}"),
        (min(20.0, 100 * outliers / max(n_pairs, 1)), f"{outliers} pair(s) point the other way"),
        (min(15.0, max(0.0, 0.97 - stability) * 150), f"bootstrap stability {stability:.2f}"),
        (min(20.0, 7.0 * confounds), f"{confounds} confound(s)"),
    ]
    score = max(0.0, 100.0 - sum(p for p, _ in lost))  # the caps add up to 120: a hopeless set scores 0
    if outliers or confounds:  # an A means nothing concrete is left to fix
        score = min(score, 89.0)
    return score, [why for p, why in lost if p >= 0.5]


def letter(score: float) -> str:
    return next((g for floor, g in GRADES if score >= floor), "F")


def positive_lines(source: str, n: int) -> list[int | None]:
    """Line of each pair's ``positive =`` in a persona TOML file (None where unknown)."""
    try:
        lines = Path(source).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return [None] * n
    found = [i + 1 for i, line in enumerate(lines) if re.match(r"\s*positive\s*=", line)]
    return found + [None] * (n - len(found)) if len(found) <= n else [None] * n


def _advice(best: LayerHealth, grade_layers: Sequence[int], outliers: list[Outlier],
            confounds: list[str], n_pairs: int, mean_auc: float) -> list[str]:
    out = []
    if outliers:
        which = " and ".join(", ".join(str(o.pair) for o in outliers).rsplit(", ", 1))
        lines = [str(o.line) for o in outliers if o.line]
        out.append(f"drop or rewrite pair{'s' if len(outliers) > 1 else ''} {which}"
                   + (f" (line{'s' if len(lines) > 1 else ''} {', '.join(lines)})" if lines else "")
                   + (": their differences point" if len(outliers) > 1 else ": its difference points")
                   + " against the others")
    out += confounds
    if best.layer not in grade_layers and best.auc - mean_auc >= 0.03:
        out.append(f"the concept separates best at layer {best.layer} (AUC {best.auc:.2f}) vs {mean_auc:.2f} at the "
                   f"default layers {list(grade_layers)}: try it (steerlab sweep)")
    if n_pairs < 16:
        out.append(f"only {n_pairs} pairs: 32 or more give a steadier direction")
    if not out:
        out.append("nothing to fix: the contrast set is clean by these checks")
    return out


def diagnose(pos: dict[int, torch.Tensor], neg: dict[int, torch.Tensor], aucs: dict[int, float], *,
             positive: Sequence[str], negative: Sequence[str], pos_tokens: Sequence[int], neg_tokens: Sequence[int],
             grade_layers: Sequence[int], concept_words: Sequence[str] = (), lines: Sequence[int | None] | None = None,
             name: str = "contrast set", samples: int = 100, n_layers: int | None = None) -> Diagnosis:
    """Everything but the forward passes: pooled activations per layer (``[N, H]``, pairs aligned) in."""
    n = min(len(positive), len(negative))
    layers = sorted(pos)
    grade_layers = [x for x in grade_layers if x in pos] or layers
    health, loo = [], {}
    for x in layers:
        cos = leave_one_out_cosines(pos[x][:n], neg[x][:n])
        loo[x] = cos
        boot = bootstrap_cosines(pos[x][:n], neg[x][:n], samples=samples)
        health.append(LayerHealth(x, float(aucs[x]), float(cos.mean()), int((cos < 0).sum()), float(boot.mean())))
    by_layer = {h.layer: h for h in health}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    g_auc = mean([by_layer[x].auc for x in grade_layers])
    g_cons = mean([by_layer[x].consistency for x in grade_layers])
    g_stab = mean([by_layer[x].stability for x in grade_layers])
    pair_cos = torch.stack([loo[x] for x in grade_layers]).mean(0)
    lines = list(lines) if lines is not None else [None] * n
    outliers = [Outlier(i + 1, lines[i] if i < len(lines) else None, float(pair_cos[i]), positive[i], negative[i])
                for i in torch.argsort(pair_cos).tolist() if pair_cos[i] < 0]
    outliers.sort(key=lambda o: o.pair)
    confounds, facts = text_confounds(positive, negative, pos_tokens=pos_tokens, neg_tokens=neg_tokens,
                                      concept_words=concept_words)
    score, lost = grade_points(auc=g_auc, consistency=g_cons, stability=g_stab, outliers=len(outliers),
                               n_pairs=n, confounds=len(confounds))
    # Early layers separate on word identity alone (AUC ~1 at layers 0-1): suggest a layer only
    # from the band where steering usually works (20-80 % depth).
    total = n_layers or layers[-1] + 1
    lo, hi = round(0.2 * total), round(0.8 * total)
    best = max([h for h in health if lo <= h.layer <= hi] or health, key=lambda h: h.auc)
    facts |= {"auc": round(g_auc, 4), "consistency": round(g_cons, 4), "stability": round(g_stab, 4),
              "best_layer": best.layer, "best_auc": round(best.auc, 4), "points_lost_for": lost}
    return Diagnosis(name=name, n_pairs=n, grade_layers=tuple(grade_layers), layers=tuple(health),
                     outliers=tuple(outliers), confounds=tuple(confounds), score=score, grade=letter(score),
                     advice=tuple(_advice(best, grade_layers, outliers, confounds, n, g_auc)), facts=facts)


# ---- with a model ---------------------------------------------------------------------------------
def doctor(lm: LoadedModel, positive: Sequence[str], negative: Sequence[str], *, layers: Sequence[int] | None = None,
           grade_layers: Sequence[int] | None = None, pooling: str = "mean", chat: bool = False,
           method: str = "mean_diff", concept_words: Sequence[str] = (), lines: Sequence[int | None] | None = None,
           name: str = "contrast set", batch_size: int = 16,
           pooled: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None = None) -> Diagnosis:
    """Diagnose paired contrast texts on ``lm`` at ``layers`` (default: every layer).

    One pooled pass over the texts serves every measure. ``pooled``: the texts' pooled
    activations ``(positive, negative)`` from a pass made earlier with these settings (a build's,
    :func:`steerlab.extract.build_vector`'s ``on_pooled``): then no forward pass runs, and the
    layers examined are those it has (``layers`` is ignored).
    """
    from .evaluate import signal_of_pooled
    from .extract import pooled_activations
    from .layers import check_layers

    n = min(len(positive), len(negative))
    if len(positive) != len(negative):
        raise SteeringError(f"the doctor needs paired texts: {len(positive)} positives, {len(negative)} negatives")
    if n < 4:
        raise SteeringError(f"the doctor needs at least 4 pairs, got {n}")
    grade = check_layers(list(grade_layers), lm.n_layers) if grade_layers else [lm.n_layers // 2]
    if pooled is not None:
        pos, neg = pooled
        if any(len(t) != n for t in (*pos.values(), *neg.values())):
            raise SteeringError(f"the pooled activations are not those of these {n} pairs")
    else:
        use = check_layers(list(layers) if layers is not None else list(range(lm.n_layers)), lm.n_layers)
        use = sorted(set(use) | set(grade))
        kw: dict[str, Any] = dict(pooling=pooling, chat=chat, batch_size=batch_size, progress=False)
        pos, _ = pooled_activations(lm, list(positive), use, **kw)
        neg, _ = pooled_activations(lm, list(negative), use, **kw)
    signal = signal_of_pooled(pos, neg, method=method)
    count = lambda texts: [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]  # noqa: E731
    return diagnose(pos, neg, {s.layer: s.auc for s in signal}, positive=positive, negative=negative,
                    pos_tokens=count(positive), neg_tokens=count(negative), grade_layers=grade,
                    concept_words=concept_words, lines=lines, name=name, n_layers=lm.n_layers)


def doctor_persona(lm: LoadedModel, persona: Persona, *, layers: Sequence[int] | None = None,
                   batch_size: int = 16,
                   pooled: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None = None) -> Diagnosis:
    """:func:`doctor` with a persona's texts, settings, default layers and file lines."""
    grade = [x for x in persona.default_layers if x < lm.n_layers] or [lm.n_layers // 2]
    return doctor(lm, persona.positive, persona.negative, layers=layers, grade_layers=grade,
                  pooling=persona.pooling, chat=persona.chat, method=persona.method,
                  concept_words=[*persona.keywords, persona.description, persona.name.replace("_", " ")],
                  lines=positive_lines(persona.source, len(persona.positive)), name=persona.name,
                  batch_size=batch_size, pooled=pooled)


def as_built(persona: Persona, vec: SteeringVector) -> Persona:
    """``persona`` with the pooling and estimator its vector was built with (a build may override them),
    so the doctor grades the build's own activations with the build's settings."""
    from dataclasses import replace

    from .methods import estimator_of

    pooling = vec.pooling.removesuffix(":chat") or persona.pooling
    return replace(persona, pooling=pooling, chat=vec.pooling.endswith(":chat"), method=estimator_of(vec.method))


def checkup(lm, persona, layers: Sequence[int], *, batch_size: int = 16,  # noqa: ANN001
            pooled: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None = None) -> dict:
    """The short doctor report a build prints (and POST /vectors returns): grade, score and advice.

    ``pooled``: the build's own pooled activations (``build_vector(on_pooled=...)``): no text is read
    again and every layer the build has is examined (so the advice can name a better layer). Without
    them only the vector's ``layers`` are read. A set the doctor cannot grade (unpaired, under 4
    pairs) gives ``{"error": why}``.
    """
    try:
        diag = doctor_persona(lm, persona, layers=list(layers), batch_size=batch_size, pooled=pooled)
    except SteeringError as exc:
        return {"error": str(exc)}
    return {"grade": diag.grade, "score": round(diag.score, 1), "advice": list(diag.advice),
            "graded_layers": list(diag.grade_layers)}


def checkup_lines(report: dict) -> list[str]:
    """One or two lines for the terminal."""
    if "error" in report:
        return [f"doctor: not graded ({report['error']})"]
    advice = report["advice"]
    return [f"doctor: grade {report['grade']} ({report['score']:g}/100 at layers "
            f"{','.join(map(str, report['graded_layers']))}); `steerlab doctor` for the full report",
            *(f"  advice: {a}" for a in advice[:2])]
