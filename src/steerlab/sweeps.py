"""A whole sweep from Python: settings x layers x strengths, the pick, the held-out check, the files.

:func:`run_sweep` is what ``steerlab sweep`` runs (the command only parses options and prints):
it builds the vectors to compare (the stored one, or rebuilt from its persona with other pooling or
contrast rendering), crosses them with positions and norm-preserve into settings, measures the
generation-free layer signal, generates and scores every cell of every setting on held-out
prompts (:func:`steerlab.evaluate.sweep`), picks the best cell on both halves of the prompts and
checks it on the prompts it was not chosen on. :func:`write_sweep` writes the CSV, JSON,
generations and figures; :func:`chosen_vector` returns the vector with the pick as its defaults
(dose window measured at the chosen layers), for :meth:`steerlab.store.VectorStore.update`.
Prints nothing: progress goes to the callbacks. Formulas: ``docs/sweeps.md``.
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import evaluate as ev
from .defaults import REPETITION_PENALTY
from .errors import SteeringError

if TYPE_CHECKING:
    from .embed import Embedder
    from .models import LoadedModel
    from .personas import Persona
    from .vectors import SteeringVector

CSV_FIELDS = ("setting", "label", "strength", "score", "score_se", "concept", "fluency", "concept_sim",
              "concept_gain", "keyword_rate", "ppl", "ppl_ratio", "rep", "n")
DEFAULT_STRENGTHS = (0.15, 0.25, 0.35, 0.5, 0.7)


@dataclass(frozen=True)
class Setting:
    """One way of applying the vector: hook options, and how its contrast set was pooled."""

    positions: str
    norm_preserve: bool
    pooling: str | None = None  # None: the stored vector as it is
    chat: bool | None = None

    def label(self, show_build: bool) -> str:
        out = f"pos={self.positions}" + (",norm" if self.norm_preserve else "")
        if show_build:
            out += f",pool={self.pooling}" + (",chat" if self.chat else ",plain")
        return out


@dataclass
class SweepResult:
    """Everything a sweep measured; ``vectors[(pooling, chat)]`` are the vectors it compared."""

    name: str
    rows: list[ev.SweepRow]
    base: ev.SweepRow
    best: ev.SweepRow
    best_setting: Setting
    halves: tuple[float, float]  # the best cell's score on the even / odd prompts
    held_out: dict[str, Any] | None  # the best cell on the prompts the sweep did not use
    signal: list[ev.LayerSignal]
    prompts: list[str]
    max_new_tokens: int
    seconds: float
    reference: float | None  # the contrast texts' own concept similarity (None without a persona)
    vectors: dict[tuple[str | None, bool | None], SteeringVector] = field(repr=False)
    summary: dict[str, Any] = field(default_factory=dict)  # stored in cells.json and the vector's extra.sweep

    @property
    def chosen(self) -> SteeringVector:
        """The vector of the winning setting (as stored or rebuilt), without new defaults yet."""
        return self.vectors[(self.best_setting.pooling, self.best_setting.chat)]


def pooling_of(vec: SteeringVector) -> tuple[str, bool]:
    """(pooling, chat) a vector was built with (``mean:chat`` -> ("mean", True))."""
    pooling = (vec.pooling or "mean").removesuffix(":chat")
    return pooling or "mean", vec.pooling.endswith(":chat")


# About 90 lines, a third of them its signature and docstring: the steps share one set of locals.
def run_sweep(
    lm: LoadedModel,
    vec: SteeringVector,
    *,
    persona: Persona | None = None,
    layer_spec: str | None = None,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    n_prompts: int = 30,
    max_new_tokens: int = 40,
    positions: Sequence[str] = (),
    norm_preserve: Sequence[bool] = (False,),
    poolings: Sequence[str] = (),
    chats: Sequence[bool] = (),
    repetition_penalty: float = REPETITION_PENALTY,
    batch_size: int = 64,
    embedder: Embedder,
    on_signal: Callable[[list[ev.LayerSignal]], None] | None = None,
    on_start: Callable[[int, int, int], None] | None = None,
    on_cell: Callable[[], None] | None = None,
) -> SweepResult:
    """Sweep ``vec`` over layer rows x ``strengths`` for every setting; pick the best cell.

    ``positions`` / ``poolings`` / ``chats``: values to compare (empty: the vector's own);
    ``persona``: its contrast set, for the layer signal and for rebuilding with other pooling.
    ``on_signal(rows)`` hears the layer signal before generation starts, ``on_start(cells, settings,
    prompts)`` the size of the grid, ``on_cell()`` each finished cell.
    """
    from .generate import GenerationOptions

    prompts = ev.neutral_prompts(n_prompts)
    groups = ev.parse_layer_groups(layer_spec or ev.default_layer_spec(lm.n_layers), lm.n_layers)
    missing = sorted({x for g in groups for x in g} - set(vec.layers))
    if missing:
        raise SteeringError(f"{vec.name} has no direction at layers {missing} (it has {vec.layers}); "
                            f"rebuild it at every layer: steerlab build {vec.name} --force")
    vectors = _vectors_to_compare(lm, vec, persona, poolings, chats)
    pos_list = list(positions) or [vec.extra.get("positions", "all")]
    settings = [Setting(p, n, *k) for k, p, n in itertools.product(vectors, pos_list, norm_preserve)]
    show_build = len(vectors) > 1 or bool(poolings or chats)

    signal: list[ev.LayerSignal] = []
    if persona is not None and len(persona.positive) >= 4:
        single = sorted({x for g in groups for x in g})
        pool, chat = pooling_of(vec)
        signal = ev.layer_signal(lm, persona.positive, persona.negative, single, pooling=pool, chat=chat)
        if on_signal is not None:
            on_signal(signal)

    description = vec.description or (persona.description if persona else "") or vec.name.replace("_", " ")
    keywords = vec.keywords or (persona.keywords if persona else ())
    reference = ev.reference_similarity(embedder, persona.positive, description) if persona else None
    cells = ev.grid(groups, strengths)
    if on_start is not None:
        on_start(len(cells), len(settings), len(prompts))

    def options(st: Setting) -> GenerationOptions:
        return GenerationOptions(max_new_tokens=max_new_tokens, positions=st.positions,
                                 norm_preserve=st.norm_preserve, repetition_penalty=repetition_penalty)

    rows: list[ev.SweepRow] = []
    base: ev.SweepRow | None = None
    start = time.perf_counter()
    for st in settings:
        for row in ev.sweep(lm, vectors[(st.pooling, st.chat)], cells, prompts=prompts, embedder=embedder,
                            description=description, keywords=keywords, reference=reference, options=options(st),
                            batch_size=batch_size, base=base, setting=st.label(show_build)):
            if row.is_base:
                base = row
            rows.append(row)
            if on_cell is not None:
                on_cell()
    seconds = time.perf_counter() - start
    assert base is not None  # ev.sweep yields the unsteered row first
    best = ev.pick_best(rows)
    best_setting = next(s for s in settings if s.label(show_build) == best.setting)

    held_out = None
    unused = ev.neutral_prompts()[len(prompts):]
    if unused:  # the pick, judged on prompts it was not chosen on
        check = list(ev.sweep(lm, vectors[(best_setting.pooling, best_setting.chat)],
                              [ev.Cell(best.layers, best.strength)], prompts=unused, embedder=embedder,
                              description=description, keywords=keywords, reference=reference,
                              options=options(best_setting), batch_size=batch_size))[-1]
        held_out = {"prompts": len(unused), "score": round(check.score, 4), "concept": round(check.concept, 4),
                    "fluency": round(check.fluency, 4)}
    result = SweepResult(name=vec.name, rows=rows, base=base, best=best, best_setting=best_setting,
                         halves=ev.half_scores(best), held_out=held_out, signal=signal, prompts=prompts,
                         max_new_tokens=max_new_tokens, seconds=seconds, reference=reference, vectors=vectors)
    result.summary = _summary(result)
    return result


def _vectors_to_compare(lm: LoadedModel, vec: SteeringVector, persona: Persona | None, poolings: Sequence[str],
                        chats: Sequence[bool]) -> dict[tuple[str | None, bool | None], SteeringVector]:
    """The stored vector, or the vector rebuilt from its persona with each pooling x rendering asked for."""
    from .personas import build_persona

    if not (poolings or chats):
        return {(None, None): vec}
    if persona is None:
        raise SteeringError(f"--pooling/--render rebuild the vector from its persona; {vec.name!r} is not a persona")
    own_pool, own_chat = pooling_of(vec)
    vectors: dict[tuple[str | None, bool | None], SteeringVector] = {}
    for pool, chat in itertools.product(poolings or [own_pool], chats or [own_chat]):
        key = (pool, chat)
        vectors[key] = vec if key == (own_pool, own_chat) else \
            build_persona(lm, persona, pooling=pool, chat=chat, progress=False)
    return vectors


def _summary(r: SweepResult) -> dict[str, Any]:
    return ev.summary(r.rows, r.best) | {
        "positions": r.best_setting.positions, "norm_preserve": r.best_setting.norm_preserve,
        "max_new_tokens": r.max_new_tokens, "reference": r.reference, "seconds": round(r.seconds, 1),
        "date": time.strftime("%Y-%m-%d"), "plot": f"{r.name}.sweep.png",
        "pick": "max over cells of min(S on even prompts, S on odd prompts)", "held_out": r.held_out,
    }


def write_sweep(result: SweepResult, out_dir: Path, *, title: str) -> list[Path]:
    """Write ``cells.csv``, ``cells.json``, ``generations.jsonl`` and the figures to ``out_dir``."""
    from . import plots

    rows, best = result.rows, result.best
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "cells.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: round(v, 5) if isinstance(v, float) else v for k, v in r.to_dict().items()})
    json_path = out_dir / "cells.json"
    json_path.write_text(json.dumps({
        "summary": result.summary, "best": best.to_dict(),
        "layer_signal": [s.__dict__ for s in result.signal],
        "rows": [r.to_dict() for r in rows],
    }, indent=1, default=float))
    gen_path = out_dir / "generations.jsonl"
    with gen_path.open("w") as f:
        for r in rows:
            for o in r.outputs:
                f.write(json.dumps({"setting": r.setting, "layers": list(r.layers), "strength": r.strength,
                                    **o.__dict__}, ensure_ascii=False) + "\n")
    figs = [plots.heatmap(rows, best, out_dir / "heatmap.png", title=title),
            plots.strength_plot(rows, best, out_dir / "strength.png", title=title),
            plots.dose_plot(rows, best, out_dir / "dose.png", title=title),
            plots.summary_figure(rows, best, out_dir / "sweep.png", title=title + f" | chosen: layer(s) "
                                 f"{best.label}, strength {best.strength:g}")]
    return [csv_path, json_path, gen_path, *figs]


def chosen_vector(lm: LoadedModel, result: SweepResult, embedder: Embedder, *,
                  say: Callable[[str], None] | None = None) -> SteeringVector:
    """The winning vector with the pick as its defaults (layers, strength, positions, operator, the
    summary in ``extra.sweep``), its dose window measured at the chosen layers and the chosen strength
    made its default dose, so that a persona's default and the sweep's pick are one setting."""
    from .calibrate import calibrated, describe_window
    from .spec import strength_dose, window, window_key

    best, st = result.best, result.best_setting
    op = "add_norm" if st.norm_preserve else "add"
    vec = result.chosen.with_defaults(layers=list(best.layers), strength=best.strength, sweep=result.summary,
                                      positions=st.positions, operator=op)
    vec, (w,) = calibrated(lm, vec, operators=[op], layers=best.layers, governor=False, embedder=embedder)
    measured = window(vec, op, False)
    if measured is None:  # calibrated() has just stored it
        raise SteeringError(f"{vec.name}: no {op} window was stored")
    top = measured["max_strength"]
    dose = strength_dose(measured, best.strength) if top else 0.7
    if say is not None:
        say(describe_window(w))
        say(f"the chosen strength {best.strength:g} is dose {dose} of this window"
            + (" (capped at 1: the pick is past the measured fluent limit)" if best.strength > top else ""))
    sweep = {**vec.extra["sweep"], "window": window_key(op, False)}
    return vec.with_defaults(governor=False, default_dose=dose, sweep=sweep)
