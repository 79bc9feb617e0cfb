"""``steerlab build``, ``steerlab calibrate`` and ``steerlab list``: make, measure and show the vectors folder.

``build`` of personas is here; ``build --pair/--contrast/--positive`` is
:func:`steerlab.interop_command.build_custom`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .options import AliasedOption, load_lm, model_options, open_store, vectors_option

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from .models import LoadedModel
    from .vectors import SteeringVector


@click.command()
@click.argument("personas", nargs=-1)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write vectors to (default: the vectors folder). Env: STEERLAB_VECTORS.")
@click.option("--layer", "--layers", "layer_spec", cls=AliasedOption, default="all", show_default=True,
              help="Layers to compute directions at: all, 12, 10,12,14 or 4:24:2.")
@click.option("--method", type=click.Choice(["mean_diff", "mean_centred", "pca", "probe", "optimize"]), default=None,
              help="Direction estimator (default: the persona's, else mean_diff); mean_centred also centres on "
                   "the model's own replies, optimize trains the mean difference by gradient (docs/dose.md).")
@click.option("--pooling", default=None, help="mean (default), last or window:K.")
@click.option("--chat/--plain", "chat", default=None, help="Render contrast texts as assistant replies.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option("--max-length", default=256, show_default=True, type=click.IntRange(8, 32768),
              help="Truncate contrast texts to this many tokens.")
@click.option("--prompt", "demo_prompt", default="The future of technology is", show_default=True,
              help="Prompt for the base-vs-steered snippet.")
@click.option("--force", is_flag=True, help="Rebuild even if the vector exists.")
@click.option("--calibrate/--no-calibrate", "do_calibrate", default=True, show_default=True,
              help="Measure the dose window of each new vector (about 20-40 s on a laptop CPU).")
@click.option("--doctor/--no-doctor", "do_doctor", default=True, show_default=True,
              help="Grade each new vector's contrast set at its layers and print the advice (steerlab doctor).")
@click.option("--pair", nargs=2, default=None, metavar="POSITIVE NEGATIVE",
              help="Quick vector from one prompt pair, ActAdd-style (e.g. --pair Love Hate); with --name.")
@click.option("--contrast", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Contrast file: JSONL of {positive, negative} or CSV/TSV with those columns; with --name.")
@click.option("--positive", "positive_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Text file, one positive text per line (with --negative and --name).")
@click.option("--negative", "negative_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Text file, one negative text per line (with --positive and --name).")
@click.option("--name", default=None, help="Name of the vector built from --pair, --contrast or --positive/--negative.")
@model_options
def build(personas: tuple[str, ...], out_dir: Path | None, layer_spec: str, method: str | None, pooling: str | None,
          chat: bool | None, batch_size: int, max_length: int, demo_prompt: str, force: bool, do_calibrate: bool,
          do_doctor: bool, pair: tuple[str, str] | None, contrast: Path | None, positive_file: Path | None,
          negative_file: Path | None,
          name: str | None, model_id: str | None, device: str, dtype: str) -> None:
    """Build steering vectors from persona contrast sets (default: all built-in personas).

    PERSONAS are names (built-in or in the user personas folder) or paths to .toml files.
    Or one vector from --pair, --contrast FILE or --positive/--negative FILES, named --name.
    """
    if pair or contrast or positive_file or negative_file or name:
        from .interop_command import build_custom

        return build_custom(personas=personas, pair=pair, contrast=contrast, positive=positive_file,
                            negative=negative_file, name=name, out_dir=out_dir, layer_spec=layer_spec, method=method,
                            pooling=pooling, chat=chat, batch_size=batch_size, max_length=max_length,
                            demo_prompt=demo_prompt, force=force, model_id=model_id, device=device, dtype=dtype)
    from .generate import GenerationOptions, compare
    from .layers import parse_layers
    from .personas import build_persona, builtin_names, get_persona

    chosen = [get_persona(name) for name in personas or builtin_names()]  # fail fast, before loading
    lm = load_lm(model_id, device, dtype, announce=True)
    store = open_store(lm, out_dir)
    click.echo(f"model: {lm.model_id} on {lm.device} ({lm.dtype}), {lm.n_layers} layers, hidden {lm.hidden_size}")
    click.echo(f"vectors folder: {store.folder}")
    layers = parse_layers(layer_spec, lm.n_layers)
    overrides: dict[str, Any] = {k: v for k, v in dict(method=method, pooling=pooling, chat=chat).items()
                                 if v is not None}
    for i, persona in enumerate(chosen, 1):
        path = store.folder / (persona.name + ".safetensors")
        built = not (persona.name in store.vectors and not force)
        if not built:
            vec = store.vectors[persona.name]
            click.echo(f"\n{persona.name}: exists already (use --force to rebuild)")
        else:
            click.echo(f"\nbuilding {persona.name} ({i}/{len(chosen)}) from {len(persona.positive)} pairs...")
            pooled: list[tuple[dict, dict]] = []  # the build's activations, for the doctor (no second pass)
            vec = build_persona(lm, persona, layers=None if layer_spec == "all" else layers, batch_size=batch_size,
                                max_length=max_length, on_pooled=_keep(pooled), **overrides)
            click.echo(f"{persona.name}: built ({vec.method}, pooling {vec.pooling})")
            if do_doctor:
                from .doctor import as_built, checkup, checkup_lines

                report = checkup(lm, as_built(persona, vec), vec.active_layers, pooled=pooled[-1])
                click.echo("\n".join("  " + x for x in checkup_lines(report)))
            if do_calibrate:
                vec = _calibrate(lm, vec, store.vectors.values())
            store.add(vec, overwrite=True)
        d = vec.active_layers
        click.echo(f"  shape [{vec.hidden_size}] x {len(vec.layers)} layers, default layers {d}, "
                   f"direction norm {float(vec.directions[d[0]].norm()):.4f}, "
                   f"residual norm {vec.norms[d[0]]:.1f}, default strength {vec.default_strength}")
        base, steered = compare(lm, demo_prompt, [vec], options=GenerationOptions(max_new_tokens=40))
        click.echo(f"  base:    {_snip(base)}")
        click.echo(f"  steered: {_snip(steered)}")
        click.echo(f"  {'saved:  ' if built else 'kept:   '} {path}")


def _keep(into: list) -> Callable[[dict, dict], None]:
    """An ``on_pooled`` callback that keeps the build's pooled activations in ``into``."""
    return lambda pos, neg: into.append((pos, neg))


