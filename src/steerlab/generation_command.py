"""``steerlab generate`` and ``steerlab compare``, and the options they share: ``--steer`` entries
(``NAME[:dose=D][:op=...]``), ``--dose``/``--strength``/``--scale`` and the sampling settings.

Turns those options into :class:`~steerlab.spec.Steer` entries and
:class:`~steerlab.generate.GenerationOptions`; the library does the rest.
"""

from __future__ import annotations

import sys
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


def steering_entries(lm: LoadedModel, store: VectorStore, kw: dict[str, Any]) -> list:
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



def prompt_command(f: F) -> click.Command:
    """A command on one PROMPT with the generation, vectors and model options (generate, compare)."""
    return click.command()(click.argument("prompt")(generation_options(vectors_option(model_options(f)))))


@prompt_command
def generate(prompt: str, vectors_dir: Path | None, model_id: str | None, device: str, dtype: str, **kw: Any) -> None:
    """Generate a completion of PROMPT, steered by --steer vectors (none: base model)."""
    lm = load_lm(model_id, device, dtype)  # first: it says "loading ..." when that is slow
    from .generate import generate as run, stream

    steering = steering_entries(lm, open_store(lm, vectors_dir), kw) if kw["steers"] else []
    if steering:
        click.echo(f"# steering: {_describe(steering, lm)}", err=True)
    if sys.stdout.isatty():  # a person watching: show tokens as they come
        for _row, delta in stream(lm, [prompt], [steering], options=_options(kw)):
            click.echo(delta, nl=False)
        click.echo()
    else:
        click.echo(run(lm, prompt, steering, options=_options(kw))[0])


@prompt_command
def compare(prompt: str, vectors_dir: Path | None, model_id: str | None, device: str, dtype: str, **kw: Any) -> None:
    """Base vs steered completion of PROMPT, generated together in one batch."""
    lm = load_lm(model_id, device, dtype)  # first: it says "loading ..." when that is slow
    from .generate import compare as run

    steering = steering_entries(lm, open_store(lm, vectors_dir), kw)
    base, steered = run(lm, prompt, steering, options=_options(kw))
    click.echo(click.style("=== base ===", bold=True))
    click.echo(base)
    click.echo(click.style(f"=== steered: {_describe(steering, lm)} ===", bold=True))
    click.echo(steered)
