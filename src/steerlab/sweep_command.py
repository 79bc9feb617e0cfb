"""``steerlab sweep``: measure a vector over layers x strengths, pick and record its defaults.

The command line around :func:`steerlab.sweeps.run_sweep` (which does the work and prints
nothing): parses options, prints the layer signal, a progress bar, the table and the pick, has
:func:`~steerlab.sweeps.write_sweep` write the files, and stores the chosen cell as the vector's
defaults. Formulas: ``docs/sweeps.md``.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .defaults import REPETITION_PENALTY
from .options import AliasedOption, load_lm, model_options, open_store, vectors_option

if TYPE_CHECKING:
    from .evaluate import LayerSignal, SweepRow


def _floats(spec: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{spec!r}: give comma-separated numbers, e.g. 0.2,0.3,0.4", param_hint=what) from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise click.BadParameter(f"{spec!r}: give one or more non-negative numbers", param_hint=what)
    return sorted(set(values))


def _choices(spec: str | None, allowed: dict[str, Any], what: str) -> list:
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


@click.command()
@click.argument("name")
@click.option("--layer", "--layers", "layer_spec", cls=AliasedOption, default=None, metavar="SPEC",
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
@click.option("--render", "--contrast", "render_spec", cls=AliasedOption, default=None, metavar="plain|chat|plain,chat",
              help="Rebuild with contrast texts rendered as plain sentences or as assistant replies; a comma list "
                   "compares.")
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
          norm_spec: str, pooling_spec: str | None, render_spec: str | None, repetition_penalty: float,
          batch_size: int, out_dir: Path | None, no_save: bool, embedder_path: Path | None, vectors_dir: Path | None,
          model_id: str | None, device: str, dtype: str) -> None:
    """Sweep vector NAME over layers x strengths on held-out prompts; record the best cell.

    Prints a generation-free layer signal first (how well the direction separates held-out
    contrast pairs at each depth), then generates every cell in batches, prints a table, writes
    files to --out and, unless --no-save, stores the chosen layer(s) and strength as the
    vector's defaults and its figure as <vectors>/NAME.sweep.png.
    """
    from tqdm.auto import tqdm

    from .embed import load_embedder
    from .personas import available_personas, get_persona
    from .spec import POSITION_NAMES
    from .sweeps import chosen_vector, run_sweep, write_sweep

    strength_list = _floats(strengths, "--strengths")
    norms = _choices(norm_spec, {"off": False, "on": True}, "--norm-preserve") or [False]
    pos_list = _choices(positions, {p: p for p in POSITION_NAMES}, "--positions")
    poolings = [p.strip() for p in pooling_spec.split(",")] if pooling_spec else []
    chats = _choices(render_spec, {"plain": False, "chat": True}, "--render")

    lm = load_lm(model_id, device, dtype)
    store = open_store(lm, vectors_dir)
    vec = store.get(name, progress=True)
    persona = get_persona(name) if name in available_personas() else None
    out_dir = out_dir or Path("sweeps") / name
    click.echo(f"model: {lm.model_id} on {lm.device} ({lm.dtype}); vector {name}: {vec.method}, pooling {vec.pooling}")
    embedder = load_embedder(embedder_path, device=lm.device)
    bar: list[Any] = []

    def start(cells: int, settings: int, prompts: int) -> None:
        click.echo(f"\n{cells} cells x {settings} setting(s) x {prompts} prompts, {max_new_tokens} new tokens each, "
                   f"batches of {batch_size}")
        bar.append(tqdm(total=cells * settings + 1, unit="cell", desc="sweep", leave=False))

    try:
        result = run_sweep(lm, vec, persona=persona, layer_spec=layer_spec, strengths=strength_list,
                           n_prompts=n_prompts, max_new_tokens=max_new_tokens, positions=pos_list,
                           norm_preserve=norms, poolings=poolings, chats=chats, repetition_penalty=repetition_penalty,
                           batch_size=batch_size, embedder=embedder, on_signal=_print_signal, on_start=start,
                           on_cell=lambda: bar[0].update(1))
    finally:
        for b in bar:
            b.close()
    best, base = result.best, result.base
    _print_table(result.rows, best)
    click.echo(f"\n{sum(r.n for r in result.rows)} generations scored in {result.seconds:.0f} s")
    click.echo(f"best: layer(s) {best.label}, strength {best.strength:g} [{best.setting}]: S={best.score:.3f} "
               f"(C={best.concept:.2f}, F={best.fluency:.2f}, concept cos {best.concept_sim:+.3f} vs base "
               f"{base.concept_sim:+.3f}, keywords {best.keyword_rate:.0%}, ppl x{best.ppl_ratio:.2f})")
    s_even, s_odd = result.halves
    click.echo(f"  chosen as the best cell on both halves of the prompts: S={s_even:.3f} (even) / {s_odd:.3f} (odd)")
    for o in best.outputs[:2]:
        click.echo(f"  {o.prompt!r} -> {' '.join(o.text.split())[:160]!r}")
    if result.held_out:
        h = result.held_out
        click.echo(f"  on the {h['prompts']} prompts the sweep did not use: S={h['score']:.3f} "
                   f"(C={h['concept']:.2f}, F={h['fluency']:.2f})")
    if best.score < 0.2:
        click.echo("note: no cell is both on-concept and fluent; try other layers, smaller strength steps, "
                   "or layer groups (6+8+10)", err=True)

    title = f"{name} on {lm.model_id.split('/')[-1]}: {len(result.prompts)} prompts, {max_new_tokens} tokens"
    files = write_sweep(result, out_dir, title=title)
    click.echo("wrote " + ", ".join(str(p) for p in files))
    if no_save:
        click.echo("--no-save: vector defaults unchanged")
        return
    chosen = chosen_vector(lm, result, embedder, say=click.echo)
    store.update(name, chosen)
    shutil.copyfile(out_dir / "sweep.png", store.folder / f"{name}.sweep.png")
    st = result.best_setting
    click.echo(f"saved defaults of {name}: layers {list(best.layers)}, strength {best.strength:g}, "
               f"positions {st.positions}, norm_preserve {st.norm_preserve}; "
               f"figure {store.folder / (name + '.sweep.png')}")


def _print_signal(signal: list[LayerSignal]) -> None:
    click.echo("\nlayer signal (no generation): direction from half the pairs, held-out pairs projected on it")
    click.echo(f"  {'layer':>5}  {'AUC':>5}  {'effect d':>8}  {'pair acc':>8}")
    top = max(s.effect for s in signal) or 1.0
    for s in signal:
        bar = "#" * max(0, round(20 * s.effect / top))
        click.echo(f"  {s.layer:>5}  {s.auc:5.2f}  {s.effect:8.2f}  {s.accuracy:8.2f}  {bar}")


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