def _calibrate(lm: LoadedModel, vec: SteeringVector, others: Iterable[SteeringVector]) -> SteeringVector:
    from .calibrate import calibrated, describe_window, with_known_entropy

    click.echo(f"  measuring the dose window of {vec.name} ...")
    vec, windows = calibrated(lm, with_known_entropy(vec, others))
    for w in windows:
        click.echo(f"  {describe_window(w)}")
    return vec


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--operator", "operators", default=None, metavar="OP[,OP...]|all",
              help="Operators to measure: add, add_norm, target, cap, rotate, or all (default: the vector's).")
@click.option("--layer", "--layers", "layer_spec", cls=AliasedOption, default=None,
              help="Layers to measure at (default: the vector's default layers).")
@click.option("--governor/--no-governor", default=None,
              help="Measure with the coherence governor (default: the vector's).")
@click.option("--positions", default=None, metavar="all|prompt|generated|from:N",
              help="Measure steering these positions and make them the vector's default (default: the vector's).")
@click.option("--default", "make_default", is_flag=True,
              help="Make the widest measured window's operator the vector's default.")
@vectors_option
@model_options
def calibrate(names: tuple[str, ...], operators: str | None, layer_spec: str | None, governor: bool | None,
              positions: str | None, make_default: bool, vectors_dir: Path | None, model_id: str | None, device: str,
              dtype: str) -> None:
    """Measure (again) the dose window of vectors NAMES: onset, breakdown and dose 1.

    Generates greedy replies to 4 neutral prompts at a ladder of strengths in one batch and
    scores them with the sweep's concept and fluency components (docs/dose.md).
    """
    from .layers import parse_layers
    from .spec import OPERATORS, parse_positions

    ops = None if operators is None else list(OPERATORS) if operators == "all" else operators.split(",")
    bad = [o for o in ops or [] if o not in OPERATORS]
    if bad:
        raise click.BadParameter(f"unknown operator(s) {', '.join(bad)}: use {', '.join(OPERATORS)} or all",
                                 param_hint="--operator")
    where = None if positions is None else parse_positions(positions)
    lm = load_lm(model_id, device, dtype)
    store = open_store(lm, vectors_dir)
    for name in names:
        vec = store.get(name)
        if where is not None:  # a window is measured where the vector steers: these become its default positions
            vec = vec.with_defaults(positions=where)
        layers = parse_layers(layer_spec, lm.n_layers) if layer_spec else None
        from .calibrate import calibrated, describe_window

        click.echo(f"{name}: measuring ...")
        vec, windows = calibrated(lm, vec, operators=ops, layers=layers, governor=governor)
        for w in windows:
            click.echo(f"  {describe_window(w)}")
        if make_default:
            best = max(windows, key=lambda w: (w.width or 0, w.max_strength))
            vec = vec.with_defaults(operator=best.operator, governor=best.governor)
            click.echo(f"  default operator: {best.operator}{' + governor' if best.governor else ''}")
        store.update(name, vec)
        click.echo(f"  saved: {store.folder / (name + '.safetensors')}")


def _snip(text: str, width: int = 100) -> str:
    return textwrap.shorten(" ".join(text.split()), width=width, placeholder=" ...")


@click.command("list")
@vectors_option
@click.option("--details", is_flag=True, help="Also show each vector's logit lens (loads the model).")
def list_(vectors_dir: Path | None, details: bool) -> None:
    """List built vectors (with metadata) and personas available to build."""
    from .paths import default_vectors_dir
    from .personas import available_personas
    from .store import load_vectors

    folder = vectors_dir or default_vectors_dir()
    click.echo(f"vectors folder: {folder}")
    vecs = load_vectors(folder, on_error=lambda p, e: click.echo(f"  skipped {p.name}: {e}", err=True))
    if not vecs:
        click.echo("  (no vectors yet: run `steerlab build`)")
    for name, v in vecs.items():
        layers = f"{v.layers[0]}..{v.layers[-1]}" if len(v.layers) > 3 else ",".join(map(str, v.layers))
        click.echo(f"  {name:<16} model={v.model_id} layers={layers} default_layers={list(v.active_layers)} "
                   f"strength={v.default_strength} method={v.method} pooling={v.pooling} created={v.created_at}")
    if details:
        from .glass_command import print_details

        print_details(vecs)
    missing = [p for p in available_personas() if p not in vecs]
    if missing:
        click.echo(f"personas not built yet: {', '.join(missing)}")
    if vectors_dir is None and folder.is_dir():  # other models' vectors live in subfolders
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.safetensors"))):
            click.echo(f"other model's vectors: {sub} ({len(list(sub.glob('*.safetensors')))}; "
                       f"steerlab list --vectors {sub})")
