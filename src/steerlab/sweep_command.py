"""``steerlab sweep``: measure a vector over layers x strengths, pick and record its defaults.

The command line around :mod:`steerlab.evaluate` (scores, rows) and :mod:`steerlab.plots`
(figures): parses options, prints the layer signal, a progress bar and the table, writes
``cells.csv``, ``cells.json``, ``generations.jsonl`` and the PNGs, and saves the chosen cell
as the vector's defaults. Formulas: ``docs/sweeps.md``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .defaults import REPETITION_PENALTY
from .errors import SteeringError
from .options import load_lm, model_options, open_store, vectors_option

if TYPE_CHECKING:
    from .embed import Embedder
    from .evaluate import LayerSignal
    from .evaluate import SweepRow
    from .models import LoadedModel
    from .vectors import SteeringVector

CSV_FIELDS = ("setting", "label", "strength", "score", "score_se", "concept", "fluency", "concept_sim",
              "concept_gain", "keyword_rate", "ppl", "ppl_ratio", "rep", "n")


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


def _floats(spec: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{spec!r}: give comma-separated numbers, e.g. 0.2,0.3,0.4", param_hint=what) from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise click.BadParameter(f"{spec!r}: give one or more non-negative numbers", param_hint=what)
    return sorted(set(values))


def _choices(spec: str | None, allowed: dict[str, object], what: str) -> list:
    if spec is None:
        return []
    out = []
    for x in spec.split(","):
        x = x.strip()
        if x not in allowed:
            raise click.BadParameter(f"{x!r}: choose from {', '.join(allowed)} (comma-separated to compare)",
                                     param_hint=what)
        out.append(allowed[x])
    return list(dict.fromkeys(out))


def _pooling_of(vec: SteeringVector) -> tuple[str, bool]:
    pooling = (vec.pooling or "mean").removesuffix(":chat")
    return pooling or "mean", vec.pooling.endswith(":chat")


@click.command()
@click.argument("name")
@click.option("--layers", "layer_spec", default=None, metavar="SPEC",
              help="Rows of the sweep. Commas separate rows; a number or slice gives one row per layer "
                   "(4:24:2 = ten rows); '+' steers layers together as one row (6+8+10+12+14, or 6:15:2+). "
                   "Default: ~10 layers from 15% to 80% depth.")
@click.option("--strengths", default="0.15,0.25,0.35,0.5,0.7", show_default=True, metavar="LIST",
              help="Strengths per layer, in units of the layer's typical residual norm.")
@click.option("--prompts", "n_prompts", default=30, show_default=True, type=click.IntRange(1, 10_000),
              help="How many of the 40 shipped held-out neutral prompts to generate from.")
@click.option("--max-new-tokens", default=40, show_default=True, type=click.IntRange(1, 1024),
              help="Tokens generated per reply (greedy).")
@click.option("--positions", default=None, metavar="all|generated|all,generated",
              help="Steer every position or only generated tokens; a comma list compares them "
                   "(default: the vector's setting, else all).")
@click.option("--norm-preserve", "norm_spec", default="off", show_default=True, metavar="off|on|off,on",
              help="Rescale steered hidden states to their original norm; off,on compares both.")
@click.option("--pooling", "pooling_spec", default=None, metavar="LIST",
              help="Rebuild the vector from its persona with this pooling (mean, last, window:K); "
                   "a comma list compares them. Default: the stored vector as built.")
@click.option("--contrast", "contrast_spec", default=None, metavar="plain|chat|plain,chat",
              help="Rebuild with contrast texts as plain sentences or as assistant replies; a comma list compares.")
@click.option("--repetition-penalty", default=REPETITION_PENALTY, show_default=True, type=click.FloatRange(1, 3),
              help="Same meaning as for generate; 1 shows raw loops.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 4096),
              help="Generations per model.generate call (rows carry different cells).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the CSV, JSON, generations and figures (default: sweeps/NAME).")
@click.option("--no-save", is_flag=True, help="Only report: leave the vector's defaults and the vectors folder alone.")
@click.option("--embedder", "embedder_path", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Sentence-encoder folder for concept scores (default: bundled all-MiniLM-L6-v2).")
@vectors_option
@model_options
def sweep(name: str, layer_spec: str | None, strengths: str, n_prompts: int, max_new_tokens: int, positions: str | None,
          norm_spec: str, pooling_spec: str | None, contrast_spec: str | None, repetition_penalty: float,
          batch_size: int, out_dir: Path | None, no_save: bool, embedder_path: Path | None, vectors_dir: Path | None,
          model_id: str | None, device: str, dtype: str) -> None:
    """Sweep vector NAME over layers x strengths on held-out prompts; record the best cell.

    Prints a generation-free layer signal first (how well the direction separates held-out
    contrast pairs at each depth), then generates every cell in batches, prints a table, writes
    files to --out and, unless --no-save, stores the chosen layer(s) and strength as the
    vector's defaults and its figure as <vectors>/NAME.sweep.png.
    """
    from tqdm.auto import tqdm

    from . import evaluate as ev
    from .embed import load_embedder
    from .generate import GenerationOptions
    from .personas import available_personas, build_persona, get_persona

    strength_list = _floats(strengths, "--strengths")
    norms = _choices(norm_spec, {"off": False, "on": True}, "--norm-preserve") or [False]
    pos_list = _choices(positions, {"all": "all", "generated": "generated"}, "--positions")
    poolings = [p.strip() for p in pooling_spec.split(",")] if pooling_spec else []
    chats = _choices(contrast_spec, {"plain": False, "chat": True}, "--contrast")
    prompts = ev.neutral_prompts(n_prompts)

    lm = load_lm(model_id, device, dtype)
    store = open_store(lm, vectors_dir)
    vec = store.get(name, progress=True)
    persona = get_persona(name) if name in available_personas() else None
    groups = ev.parse_layer_groups(layer_spec or ev.default_layer_spec(lm.n_layers), lm.n_layers)
    missing = sorted({x for g in groups for x in g} - set(vec.layers))
    if missing:
        raise click.UsageError(f"{name} has no direction at layers {missing} (it has {vec.layers}); "
                               f"rebuild it at every layer: steerlab build {name} --force")
    out_dir = out_dir or Path("sweeps") / name
    click.echo(f"model: {lm.model_id} on {lm.device} ({lm.dtype}); vector {name}: {vec.method}, pooling {vec.pooling}")

    # Vectors to compare: the stored one, or rebuilt from the persona with other pooling / contrast.
    vectors: dict[tuple[str | None, bool | None], SteeringVector] = {(None, None): vec}
    if poolings or chats:
        if persona is None:
            raise click.UsageError("--pooling/--contrast rebuild the vector from its persona; "
                                   f"{name!r} is not a persona")
        own_pool, own_chat = _pooling_of(vec)
        vectors = {}
        for pool, chat in itertools.product(poolings or [own_pool], chats or [own_chat]):
            key = (pool, chat)
            vectors[key] = vec if key == (own_pool, own_chat) else \
                build_persona(lm, persona, pooling=pool, chat=chat, progress=False)
    pos_list = pos_list or [vec.extra.get("positions", "all")]
    settings = [Setting(p, n, *k) for k, p, n in itertools.product(vectors, pos_list, norms)]
    show_build = len(vectors) > 1 or bool(poolings or chats)

    signal = []
    if persona is not None and len(persona.positive) >= 4:
        single = sorted({x for g in groups for x in g})
        pool, chat = _pooling_of(vec)
        signal = ev.layer_signal(lm, persona.positive, persona.negative, single, pooling=pool, chat=chat)
        click.echo("\nlayer signal (no generation): direction from half the pairs, held-out pairs projected on it")
        click.echo(f"  {'layer':>5}  {'AUC':>5}  {'effect d':>8}  {'pair acc':>8}")
        top = max(s.effect for s in signal) or 1.0
        for s in signal:
            bar = "#" * max(0, round(20 * s.effect / top))
            click.echo(f"  {s.layer:>5}  {s.auc:5.2f}  {s.effect:8.2f}  {s.accuracy:8.2f}  {bar}")

    embedder = load_embedder(embedder_path, device=lm.device)
    description = vec.description or (persona.description if persona else "") or name.replace("_", " ")
    keywords = vec.keywords or (persona.keywords if persona else ())
    reference = ev.reference_similarity(embedder, persona.positive, description) if persona else None
    cells = ev.grid(groups, strength_list)
    click.echo(f"\n{len(cells)} cells x {len(settings)} setting(s) x {len(prompts)} prompts, "
               f"{max_new_tokens} new tokens each, batches of {batch_size}")

    rows: list[ev.SweepRow] = []
    base: ev.SweepRow | None = None
    start = time.perf_counter()
    with tqdm(total=len(cells) * len(settings) + 1, unit="cell", desc="sweep", leave=False) as bar:
        for st in settings:
            opts = GenerationOptions(max_new_tokens=max_new_tokens, positions=st.positions,
                                     norm_preserve=st.norm_preserve, repetition_penalty=repetition_penalty)
            for row in ev.sweep(lm, vectors[(st.pooling, st.chat)], cells, prompts=prompts, embedder=embedder,
                                description=description, keywords=keywords, reference=reference, options=opts,
                                batch_size=batch_size, base=base, setting=st.label(show_build)):
                if row.is_base:
                    base = row
                rows.append(row)
                bar.update(1)
    seconds = time.perf_counter() - start
    assert base is not None  # ev.sweep yields the unsteered row first
    best = ev.pick_best(rows)
    s_even, s_odd = ev.half_scores(best)
    best_setting = next(s for s in settings if s.label(show_build) == best.setting)

    _print_table(rows, best)
    click.echo(f"\n{sum(r.n for r in rows)} generations scored in {seconds:.0f} s")
    click.echo(f"best: layer(s) {best.label}, strength {best.strength:g} [{best.setting}]: S={best.score:.3f} "
               f"(C={best.concept:.2f}, F={best.fluency:.2f}, concept cos {best.concept_sim:+.3f} vs base "
               f"{base.concept_sim:+.3f}, keywords {best.keyword_rate:.0%}, ppl x{best.ppl_ratio:.2f})")
    click.echo(f"  chosen as the best cell on both halves of the prompts: S={s_even:.3f} (even) / {s_odd:.3f} (odd)")
    for o in best.outputs[:2]:
        click.echo(f"  {o.prompt!r} -> {' '.join(o.text.split())[:160]!r}")
    unused = ev.neutral_prompts()[len(prompts):]
    if unused:  # the pick, judged on prompts it was not chosen on
        st = best_setting
        opts = GenerationOptions(max_new_tokens=max_new_tokens, positions=st.positions,
                                 norm_preserve=st.norm_preserve, repetition_penalty=repetition_penalty)
        check = list(ev.sweep(lm, vectors[(st.pooling, st.chat)], [ev.Cell(best.layers, best.strength)],
                              prompts=unused, embedder=embedder, description=description, keywords=keywords,
                              reference=reference, options=opts, batch_size=batch_size))[-1]
        click.echo(f"  on the {len(unused)} prompts the sweep did not use: S={check.score:.3f} "
                   f"(C={check.concept:.2f}, F={check.fluency:.2f})")
        held_out = {"prompts": len(unused), "score": round(check.score, 4), "concept": round(check.concept, 4),
                    "fluency": round(check.fluency, 4)}
    else:
        held_out = None
    if best.score < 0.2:
        click.echo("note: no cell is both on-concept and fluent; try other layers, smaller strength steps, "
                   "or layer groups (6+8+10)", err=True)

    summary = ev.summary(rows, best) | {
        "positions": best_setting.positions, "norm_preserve": best_setting.norm_preserve,
        "max_new_tokens": max_new_tokens, "reference": reference, "seconds": round(seconds, 1),
        "date": time.strftime("%Y-%m-%d"), "plot": f"{name}.sweep.png",
        "pick": "max over cells of min(S on even prompts, S on odd prompts)", "held_out": held_out,
    }
    title = f"{name} on {lm.model_id.split('/')[-1]}: {len(prompts)} prompts, {max_new_tokens} tokens"
    files = _write(out_dir, rows, best, summary, signal, title)
    click.echo("wrote " + ", ".join(str(p) for p in files))
    if no_save:
        click.echo("--no-save: vector defaults unchanged")
        return
    chosen = vectors[(best_setting.pooling, best_setting.chat)]
    chosen = chosen.with_defaults(layers=list(best.layers), strength=best.strength, sweep=summary,
                                  positions=best_setting.positions,
                                  operator="add_norm" if best_setting.norm_preserve else "add")
    chosen = _refine_window(lm, chosen, best, embedder)
    store.update(name, chosen)
    shutil.copyfile(out_dir / "sweep.png", store.folder / f"{name}.sweep.png")
    click.echo(f"saved defaults of {name}: layers {list(best.layers)}, strength {best.strength:g}, "
               f"positions {best_setting.positions}, norm_preserve {best_setting.norm_preserve}; "
               f"figure {store.folder / (name + '.sweep.png')}")


def _refine_window(lm: LoadedModel, vec: SteeringVector, best: SweepRow, embedder: Embedder) -> SteeringVector:
    """Measure the dose window at the chosen layers and make the chosen strength the default dose,
    so that a persona's default and the sweep's pick are one setting."""
    from .calibrate import calibrated, describe_window
    from .spec import window, window_key

    op = vec.extra["operator"]
    vec, (w,) = calibrated(lm, vec, operators=[op], layers=best.layers, governor=False, embedder=embedder)
    click.echo(describe_window(w))
    measured = window(vec, op, False)
    if measured is None:  # calibrated() has just stored it
        raise SteeringError(f"{vec.name}: no {op} window was stored")
    top = measured["max_strength"]
    dose = round(min(1.0, max(0.05, best.strength / top)), 3) if top else 0.7
    click.echo(f"the chosen strength {best.strength:g} is dose {dose} of this window"
               + (" (capped at 1: the pick is past the measured fluent limit)" if best.strength > top else ""))
    sweep = {**vec.extra["sweep"], "window": window_key(op, False)}
    return vec.with_defaults(governor=False, default_dose=dose, sweep=sweep)


def _print_table(rows: list[SweepRow], best: SweepRow) -> None:
    settings = list(dict.fromkeys(r.setting for r in rows if not r.is_base))
    head = (f"{'':1} {'layers':<14} {'strength':>8} {'S':>6} {'±se':>5} {'C':>5} {'F':>5} "
            f"{'cos':>6} {'Δcos':>6} {'kw':>4} {'ppl×':>6} {'rep':>4}")
    for setting in [""] + settings:
        subset = [r for r in rows if (r.is_base if not setting else (r.setting == setting and not r.is_base))]
        if not subset:
            continue
        click.echo(f"\n[{setting or 'unsteered'}]")
        click.echo(head)
        for r in subset:
            mark = "*" if r is best else " "
            click.echo(f"{mark:1} {r.label:<14} {r.strength:8g} {r.score:6.3f} {r.score_se:5.3f} {r.concept:5.2f} "
                       f"{r.fluency:5.2f} {r.concept_sim:+6.3f} {r.concept_gain:+6.3f} {r.keyword_rate:4.0%} "
                       f"{r.ppl_ratio:6.2f} {r.rep:4.2f}")


def _write(out_dir: Path, rows: list[SweepRow], best: SweepRow, summary: dict, signal: list[LayerSignal],
           title: str) -> list[Path]:
    from . import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "cells.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: round(v, 5) if isinstance(v, float) else v for k, v in r.to_dict().items()})
    json_path = out_dir / "cells.json"
    json_path.write_text(json.dumps({
        "summary": summary, "best": best.to_dict(),
        "layer_signal": [s.__dict__ for s in signal],
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
