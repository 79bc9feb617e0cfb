"""steerlab command line: build vectors, generate and compare, serve the studio.

Quick start::

    steerlab build                                   # built-in personas -> vectors folder
    steerlab generate "The future of technology is" --steer tabby_cats
    steerlab compare "Climate change is affecting" --steer toronto:0.6
    steerlab list
    steerlab serve                                   # web studio on http://127.0.0.1:5050

Library errors become one line on stderr and a non-zero exit; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import click

from .errors import SteeringError
from .options import load_lm, model_options, open_store, vectors_option



class _Group(click.Group):
    """Turns SteeringError into one clean line (traceback with --debug)."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201
        try:
            return super().invoke(ctx)
        except SteeringError as exc:
            if ctx.meta.get("steerlab.debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, help=__doc__)
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="steerlab")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    ctx.meta["steerlab.debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s")
    if not debug:  # weight-loading bars and warnings are noise at the command line
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


# ---- shared options ------------------------------------------------------------------------
def generation_options(f):  # noqa: ANN001, ANN201
    opts = [
        click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096),
                     help="Tokens to generate."),
        click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 5),
                     help="0 = greedy (deterministic)."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1), help="Nucleus sampling."),
        click.option("--seed", default=None, type=int, help="Random seed for sampling."),
        click.option("--repetition-penalty", default=1.2, show_default=True, type=click.FloatRange(1, 3),
                     help="Discourages loops, which small models fall into under greedy decoding."),
        click.option("--raw", is_flag=True, help="Raw completion: do not apply the chat template."),
        click.option("--steer", "steers", multiple=True, metavar="NAME[:STRENGTH]",
                     help="Vector to apply (repeatable, e.g. --steer weeknd:0.5 --steer toronto:0.2)."),
        click.option("--strength", default=None, type=float,
                     help="Strength for every --steer without one, in residual-norm units (default: the vector's)."),
        click.option("--scale", default=None, type=float,
                     help="Absolute scale on the unit direction instead of --strength (the seed's STRENGTH)."),
        click.option("--layer", "layer_spec", default=None,
                     help="Apply at these layers instead of the vector's defaults: 12, 10,12,14 or 8:16:2."),
        click.option("--positions", type=click.Choice(["all", "generated"]), default=None,
                     help="Steer every position (all, the default) or only generated tokens."),
        click.option("--norm-preserve", is_flag=True, help="Rescale steered hidden states to their original norm."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def parse_steer(spec: str) -> tuple[str, float | None]:
    """``name`` or ``name:strength``."""
    name, _, strength = spec.partition(":")
    if not strength:
        return name, None
    try:
        return name, float(strength)
    except ValueError:
        raise click.BadParameter(f"{spec!r}: use NAME or NAME:STRENGTH, e.g. weeknd:0.5", param_hint="--steer") from None


def _steering(lm, store, steers, strength, scale, layer_spec):  # noqa: ANN001, ANN202
    from .hooks import Steer
    from .layers import parse_layers

    if not steers:
        raise click.UsageError("give at least one --steer NAME (see `steerlab list`)")
    layers = tuple(parse_layers(layer_spec, lm.n_layers)) if layer_spec else None
    out = []
    for spec in steers:
        name, s = parse_steer(spec)
        vec = store.get(name)
        out.append(Steer(vec, strength=s if s is not None else (None if scale is not None else strength),
                         scale=scale if s is None else None, layers=layers))
    return out


def _options(kw: dict, steering=None):  # noqa: ANN001, ANN202
    from .generate import GenerationOptions

    positions = kw["positions"]
    if positions is None and steering:
        positions = steering[0].vector.extra.get("positions", "all")
    return GenerationOptions(
        max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"], top_p=kw["top_p"], seed=kw["seed"],
        chat=False if kw["raw"] else None, positions=positions or "all", norm_preserve=kw["norm_preserve"],
        repetition_penalty=kw["repetition_penalty"],
    )


def _describe(steering) -> str:  # noqa: ANN001
    parts = []
    for st in steering:
        dose = f"scale {st.scale}" if st.scale is not None else f"strength {st.strength if st.strength is not None else st.vector.default_strength}"
        layers = st.layers or tuple(st.vector.active_layers)
        parts.append(f"{st.vector.name} ({dose}, layers {','.join(map(str, layers))})")
    return " + ".join(parts)


# ---- commands ------------------------------------------------------------------------------
@main.command()
@click.argument("personas", nargs=-1)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write vectors to (default: the vectors folder). Env: STEERLAB_VECTORS.")
@click.option("--layer", "layer_spec", default="all", show_default=True,
              help="Layers to compute directions at: all, 12, 10,12,14 or 4:24:2.")
@click.option("--method", type=click.Choice(["mean_diff", "pca", "probe"]), default=None,
              help="Direction estimator (default: the persona's, else mean_diff).")
@click.option("--pooling", default=None, help="mean (default), last or window:K.")
@click.option("--chat/--plain", "chat", default=None, help="Render contrast texts as assistant replies.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option("--max-length", default=256, show_default=True, type=click.IntRange(8, 32768),
              help="Truncate contrast texts to this many tokens.")
@click.option("--prompt", "demo_prompt", default="The future of technology is", show_default=True,
              help="Prompt for the base-vs-steered snippet.")
@click.option("--force", is_flag=True, help="Rebuild even if the vector exists.")
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
def build(personas, out_dir, layer_spec, method, pooling, chat, batch_size, max_length, demo_prompt, force,
          pair, contrast, positive_file, negative_file, name, model_id, device, dtype) -> None:  # noqa: ANN001
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
    lm = load_lm(model_id, device, dtype)
    store = open_store(lm, out_dir)
    click.echo(f"model: {lm.model_id} on {lm.device} ({lm.dtype}), {lm.n_layers} layers, hidden {lm.hidden_size}")
    click.echo(f"vectors folder: {store.folder}")
    layers = parse_layers(layer_spec, lm.n_layers)
    overrides = {k: v for k, v in dict(method=method, pooling=pooling, chat=chat).items() if v is not None}
    for persona in chosen:
        if persona.name in store.vectors and not force:
            vec = store.vectors[persona.name]
            click.echo(f"\n{persona.name}: exists already (use --force to rebuild)")
        else:
            vec = build_persona(lm, persona, layers=None if layer_spec == "all" else layers, batch_size=batch_size,
                                max_length=max_length, **overrides)
            store.add(vec, overwrite=True)
            click.echo(f"\n{persona.name}: built from {len(persona.positive)} pairs ({vec.method}, pooling {vec.pooling})")
        d = vec.active_layers
        click.echo(f"  shape [{vec.hidden_size}] x {len(vec.layers)} layers, default layers {d}, "
                   f"direction norm {float(vec.directions[d[0]].norm()):.4f}, "
                   f"residual norm {vec.norms[d[0]]:.1f}, default strength {vec.default_strength}")
        base, steered = compare(lm, demo_prompt, [vec], options=GenerationOptions(max_new_tokens=40))
        click.echo(f"  base:    {_snip(base)}")
        click.echo(f"  steered: {_snip(steered)}")
        click.echo(f"  saved:   {store.folder / (persona.name + '.safetensors')}")


def _snip(text: str, width: int = 100) -> str:
    return textwrap.shorten(" ".join(text.split()), width=width, placeholder=" ...")


@main.command()
@click.argument("prompt")
@generation_options
@vectors_option
@model_options
def generate(prompt, vectors_dir, model_id, device, dtype, **kw) -> None:  # noqa: ANN001
    """Generate a completion of PROMPT, steered by --steer vectors (none: base model)."""
    from .generate import generate as run

    lm = load_lm(model_id, device, dtype)
    steering = _steering(lm, open_store(lm, vectors_dir), kw["steers"], kw["strength"], kw["scale"], kw["layer_spec"]) \
        if kw["steers"] else []
    if steering:
        click.echo(f"# steering: {_describe(steering)}", err=True)
    click.echo(run(lm, prompt, steering, options=_options(kw, steering))[0])


@main.command()
@click.argument("prompt")
@generation_options
@vectors_option
@model_options
def compare(prompt, vectors_dir, model_id, device, dtype, **kw) -> None:  # noqa: ANN001
    """Base vs steered completion of PROMPT, generated together in one batch."""
    from .generate import compare as run

    lm = load_lm(model_id, device, dtype)
    steering = _steering(lm, open_store(lm, vectors_dir), kw["steers"], kw["strength"], kw["scale"], kw["layer_spec"])
    base, steered = run(lm, prompt, steering, options=_options(kw, steering))
    click.echo(click.style("=== base ===", bold=True))
    click.echo(base)
    click.echo(click.style(f"=== steered: {_describe(steering)} ===", bold=True))
    click.echo(steered)


@main.command("list")
@vectors_option
@click.option("--details", is_flag=True, help="Also show each vector's logit lens (loads the model).")
def list_(vectors_dir, details) -> None:  # noqa: ANN001
    """List built vectors (with metadata) and personas available to build."""
    from .paths import default_vectors_dir
    from .personas import available_personas, load_vectors

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


# ---- commands from other modules register here ------------------------------------------------

from .sweep_command import sweep  # noqa: E402

main.add_command(sweep)

from .server.command import examples, serve  # noqa: E402

main.add_command(serve)
main.add_command(examples)

from .interop_command import compare_methods_cmd, export_cmd, import_cmd  # noqa: E402

main.add_command(export_cmd)
main.add_command(import_cmd)
main.add_command(compare_methods_cmd)

from .glass_command import doctor_cmd, inspect_cmd, similar_cmd  # noqa: E402

main.add_command(inspect_cmd)
main.add_command(doctor_cmd)
main.add_command(similar_cmd)
