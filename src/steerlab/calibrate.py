"""Measure a vector's dose window: where its concept shows, where the text breaks.

One batched ladder of strengths (each row of one ``generate`` call carries its own rung) on
neutral prompts, then one teacher-forced pass of the *unsteered* model over every reply, which
gives both signals at once:

* **concept reading** ``r``: the mean projection of the reply tokens' residuals on the vector's
  unit direction, at its layers, minus the neutral baseline ``b_l`` and divided by the neutral
  per-token spread ``sd_l`` (so 0 is "typical text", 1 is one token-spread above it). Needs no
  embedder and no keywords: any contrast set works.
* **fluency** ``F``: :func:`steerlab.evaluate.fluency_component` (perplexity of the reply under the
  unsteered model relative to the base reply's, times the repeated-3-gram penalty).

Per rung, the means over prompts give: **onset** = the smallest strength whose concept gain over
the base reply reaches ``ONSET_Z``; **breakdown** = the smallest strength whose fluency falls
below ``BREAK_F``; **max_strength** = the largest strength below the breakdown whose fluency
stays at or above ``FLUENT_F`` (dose 1). Crossings are interpolated on a log-strength scale
between rungs. The result is stored in the vector's ``extra["windows"][operator]``, with the
neutral baselines (``extra["baselines"]``, used by ``target`` and ``cap``) and spreads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, UTC
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessorList

from .defaults import REPETITION_PENALTY
from .errors import SteeringError
from .evaluate import DEFAULT_REFERENCE, concept_component, fluency_component, neutral_prompts, repeated_ngram_rate
from .generate import GenerationOptions, encode_prompts, generation_kwargs, governor_for, run_generate
from .governor import Governor
from .hooks import capture, steer
from .prompt_cache import PromptCache, cached_reply_logp
from .spec import DEFAULT_OPERATOR, OPERATORS, Steer, resolve_rows, window_key
from .vectors import SteeringVector

if TYPE_CHECKING:
    from .embed import Embedder
    from .models import LoadedModel

ONSET_C = 0.2  # mean concept component C that counts as "clearly there" (the base replies have 0)
ONSET_Z = 0.5  # without an embedder: concept-reading gain, in neutral token spreads
BREAK_F = 0.5  # mean fluency below this: the text has broken
FLUENT_F = 0.7  # dose 1 keeps at least this mean fluency on the calibration prompts
CALIBRATION_PROMPTS = 4  # the first neutral prompts; evaluations hold out the last ones
NEW_TOKENS = 32
CALIBRATE_WITH_GOVERNOR = True  # measured: the governor moves the breakdown out (docs/dose.md)


def ladder(operator: str, n_layers_applied: int) -> list[float]:
    """Geometric strengths wide enough for one layer or many (``rotate``: fractions of 90 degrees)."""
    if operator == "rotate":
        return [round(0.02 * 1.45**k, 4) for k in range(11)]  # 0.02 .. 0.82 (1.8 .. 74 degrees)
    top = 1.6 / math.sqrt(n_layers_applied)
    return [round(top / 1.5**k, 4) for k in range(10)][::-1]


@dataclass(frozen=True)
class Rung:
    strength: float
    concept: float  # mean C (the sweep's concept component), or the reading gain without an embedder
    reading: float  # mean concept-reading gain over the base replies, in neutral spreads
    fluency: float  # mean F
    replies: tuple[str, ...]


@dataclass(frozen=True)
class Window:
    """A measured dose window (strengths are per applied layer, in the operator's unit)."""

    operator: str
    layers: tuple[int, ...]
    onset: float | None
    breakdown: float | None
    max_strength: float
    rungs: tuple[Rung, ...]
    base_replies: tuple[str, ...]
    seconds: float
    concept_measure: str  # "embedder" (the sweep's C) or "reading"
    governor: bool
    base_entropy: float | None = None  # the unsteered replies' mean next-token entropy (nats): the governor's reference
    positions: str | int = "all"  # where the ladder steered (the vector's default positions)

    @property
    def width(self) -> float | None:
        """breakdown / onset (the ladder's top stands in for a breakdown never reached)."""
        if self.onset is None:
            return None
        top = self.breakdown if self.breakdown is not None else self.rungs[-1].strength
        return top / self.onset

    def record(self) -> dict:
        """What is stored in the vector's metadata."""
        r = lambda x: None if x is None else round(float(x), 5)  # noqa: E731
        return {
            "layers": list(self.layers), "onset": r(self.onset), "breakdown": r(self.breakdown),
            "max_strength": r(self.max_strength), "width": r(self.width),
            "mapping": "strength = lo + dose x (max_strength - lo), lo = 0.5 min(onset, max_strength)",
            "ladder": [r(x.strength) for x in self.rungs], "concept": [r(x.concept) for x in self.rungs],
            "reading": [r(x.reading) for x in self.rungs], "fluency": [r(x.fluency) for x in self.rungs],
            "concept_measure": self.concept_measure, "governor": self.governor, "prompts": len(self.base_replies),
            "new_tokens": NEW_TOKENS, "seconds": round(self.seconds, 1), "base_entropy": r(self.base_entropy),
            "positions": self.positions,
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }


def _crossing(xs: Sequence[float], ys: Sequence[float], level: float, *, rising: bool) -> float | None:
    """First strength where ``ys`` crosses ``level`` (log-interpolated between rungs)."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        hit = y >= level if rising else y < level
        if hit:
            if i == 0:
                return x
            x0, y0 = xs[i - 1], ys[i - 1]
            t = 0.0 if y == y0 else min(1.0, max(0.0, (level - y0) / (y - y0)))
            return math.exp(math.log(x0) + t * (math.log(x) - math.log(x0)))
    return None


@torch.no_grad()
def neutral_statistics(lm: LoadedModel, vec: SteeringVector, prompts: Sequence[str], *, chat: bool | None = None
                       ) -> tuple[dict[int, float], dict[int, float]]:
    """Per layer, mean and spread of neutral prompt tokens' projections on the unit direction."""
    enc = encode_prompts(lm, prompts, chat)
    mask = enc["attention_mask"].bool().clone()
    first = mask.float().argmax(-1)
    mask[torch.arange(mask.shape[0]), first] = False  # the attention sink
    means, sds = {}, {}
    with capture(lm, vec.layers, stop_early=False) as store:
        lm.model(**enc, use_cache=False)
    for layer in vec.layers:
        u = vec.directions[layer].float()
        u = (u / u.norm().clamp_min(1e-12)).to(lm.device)
        p = (store[layer].float() @ u)[mask]
        means[layer], sds[layer] = float(p.mean()), float(p.std().clamp_min(1e-6))
    return means, sds


@torch.no_grad()
def _replies(lm: LoadedModel, prompts: list[str], rows: list[list[Steer]],
             opts: GenerationOptions) -> tuple[torch.Tensor, torch.Tensor, int, list[float]]:
    """Greedy replies of every row in one batch: (ids incl. prompt, reply-token mask, prompt width,
    mean next-token entropy per row)."""
    enc = encode_prompts(lm, prompts, opts.chat)
    resolved = resolve_rows(rows, lm.n_layers)
    gov = governor_for(lm, resolved, len(prompts))
    watch = gov or Governor([False] * len(prompts), device=lm.device, dtype=lm.dtype)  # entropy only
    with steer(lm, resolved, gain=gov.gain if gov else None):
        out = run_generate(lm, **enc, **generation_kwargs(lm, opts), logits_processor=LogitsProcessorList([watch]))
    width = enc["input_ids"].shape[1]
    new = out[:, width:]
    eos = torch.tensor(generation_kwargs(lm, opts)["eos_token_id"], device=out.device)
    ended = torch.isin(new, eos).long().cumsum(-1) > 0
    return out, torch.cat([enc["attention_mask"].bool(), ~ended], dim=1), width, watch.mean_entropy()


def _reply_ids(ids: torch.Tensor, mask: torch.Tensor, width: int,
               entropy: list[float]) -> tuple[list[list[int]], list[float]]:
    """:func:`_replies`' rows as reply token ids (up to each row's end), with their entropies."""
    return [r[width:][mask[i, width:]].tolist() for i, r in enumerate(ids)], entropy


@torch.no_grad()
def _score(lm: LoadedModel, vec: SteeringVector, layers: Sequence[int], prompts: Sequence[str],
           replies: Sequence[Sequence[int]], means: dict[int, float], sds: dict[int, float],
           batch_size: int = 16) -> tuple[list[float], list[float]]:
    """Per row: perplexity of the reply (token ids) under the unsteered model, and its concept reading.

    Every row's prompt is read unsteered, so the prompts run once (:class:`PromptCache`) and only
    the reply tokens go through the model again (measured on SmolLM2: this pass took 37 of
    calibration's 58 s when each row re-read its prompt, which is more than half of its tokens)."""
    cache = PromptCache(lm, prompts)
    ppl, reading = [], []
    for i in range(0, len(replies), batch_size):
        t_ids = [list(r) or [lm.tokenizer.eos_token_id or 0] for r in replies[i : i + batch_size]]  # never empty
        with capture(lm, layers, stop_early=False) as store:
            logp = cached_reply_logp(lm, cache, prompts[i : i + batch_size], t_ids)
        n = torch.tensor([len(r) for r in replies[i : i + batch_size]], device=logp.device)
        rm = (torch.arange(logp.shape[1], device=logp.device)[None] < n[:, None]).float()
        count = n.clamp_min(1)
        ppl += torch.exp(-(logp * rm).sum(-1) / count).where(n > 0, torch.tensor(float("nan"))).tolist()
        z = torch.zeros_like(rm)
        for layer in layers:
            u = vec.directions[layer].float()
            u = (u / u.norm().clamp_min(1e-12)).to(rm.device)
            z += ((store[layer].float() @ u) - means[layer]) / sds[layer]
        reading += ((z / len(layers) * rm).sum(-1) / count).tolist()
    return ppl, reading


def calibrate(lm: LoadedModel, vec: SteeringVector, *, operator: str = "add", layers: Sequence[int] | None = None,
              prompts: Sequence[str] | None = None, strengths: Sequence[float] | None = None,
              repetition_penalty: float = REPETITION_PENALTY, governor: bool = False, embedder: Embedder | None = None,
              reference: float | None = None, statistics: tuple[dict, dict] | None = None,
              positions: str | int | None = None, base: tuple[list[list[int]], list[float]] | None = None,
              progress: Callable[[str], None] | None = None) -> Window:
    """Measure the dose window of ``vec`` under ``operator`` at ``layers`` (default: its active layers).

    ``base``: the unsteered replies to ``prompts`` (token ids) and their mean entropies, when the
    caller has just generated them with these options (:func:`measure`): the batch then holds only
    the ladder's rows."""
    if operator not in OPERATORS:
        raise SteeringError(f"unknown operator {operator!r}: use one of {', '.join(OPERATORS)}")
    t0 = time.perf_counter()
    use = tuple(layers) if layers else tuple(vec.active_layers)
    prompts = list(prompts or neutral_prompts(CALIBRATION_PROMPTS))
    rungs = list(strengths or ladder(operator, len(use)))
    where = positions if positions is not None else vec.extra.get("positions", "all")  # where it will steer
    means, sds = statistics or neutral_statistics(lm, vec, prompts)  # measure() passes them: one pass per vector
    vec = with_statistics(vec, means, sds)
    opts = GenerationOptions(max_new_tokens=NEW_TOKENS, repetition_penalty=repetition_penalty)
    rows: list[list[Steer]] = [[Steer(vec, strength=s, layers=use, operator=operator, positions=where,
                                      governor=governor)] for s in rungs for _ in prompts]
    batch_prompts = prompts * (len(rungs) + 1)
    if progress:
        progress(f"{vec.name}: {len(rungs)} strengths x {len(prompts)} prompts ({operator}, layers {list(use)})")
    if base is None:  # the unsteered rows first, in the same batch
        replies, entropy = _reply_ids(*_replies(lm, batch_prompts, [[]] * len(prompts) + rows, opts))
    else:
        replies, entropy = _reply_ids(*_replies(lm, batch_prompts[len(prompts):], rows, opts))
        replies, entropy = base[0] + replies, base[1] + entropy
    ppl, reading = _score(lm, vec, use, batch_prompts, replies, means, sds)
    texts = [lm.tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]
    k = len(prompts)
    cos = (embedder.encode(texts) @ embedder.encode([vec.description])[0]).tolist() \
        if embedder is not None and vec.description else None
    ref = DEFAULT_REFERENCE if reference is None else reference
    out = []
    for j, s in enumerate(rungs):
        sl = range(k * (j + 1), k * (j + 2))
        gain = sum(reading[i] - reading[i % k] for i in sl) / k
        conc = sum(concept_component(cos[i], cos[i % k], ref) if texts[i] else 0.0 for i in sl) / k \
            if cos is not None else gain
        flu = [fluency_component(ppl[i], ppl[i % k], repeated_ngram_rate(texts[i])) if texts[i] else 0.0 for i in sl]
        out.append(Rung(s, conc, gain, sum(flu) / k, tuple(texts[i] for i in sl)))
    xs = [r.strength for r in out]
    onset = _crossing(xs, [r.concept for r in out], ONSET_C if cos is not None else ONSET_Z, rising=True)
    breakdown = _crossing(xs, [r.fluency for r in out], BREAK_F, rising=False)
    fluent = [r.strength for r in out if r.fluency >= FLUENT_F and (breakdown is None or r.strength < breakdown)]
    ok_until = _crossing(xs, [r.fluency for r in out], FLUENT_F, rising=False)
    max_strength = ok_until if ok_until is not None else xs[-1]
    if fluent and fluent[0] > max_strength:  # fluency dipped early then recovered: stay below the dip
        max_strength = fluent[0]
    return Window(operator, use, onset, breakdown, max_strength, tuple(out), tuple(texts[:k]),
                  time.perf_counter() - t0, "embedder" if cos is not None else "reading", governor,
                  round(sum(entropy[:k]) / k, 3), where)


def with_statistics(vec: SteeringVector, means: dict[int, float], sds: dict[int, float]) -> SteeringVector:
    """The vector with neutral baselines and spreads per layer in its metadata."""
    return vec.with_defaults(baselines={str(k): round(v, 5) for k, v in means.items()},
                             spreads={str(k): round(v, 5) for k, v in sds.items()})


def with_window(vec: SteeringVector, window: Window, *, make_default: bool = False) -> SteeringVector:
    """The vector with ``window`` stored (and its operator made the default when asked)."""
    windows = dict(vec.extra.get("windows") or {})
    windows[window_key(window.operator, window.governor)] = window.record()
    extra: dict[str, Any] = {"windows": windows}
    if make_default:
        extra["operator"] = window.operator
    return vec.with_defaults(**extra)


def measure(lm: LoadedModel, vec: SteeringVector, *, operators: Sequence[str] | None = None,
            layers: Sequence[int] | None = None, governor: bool | None = None, embedder: Embedder | None = None,
            reference: float | None = None,
            progress: Callable[[str], None] | None = None) -> tuple[SteeringVector, list[Window]]:
    """Calibrate ``vec`` for each operator (default: its own); store every window and the statistics."""
    ops = list(operators or [vec.extra.get("operator", DEFAULT_OPERATOR)])
    governor = bool(vec.extra.get("governor", CALIBRATE_WITH_GOVERNOR)) if governor is None else governor
    means, sds = neutral_statistics(lm, vec, neutral_prompts(CALIBRATION_PROMPTS))
    vec = with_statistics(vec, means, sds)
    base = None
    if "base_entropy" not in vec.extra:  # first: the governor's thresholds sit above it (governor.py)
        opts = GenerationOptions(max_new_tokens=NEW_TOKENS, repetition_penalty=REPETITION_PENALTY)
        base = _reply_ids(*_replies(lm, neutral_prompts(CALIBRATION_PROMPTS), [[]] * CALIBRATION_PROMPTS, opts))
        vec = vec.with_defaults(base_entropy=round(sum(base[1]) / len(base[1]), 3))
    windows = []
    for op in ops:  # the unsteered replies just made are every ladder's base rows
        w = calibrate(lm, vec, operator=op, layers=layers, governor=governor, embedder=embedder, reference=reference,
                      statistics=(means, sds), base=base, progress=progress)
        windows.append(w)
        vec = with_window(vec, w)
    if "governor" not in vec.extra:  # a vector's first calibration decides its governor default
        vec = vec.with_defaults(governor=governor)

    return vec, windows


def with_known_entropy(vec: SteeringVector, others: Iterable[SteeringVector]) -> SteeringVector:
    """``vec`` carrying the model's fluent entropy from another vector of the same model, when one
    has it: it is the model's, not the vector's, so :func:`measure` then skips its unsteered pass
    (about 3 s on 2 idle cores)."""
    if "base_entropy" in vec.extra:
        return vec
    for other in others:
        if other.model_id == vec.model_id and other.extra.get("base_entropy") is not None:
            return vec.with_defaults(base_entropy=other.extra["base_entropy"])
    return vec


def default_embedder() -> Embedder | None:
    """The bundled sentence embedder, or None (calibration then uses the concept reading)."""
    from .embed import load_embedder
    from .errors import ModelLoadError

    try:
        return load_embedder()
    except ModelLoadError:
        return None


def calibrated(lm: LoadedModel, vec: SteeringVector, *, operators: Sequence[str] | None = None,
               layers: Sequence[int] | None = None, governor: bool | None = None, embedder: Embedder | None = None,
               progress: Callable[[str], None] | None = None) -> tuple[SteeringVector, list[Window]]:
    """:func:`measure` with the bundled embedder and, for a persona, its positives as the concept reference."""
    from .evaluate import reference_similarity
    from .personas import available_personas, get_persona

    emb = embedder if embedder is not None else default_embedder()
    ref = None
    if emb is not None and vec.name in available_personas() and vec.description:
        ref = reference_similarity(emb, get_persona(vec.name).positive, vec.description)
    return measure(lm, vec, operators=operators, layers=layers, governor=governor, embedder=emb, reference=ref,
                   progress=progress)


def describe_window(w: Window) -> str:
    """One line for the command line."""
    on = f"{w.onset:.3g}" if w.onset is not None else "not reached"
    br = f"{w.breakdown:.3g}" if w.breakdown is not None else f"above {w.rungs[-1].strength:.3g}"
    width = f"{w.width:.1f}x" if w.width is not None else "n/a"
    gov = " + governor" if w.governor else ""
    where = "" if str(w.positions) == "all" else f", positions {w.positions}"
    layers = ",".join(map(str, w.layers))
    return (f"dose window ({w.operator}{gov}, layers {layers}{where}): concept from strength {on}, "
            f"breaks at {br} (width {width}); dose 1 = strength {w.max_strength:.3g}  [{w.seconds:.0f} s]")
