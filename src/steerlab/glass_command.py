"""``steerlab inspect`` / ``doctor`` / ``similar``: the glass-box commands.

Registered at the bottom of cli.py. Formatting only: the numbers come from
:mod:`steerlab.reading`, :mod:`steerlab.lens`, :mod:`steerlab.anatomy` and :mod:`steerlab.doctor`.
Colours are ANSI (click.style, 256-colour backgrounds); without a terminal the text is annotated
instead (``token[+2.4]``) so piped output keeps the information.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import json
import sys
from pathlib import Path

import click

from .options import AliasedOption, load_lm, model_options, open_store, vectors_option

if TYPE_CHECKING:
    from .anatomy import LayerProfileRow
    from .doctor import Diagnosis
    from .lens import LensRow
    from .models import LoadedModel
    from .reading import TextReading
    from .vectors import SteeringVector

# (upper bound, 256-colour background, legend label): readings in neutral standard deviations
BUCKETS = ((-2.0, 25, "< -2"), (-1.0, 117, "-2..-1"), (1.0, None, "-1..1"), (2.0, 229, "1..2"),
           (3.0, 214, "2..3"), (float("inf"), 196, ">= 3"))


def _bucket(value: float) -> tuple[int | None, str]:
    for upper, colour, label in BUCKETS:
        if value < upper:
            return colour, label
    return BUCKETS[-1][1], BUCKETS[-1][2]


def paint(reading: TextReading, name: str, *, color: bool, mark: float = 1.0) -> str:
    """The text with each token coloured by its reading (or annotated, without colour)."""
    out = []
    for t in reading.tokens:
        v = t.values[name]
        if color:
            bg, _ = _bucket(v)
            out.append(click.style(t.text, bg=bg, fg=16 if bg is not None else None) if bg is not None else t.text)
        else:
            out.append(f"{t.text}[{v:+.1f}]" if abs(v) >= mark else t.text)
    return "".join(out)


def legend(*, color: bool) -> str:
    if not color:
        return "legend: token[reading] shown where |reading| >= 1 (neutral standard deviations; 0 = typical)"
    keys = [click.style(f" {label} ", bg=bg, fg=16) if bg is not None else f" {label} " for _, bg, label in BUCKETS]
    return "legend (neutral standard deviations, 0 = typical): " + "".join(keys)


def _lens_lines(rows: Sequence[LensRow]) -> list[str]:
    out = []
    for r in rows:
        plus = " ".join(t for t, _ in r.promoted)
        minus = " ".join(t for t, _ in r.suppressed)
        out.append(f"  layer {r.layer:>2}: + {plus}")
        out.append(f"            - {minus}")
    return out


def _layers(spec: str | None, lm: LoadedModel) -> list[int] | None:
    from .layers import parse_layers

    return parse_layers(spec, lm.n_layers) if spec else None


@click.command("inspect")
@click.argument("text", required=False)
@click.option("--vector", "-v", "names", multiple=True, required=True, metavar="NAME",
              help="Vector whose concept to read (repeatable).")
@click.option("--layer", "--layers", "layer_spec", cls=AliasedOption, default=None,
              help="Read at these layers instead of the vector's default layers: 12, 10,12,14 or 8:16:2.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of coloured text.")
@click.option("--lens/--no-lens", default=True, show_default=True,
              help="Also show the tokens each direction promotes and suppresses (logit lens).")
@click.option("--top", default=8, show_default=True, type=click.IntRange(1, 50), help="Tokens per lens row.")
@click.option("--profile", is_flag=True,
              help="Per layer: held-out AUC of the vector's contrast set and cosine to the next layer.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --profile: write the per-layer figure to this PNG.")
@click.option("--color/--no-color", default=None, help="Colour the tokens (default: when printing to a terminal).")
@vectors_option
@model_options
def inspect_cmd(text: str, names: tuple[str, ...], layer_spec: str | None, as_json: bool, lens: bool, top: int,
                profile: bool, plot_path: Path | None, color: bool | None, vectors_dir: Path | None,
                model_id: str | None, device: str, dtype: str) -> None:
    """Read TEXT token by token: how strongly the model carries each vector's concept.

    \b
    Each token is coloured by its reading: the projection of the residual stream on the
    vector's direction at its layers, in standard deviations of the same projection over
    neutral text (0 = typical, 3 = far into the concept). Without TEXT, only the vector's
    logit lens (and --profile) is shown.
      steerlab inspect "I adopted a striped kitten last week" --vector tabby_cats
      steerlab inspect --vector weeknd --profile --plot weeknd_layers.png
    """
    from .lens import lens_layers, logit_lens
    from .reading import Reader

    lm = load_lm(model_id, device, dtype)
    store = open_store(lm, vectors_dir)
    vecs = [store.get(n) for n in names]
    layers = _layers(layer_spec, lm)
    result: dict = {"model": lm.model_id}
    reader = None
    if text is not None:
        reader = Reader(lm, vecs, layers=layers)
        reading = reader.read(text)[0]
        result |= reading.to_dict()
        result["vectors"] = {v.name: {"layers": list(b.layers), "neutral_tokens": b.n_tokens}
                             for v, b in zip(vecs, reader.baselines)}
    lenses = {v.name: logit_lens(lm, v, layers=lens_layers(v, layers), k=top) for v in vecs} if lens else {}
    if lenses:
        result["lens"] = {n: [r.to_dict() for r in rows] for n, rows in lenses.items()}
    profiles = {v.name: _profile(lm, v, layers) for v in vecs} if profile else {}
    if profiles:
        result["profile"] = {n: [r.to_dict() for r in rows] for n, rows in profiles.items()}
        if plot_path is not None:
            result["plots"] = [str(_profile_plot(vecs, profiles, plot_path))]
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
        return
    use_color = sys.stdout.isatty() if color is None else color
    for k, vec in enumerate(vecs):
        if reader is not None:
            b = reader.baselines[k]
            click.echo(click.style(f"{vec.name}", bold=True) + f"  (layers {','.join(map(str, b.layers))}; "
                       f"mean {reading.mean(vec.name):+.2f}, peak {reading.peak(vec.name):+.2f})", color=use_color)
            click.echo(paint(reading, vec.name, color=use_color), color=use_color)
            strongest = sorted(reading.tokens, key=lambda t: -t.values[vec.name])[:5]
            click.echo("  strongest: " + ", ".join(f"{t.text.strip() or repr(t.text)} {t.values[vec.name]:+.1f}"
                                                   for t in strongest))
        if vec.name in lenses:
            click.echo(f"  logit lens of {vec.name} (+ promotes, - suppresses):")
            for line in _lens_lines(lenses[vec.name]):
                click.echo(line)
        if vec.name in profiles:
            click.echo(f"  where {vec.name} lives (held-out AUC of its contrast set; cosine to the next layer):")
            for r in profiles[vec.name]:
                mark = "*" if r.layer in vec.active_layers else " "
                nxt = "" if r.cos_next is None else f"{r.cos_next:.2f}"
                click.echo(f"   {mark}layer {r.layer:>2}  AUC {r.auc:.3f}  d {r.effect:5.2f}  cos next {nxt}")
    if reader is not None:
        click.echo(legend(color=use_color), color=use_color)
    for p in result.get("plots", []):
        click.echo(f"wrote {p}")


def _profile(lm: LoadedModel, vec: SteeringVector, layers: list[int] | None) -> list[LayerProfileRow]:
    from .anatomy import layer_profile
    from .errors import PersonaError
    from .personas import available_personas, get_persona

    if vec.name not in available_personas():
        raise PersonaError(f"--profile needs {vec.name}'s contrast set: no persona named {vec.name!r} "
                           "(put its .toml in the personas folder)")
    persona = get_persona(vec.name)
    return layer_profile(lm, vec, persona.positive, persona.negative, layers=layers)


def _profile_plot(vecs: list[SteeringVector], profiles: dict[str, list[LayerProfileRow]], path: Path) -> Path:
    from .glass_plots import layer_profile_plot

    if len(vecs) == 1:
        return layer_profile_plot(profiles[vecs[0].name], path, title=vecs[0].name, active=vecs[0].active_layers)
    first = None
    for v in vecs:
        p = layer_profile_plot(profiles[v.name], path.with_name(f"{path.stem}_{v.name}{path.suffix}"),
                               title=v.name, active=v.active_layers)
        first = first or p
    return first  # type: ignore[return-value]


@click.command("doctor")
@click.argument("personas", nargs=-1, required=True)
@click.option("--layer", "--layers", "layer_spec", cls=AliasedOption,
              default=None, help="Layers to examine (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per persona (one per line).")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write <name>_doctor.png (AUC, consistency, neighbour cosine per layer) to this folder.")
@click.option("--all-layers", is_flag=True, help="Print the table for every layer, not only a summary.")
@model_options
def doctor_cmd(personas: tuple[str, ...], layer_spec: str | None, as_json: bool, plot_dir: Path | None,
               all_layers: bool, model_id: str | None, device: str, dtype: str) -> None:
    """Grade contrast sets (persona names or .toml paths) before generating anything.

    \b
    Forward passes only. Per layer: held-out separability (AUC), pair consistency (cosine of
    each pair's difference to the others' mean), pairs pointing the other way, bootstrap
    stability; and text confounds (length, questions, openings, template words). One grade
    A-F at the persona's default layers, with advice such as "drop pairs 7 and 19".
      steerlab doctor tabby_cats
      steerlab doctor ./mine.toml --json
    """
    from .doctor import doctor_persona
    from .personas import get_persona

    chosen = [get_persona(p) for p in personas]
    lm = load_lm(model_id, device, dtype)
    layers = _layers(layer_spec, lm)
    for persona in chosen:
        diag = doctor_persona(lm, persona, layers=layers)
        if plot_dir is not None:
            diag.facts["plot"] = str(_doctor_plot(diag, plot_dir / f"{persona.name}_doctor.png"))
        if as_json:
            click.echo(json.dumps(diag.to_dict(), ensure_ascii=False))
            continue
        _print_diagnosis(diag, all_layers=all_layers)


def _doctor_plot(diag: Diagnosis, path: Path) -> Path:
    from .anatomy import LayerProfileRow
    from .glass_plots import layer_profile_plot

    rows = [LayerProfileRow(h.layer, h.auc, float("nan"), None) for h in diag.layers]
    return layer_profile_plot(rows, path, title=f"{diag.name}: grade {diag.grade}", active=diag.grade_layers,
                              consistency={h.layer: h.consistency for h in diag.layers})


def _print_diagnosis(diag: Diagnosis, *, all_layers: bool) -> None:
    f = diag.facts
    click.echo(click.style(f"{diag.name}: grade {diag.grade}", bold=True)
               + f" ({diag.score:.0f}/100, {diag.n_pairs} pairs, "
               f"graded at layers {','.join(map(str, diag.grade_layers))})")
    click.echo(f"  held-out AUC {f['auc']:.3f} | pair consistency {f['consistency']:.3f} | "
               f"bootstrap stability {f['stability']:.3f} | pairs against {len(diag.outliers)} | "
               f"best layer {f['best_layer']} (AUC {f['best_auc']:.3f})")
    click.echo(f"  tokens per text {f['tokens_positive']} vs {f['tokens_negative']}; questions "
               f"{f['questions_positive']:.0%} vs {f['questions_negative']:.0%}")
    shown = diag.layers if all_layers else [h for h in diag.layers if h.layer in diag.grade_layers]
    click.echo("  layer   AUC   consistency  against  stability"
               + ("" if all_layers else "  (graded layers; --all-layers)"))
    for h in shown:
        click.echo(f"  {h.layer:>5}  {h.auc:.3f}     {h.consistency:.3f}     {h.against:>4}     {h.stability:.3f}")
    for o in diag.outliers:
        where = f"line {o.line}" if o.line else "line unknown"
        click.echo(f"  pair {o.pair} ({where}) points the other way (cos {o.cosine:+.2f}): {o.positive[:70]!r}")
    click.echo("  advice:")
    for a in diag.advice:
        click.echo(f"   - {a}")
    if "plot" in f:
        click.echo(f"  wrote {f['plot']}")


@click.command("similar")
@click.argument("names", nargs=-1, required=True)
@click.option("--layer", "--layers", "layer_spec", cls=AliasedOption, default=None,
              help="Compare at these layers only (default: all shared).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("similar.png"),
              show_default=True, help="Where to write the figure.")
@click.option("--no-plot", is_flag=True, help="Do not write a figure.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@vectors_option
def similar_cmd(names: tuple[str, ...], layer_spec: str | None, plot_path: Path, no_plot: bool, as_json: bool,
                vectors_dir: Path | None) -> None:
    """Cosine similarity of vectors NAMES per shared layer (no model needed).

      steerlab similar weeknd toronto tabby_cats
    """
    from .anatomy import similarity
    from .interop_command import _load_vector
    from .layers import parse_layers

    vecs = [_load_vector(n, vectors_dir) for n in names]
    layers = parse_layers(layer_spec, max(max(v.layers) for v in vecs) + 1) if layer_spec else None
    sim = similarity(vecs, layers=layers)
    out = sim.to_dict()
    if not no_plot:
        from .glass_plots import similarity_plot

        out["plot"] = str(similarity_plot(sim, plot_path, title="cosine of directions"))
    if as_json:
        click.echo(json.dumps(out))
        return
    pairs = sim.pairs()
    idx = {n: i for i, n in enumerate(sim.names)}
    width = max(12, *(len(a) + len(b) + 3 for a, b in pairs)) + 2
    click.echo("layer  " + "".join(f"{a + ' / ' + b:>{width}}" for a, b in pairs))
    for x in sim.layers:
        m = sim.per_layer[x]
        click.echo(f"{x:>5}  " + "".join(f"{float(m[idx[a], idx[b]]):>{width}.3f}" for a, b in pairs))
    click.echo(f"\nmean over {len(sim.layers)} shared layers:")
    w = max(len(n) for n in sim.names) + 2
    click.echo(" " * w + "".join(f"{n:>{w}}" for n in sim.names))
    for i, n in enumerate(sim.names):
        click.echo(f"{n:<{w}}" + "".join(f"{float(v):>{w}.3f}" for v in sim.mean[i]))
    if "plot" in out:
        click.echo(f"wrote {out['plot']}")


def print_details(vecs: dict[str, SteeringVector], *, top: int = 6) -> None:
    """``steerlab list --details``: the logit lens of each vector at its active layers."""
    import os

    from .lens import lens_layers, logit_lens

    if not vecs:
        return
    lm = load_lm(os.environ.get("STEERLAB_MODEL"), os.environ.get("STEERLAB_DEVICE", "auto"), "auto")
    for name, v in vecs.items():
        if v.model_id != lm.model_id or v.hidden_size != lm.hidden_size:
            click.echo(f"  {name}: built for {v.model_id}; set STEERLAB_MODEL to read its lens")
            continue
        use = lens_layers(v)
        click.echo(f"  {name}: logit lens at layers {','.join(map(str, use))} (+ promotes, - suppresses)")
        for line in _lens_lines(logit_lens(lm, v, layers=use, k=top)):
            click.echo("  " + line)
