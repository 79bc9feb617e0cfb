"""steerlab command line: build vectors, generate and compare, serve the studio.

\b
Quick start (after `source .venv/bin/activate`, or as .venv/bin/steerlab):
    steerlab build                          # built-in personas -> vectors folder, dose windows measured
    steerlab generate "Plan my weekend" --steer tabby_cats --dose 0.8
    steerlab compare "Plan my weekend" --steer weeknd:dose=0.5 --steer toronto:dose=0.5
    steerlab list                           # vectors and their metadata
    steerlab serve                          # web studio on http://127.0.0.1:5050

Errors are one line on stderr and a non-zero exit; --debug shows tracebacks.
`steerlab COMMAND -h` shows a command's options.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .defaults import REPETITION_PENALTY
from .errors import SteeringError
from .options import AliasedOption, F, load_lm, model_options, open_store, vectors_option

if TYPE_CHECKING:
    from .generate import GenerationOptions
    from .models import LoadedModel
    from .spec import Steer
    from .store import VectorStore
    from .vectors import SteeringVector


class _Group(click.Group):
    """Turns SteeringError into one clean line (traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SteeringError as exc:
            if ctx.meta.get("steerlab.debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="steerlab")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    ctx.meta["steerlab.debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s")
    if not debug:  # weight-loading bars and warnings are noise at the command line
        _quiet_transformers()


def _quiet_transformers() -> None:
    """transformers' warnings and weight-loading bars off, without importing it (~1 s) when it is not loaded yet."""
    import os

    if "transformers" in sys.modules:  # e.g. tests calling the CLI in-process
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    else:  # both are read when transformers loads
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# ---- shared options ------------------------------------------------------------------------
def generation_options(f: F) -> F:
    opts = [
        click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 4096),
                     help="Tokens to generate."),
        click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 5),
                     help="0 = greedy (deterministic)."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1), help="Nucleus sampling."),
        click.option("--seed", default=None, type=int, help="Random seed for sampling."),
        click.option("--repetition-penalty", default=REPETITION_PENALTY, show_default=True, type=click.FloatRange(1, 3),
                     help="Discourages loops, which small models fall into under greedy decoding."),
        click.option("--raw", is_flag=True, help="Raw completion: do not apply the chat template."),
        click.option("--steer", "steers", multiple=True, metavar="NAME[:dose=D]",
                     help="Vector to apply (repeatable): NAME, NAME:dose=0.5, NAME:0.3 (a strength) or "
                          "NAME:dose=0.5:op=target:governor=on."),
        click.option("--dose", default=None, type=click.FloatRange(-3, 3),
                     help="Dose for every --steer without one: 0 = none, 1 = the strongest setting measured fluent "
                          "(default: the vector's, 0.7 once calibrated)."),
        click.option("--strength", default=None, type=float,
                     help="Strength for every --steer without a dose, in residual-norm units per layer."),
        click.option("--scale", default=None, type=float,
                     help="Absolute scale on the unit direction instead of --strength (the seed's STRENGTH)."),
        click.option("--layer", "--layers", "layer_spec", cls=AliasedOption, default=None,
                     help="Apply at these layers instead of the vector's defaults: 12, 10,12,14 or 8:16:2."),
        click.option("--operator", type=click.Choice(["add", "add_norm", "target", "cap", "rotate"]), default=None,
                     help="How to steer (default: the vector's, else add); formulas in docs/dose.md."),
        click.option("--governor/--no-governor", default=None,
                     help="Lower a row's steering while its text breaks (default: the vector's)."),
        click.option("--positions", default=None, metavar="all|generated|from:N",
                     help="Steer every position (all, the default), only generated tokens, or positions >= N."),
        click.option("--norm-preserve", is_flag=True, help="Same as --operator add_norm."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


_STEER_KEYS = {"dose": "dose", "strength": "strength", "s": "strength", "scale": "scale", "op": "operator",
               "operator": "operator", "positions": "positions", "governor": "governor"}
_STEER_HELP = "use NAME, NAME:STRENGTH or NAME:dose=0.5[:op=add|add_norm|target|cap|rotate][:governor=on|off]"


def parse_steer(spec: str) -> tuple[str, dict]:
    """``name``, ``name:strength`` or ``name:key=value[:key=value...]``.

    Keys: dose, strength, scale, op, positions, governor."""
    name, *parts = spec.split(":")
    fields: dict = {}
    try:
        for part in parts:
            key, eq, value = part.partition("=")
            if not eq:
                fields["strength"] = float(key)
                continue
            field = _STEER_KEYS[key.strip().lower()]
            if field in ("dose", "strength", "scale"):
                fields[field] = float(value)
            elif field == "governor":
                fields[field] = value.strip().lower() in ("1", "on", "true", "yes")
            elif field == "positions":
                from .spec import parse_positions

                fields[field] = parse_positions(value)
            else:
                fields[field] = value.strip()
    except (ValueError, KeyError, SteeringError):
        raise click.BadParameter(f"{spec!r}: {_STEER_HELP}, e.g. weeknd:dose=0.5", param_hint="--steer") from None
    if not name:
        raise click.BadParameter(f"{spec!r}: {_STEER_HELP}", param_hint="--steer")
    return name, fields


def _steering(lm: LoadedModel, store: VectorStore, kw: dict[str, Any]) -> list:
    """--steer entries as Steer specs: each entry's own fields > --dose/--strength/--scale and friends."""
    from .layers import parse_layers
    from .spec import Steer, parse_positions

    if not kw["steers"]:
        raise click.UsageError("give at least one --steer NAME (see `steerlab list`)")
    layers = tuple(parse_layers(kw["layer_spec"], lm.n_layers)) if kw["layer_spec"] else None
    shared = {k: kw[k] for k in ("dose", "strength", "scale") if kw.get(k) is not None}
    if len(shared) > 1:
        given = " and ".join("--" + k for k in shared)
        raise click.UsageError(f"give one of --dose, --strength or --scale, not {given}")
    out = []
    for spec in kw["steers"]:
        name, fields = parse_steer(spec)
        if not any(k in fields for k in ("dose", "strength", "scale")):
            fields |= shared
        fields.setdefault("operator", kw.get("operator"))
        if kw.get("governor") is not None:
            fields.setdefault("governor", kw["governor"])
        if kw.get("positions") is not None:
            fields.setdefault("positions", parse_positions(kw["positions"]))
        out.append(Steer(store.get(name), layers=layers, **fields))
    return out


def _options(kw: dict[str, Any]) -> GenerationOptions:
    from .generate import GenerationOptions

    return GenerationOptions(
        max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"], top_p=kw["top_p"], seed=kw["seed"],
        chat=False if kw["raw"] else None, norm_preserve=kw["norm_preserve"],
        repetition_penalty=kw["repetition_penalty"],
    )


def _describe(steering: list[Steer], lm: LoadedModel) -> str:
    from .spec import resolve

    parts = []
    for st in steering:
        r = resolve(st, lm.n_layers).describe()
        amount = f"dose {r['dose']} = strength {r['strength']:.3g}" if "dose" in r else \
            f"scale {r['scale']}" if "scale" in r else f"strength {r['strength']:.3g}"
        extra = (", governor" if r["governor"] else "") + (f"; {r['note']}" if "note" in r else "")
        parts.append(f"{r['vector']} ({r['operator']}, {amount}, layers {','.join(map(str, r['layers']))}{extra})")
    return " + ".join(parts)


# ---- commands ------------------------------------------------------------------------------
@main.command()
@click.argument("personas", nargs=-1)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write vectors to (default: the vectors folder). Env: STEERLAB_VECTORS.")
@click.option("--layer", "--layers", "layer_spec", cls=AliasedOption, default="all", show_default=True,
              help="Layers to compute directions at: all, 12, 10,12,14 or 4:24:2.")
@click.option("--method", type=click.Choice(["mean_diff", "pca", "probe", "optimize"]), default=None,
              help="Direction estimator (default: the persona's, else mean_diff); optimize trains the mean "
                   "difference by gradient (a few minutes on a CPU; docs/dose.md).")
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
          pair: tuple[str, str] | None, contrast: Path | None, positive_file: Path | None, negative_file: Path | None,
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
            vec = build_persona(lm, persona, layers=None if layer_spec == "all" else layers, batch_size=batch_size,
                                max_length=max_length, **overrides)
            click.echo(f"{persona.name}: built ({vec.method}, pooling {vec.pooling})")
            if do_calibrate:
                vec = _calibrate(lm, vec)
            store.add(vec, overwrite=True)
        d = vec.active_layers
        click.echo(f"  shape [{vec.hidden_size}] x {len(vec.layers)} layers, default layers {d}, "
                   f"direction norm {float(vec.directions[d[0]].norm()):.4f}, "
                   f"residual norm {vec.norms[d[0]]:.1f}, default strength {vec.default_strength}")
        base, steered = compare(lm, demo_prompt, [vec], options=GenerationOptions(max_new_tokens=40))
        click.echo(f"  base:    {_snip(base)}")
        click.echo(f"  steered: {_snip(steered)}")
        click.echo(f"  {'saved:  ' if built else 'kept:   '} {path}")


def _calibrate(lm: LoadedModel, vec: SteeringVector) -> SteeringVector:
    from .calibrate import calibrated, describe_window

    click.echo(f"  measuring the dose window of {vec.name} ...")
    vec, windows = calibrated(lm, vec)
    for w in windows:
        click.echo(f"  {describe_window(w)}")
    return vec


@main.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--operator", "operators", default=None, metavar="OP[,OP...]|all",
              help="Operators to measure: add, add_norm, target, cap, rotate, or all (default: the vector's).")
