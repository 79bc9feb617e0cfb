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
from .options import (AliasedOption, F, compile_option, load_lm, model_options, open_store, quantize_option,
                      vectors_option)
from .steer_syntax import STEER_HELP, describe_conditions, describe_steering, steering_from_options

if TYPE_CHECKING:
    from .generate import GenerationOptions


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
        click.option("--steer", "steers", multiple=True, metavar="NAME[:dose=D]", help=STEER_HELP),
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
        click.option("--positions", default=None, metavar="all|prompt|generated|from:N",
                     help="Steer every position (all, the default), the prompt only, only generated tokens, or "
                          "positions >= N (docs/dose.md)."),
        click.option("--norm-preserve", is_flag=True, help="Same as --operator add_norm."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _options(kw: dict[str, Any]) -> GenerationOptions:
    from .generate import GenerationOptions

    return GenerationOptions(
        max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"], top_p=kw["top_p"], seed=kw["seed"],
        chat=False if kw["raw"] else None, norm_preserve=kw["norm_preserve"],
        repetition_penalty=kw["repetition_penalty"],
    )


def prompt_command(f: F) -> click.Command:
    """A command on one PROMPT with the generation, vectors and model options (generate, compare)."""
    options = generation_options(vectors_option(compile_option(quantize_option(model_options(f)))))
    return click.command()(click.argument("prompt")(options))


@prompt_command
def generate(prompt: str, vectors_dir: Path | None, model_id: str | None, device: str, dtype: str, **kw: Any) -> None:
    """Generate a completion of PROMPT, steered by --steer vectors (none: base model)."""
    # first: it says "loading ..." when slow
    lm = load_lm(model_id, device, dtype, quantize=kw["quantize"], compile_decode=kw["compile_decode"])
    from .generate import generate as run, stream

    steering = steering_from_options(lm, open_store(lm, vectors_dir), kw) if kw["steers"] else []
    if steering:
        click.echo(f"# steering: {describe_steering(steering, lm)}", err=True)
    if sys.stdout.isatty():  # a person watching: show tokens as they come
        for _row, delta in stream(lm, [prompt], [steering], options=_options(kw)):
            click.echo(delta, nl=False)
        click.echo()
    else:
        report: dict = {}
        click.echo(run(lm, prompt, steering, options=_options(kw), report=report)[0])
        for line in describe_conditions(report):
            click.echo(f"# {line}", err=True)


@prompt_command
def compare(prompt: str, vectors_dir: Path | None, model_id: str | None, device: str, dtype: str, **kw: Any) -> None:
    """Base vs steered completion of PROMPT, generated together in one batch."""
    # first: it says "loading ..." when slow
    lm = load_lm(model_id, device, dtype, quantize=kw["quantize"], compile_decode=kw["compile_decode"])
    from .generate import generate as run

    steering = steering_from_options(lm, open_store(lm, vectors_dir), kw)
    report: dict = {}
    base, steered = run(lm, [prompt, prompt], [[], list(steering)], options=_options(kw), report=report)
    for line in describe_conditions(report):
        click.echo(f"# {line}", err=True)
    click.echo(click.style("=== base ===", bold=True))
    click.echo(base)
    click.echo(click.style(f"=== steered: {describe_steering(steering, lm)} ===", bold=True))
    click.echo(steered)