@click.option("--layer", "--layers", "layer_spec", cls=AliasedOption, default=None,
              help="Layers to measure at (default: the vector's default layers).")
@click.option("--governor/--no-governor", default=None,
              help="Measure with the coherence governor (default: the vector's).")
@click.option("--default", "make_default", is_flag=True,
              help="Make the widest measured window's operator the vector's default.")
@vectors_option
@model_options
def calibrate(names: tuple[str, ...], operators: str | None, layer_spec: str | None, governor: bool | None,
              make_default: bool, vectors_dir: Path | None, model_id: str | None, device: str, dtype: str) -> None:
    """Measure (again) the dose window of vectors NAMES: onset, breakdown and dose 1.

    Generates greedy replies to 4 neutral prompts at a ladder of strengths in one batch and
    scores them with the sweep's concept and fluency components (docs/dose.md).
    """
    from .layers import parse_layers
    from .spec import OPERATORS

    ops = None if operators is None else list(OPERATORS) if operators == "all" else operators.split(",")
    bad = [o for o in ops or [] if o not in OPERATORS]
    if bad:
        raise click.BadParameter(f"unknown operator(s) {', '.join(bad)}: use {', '.join(OPERATORS)} or all",
                                 param_hint="--operator")
    lm = load_lm(model_id, device, dtype)
    store = open_store(lm, vectors_dir)
    for name in names:
        vec = store.get(name)
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


@main.command()
@click.argument("prompt")
@generation_options
@vectors_option
@model_options
def generate(prompt: str, vectors_dir: Path | None, model_id: str | None, device: str, dtype: str, **kw: Any) -> None:
    """Generate a completion of PROMPT, steered by --steer vectors (none: base model)."""
    lm = load_lm(model_id, device, dtype)  # first: it says "loading ..." when that is slow
    from .generate import generate as run, stream

    steering = _steering(lm, open_store(lm, vectors_dir), kw) if kw["steers"] else []
    if steering:
        click.echo(f"# steering: {_describe(steering, lm)}", err=True)
    if sys.stdout.isatty():  # a person watching: show tokens as they come
        for _row, delta in stream(lm, [prompt], [steering], options=_options(kw)):
            click.echo(delta, nl=False)
        click.echo()
    else:
        click.echo(run(lm, prompt, steering, options=_options(kw))[0])


@main.command()
@click.argument("prompt")
@generation_options
@vectors_option
@model_options
def compare(prompt: str, vectors_dir: Path | None, model_id: str | None, device: str, dtype: str, **kw: Any) -> None:
    """Base vs steered completion of PROMPT, generated together in one batch."""
    lm = load_lm(model_id, device, dtype)  # first: it says "loading ..." when that is slow
    from .generate import compare as run

    steering = _steering(lm, open_store(lm, vectors_dir), kw)
    base, steered = run(lm, prompt, steering, options=_options(kw))
    click.echo(click.style("=== base ===", bold=True))
    click.echo(base)
    click.echo(click.style(f"=== steered: {_describe(steering, lm)} ===", bold=True))
    click.echo(steered)


@main.command("list")
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

if __name__ == "__main__":  # python -m steerlab.cli (python -m steerlab also works)
    main()
