"""``steerlab export`` / ``import`` / ``compare-methods``, and the custom sources of ``steerlab build``.

Registered at the bottom of cli.py. Option decorators come from options.py so
this module can be imported on its own; heavy imports happen inside the commands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast
from pathlib import Path

import click

from .options import AliasedOption, model_options, vectors_option

if TYPE_CHECKING:
    from .gguf_io import NormsSource
    from .models import LoadedModel
    from .store import VectorStore
    from .vectors import SteeringVector


def _open(model_id: str | None, device: str, dtype: str, vectors_dir: Path | None) -> tuple[LoadedModel, VectorStore]:
    from .options import load_lm, open_store

    lm = load_lm(model_id, device, dtype)
    return lm, open_store(lm, vectors_dir)


def _load_vector(name: str, vectors_dir: Path | None) -> SteeringVector:
    from .errors import VectorFileError
    from .paths import default_vectors_dir
    from .personas import available_personas, check_name
    from .store import vector_path
    from .vectors import SteeringVector

    if name.endswith(".safetensors") or "/" in name:
        return SteeringVector.load(name)
    folder = vectors_dir or default_vectors_dir()
    path = vector_path(folder, check_name(name))
    if not path.exists():
        hint = f"build it first: steerlab build {name}" if name in available_personas() else "see `steerlab list`"
        raise VectorFileError(f"no vector {name!r} in {folder} ({hint})")
    return SteeringVector.load(path)


def _export_layers(spec: str | None, vec: SteeringVector) -> list[int] | None:
    from .layers import parse_layers

    if spec is None:
        return None
    if spec.strip() == "all":
        return [x for x in vec.layers if x != 0]
    return parse_layers(spec, max(vec.layers) + 1)


@click.command("export")
@click.argument("name")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--strength", default=None, type=float,
              help="Strength baked into the file (default 1.0, so that llama.cpp's --control-vector-scaled "
                   "SCALE equals steerlab strength).")
@click.option("--layer", "--layers", "layer_spec", cls=AliasedOption, default=None,
              help="Layers to write: 12, 10,12,14, 4:24:2 or all (every layer but 0). Default: the vector's "
                   "default layers.")
@vectors_option
def export_cmd(name: str, out: Path, strength: float | None, layer_spec: str | None, vectors_dir: Path | None) -> None:
    """Write vector NAME (or a .safetensors path) as a llama.cpp control vector OUT.gguf.

    \b
    llama.cpp adds direction.N to the output of its block N, which is steerlab's layer N.
    With the default --strength 1.0:  llama-cli -m MODEL.gguf --control-vector-scaled OUT.gguf S
    applies steerlab strength S.
    """
    from .gguf_io import export_gguf

    vec = _load_vector(name, vectors_dir)
    layers = _export_layers(layer_spec, vec)
    s = 1.0 if strength is None else strength
    path = export_gguf(vec, out, strength=s, layers=layers)
    used = layers if layers is not None else vec.active_layers
    click.echo(f"wrote {path}: {vec.name} ({vec.model_id}), layers {','.join(map(str, used))}, strength {s} baked in")
    suggested = vec.default_strength / s if s else vec.default_strength
    click.echo(f"llama.cpp (scale = steerlab strength / {s}):")
    click.echo(f"  llama-cli -m MODEL.gguf --control-vector-scaled {path} {suggested:g}"
               f"   # = steerlab strength {vec.default_strength:g}, the vector's default")


@click.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Name in the vectors folder (default: the file name).")
@click.option("--norms", type=click.Choice(["measure", "file"]), default="measure", show_default=True,
              help="Foreign files: measure residual norms on the model (strength in residual-norm units) or "
                   "use each direction's own length (strength == llama.cpp scale).")
@click.option("--force", is_flag=True, help="Overwrite a vector of the same name.")
@vectors_option
@model_options
def import_cmd(file: Path, name: str | None, norms: str, force: bool, vectors_dir: Path | None, model_id: str | None,
               device: str, dtype: str) -> None:
    """Import a llama.cpp / repeng control vector FILE.gguf into the vectors folder."""
    from .gguf_io import import_gguf
    from .personas import check_name

    name = check_name(name or file.stem)
    lm, store = _open(model_id, device, dtype, vectors_dir)
    vec = import_gguf(file, lm=lm, name=name, norms=cast("NormsSource", norms))
    store.add(vec, overwrite=force)
    src = vec.extra.get("norms_source", "steerlab metadata")
    click.echo(f"imported {file} as {name!r}: layers {','.join(map(str, vec.layers))}, residual norms from "
               f"{src}, default strength {vec.default_strength:.4g}")
    click.echo(f"saved: {store.folder / (name + '.safetensors')}")


@click.command("compare-methods")
@click.argument("persona")
@click.option("--layer", "--layers", "layer_spec", cls=AliasedOption,
              default="all", show_default=True, help="Layers: all, 12, 10,12,14 or 4:24:2.")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2, 100), help="Cross-validation folds.")
@model_options
def compare_methods_cmd(persona: str, layer_spec: str, folds: int, model_id: str | None, device: str,
                        dtype: str) -> None:
    """Compare mean_diff / pca / probe directions of PERSONA per layer.

    Cosine similarity between the directions, and held-out accuracy of each as a linear
    classifier of the persona's texts (K-fold over pairs).
    """
    from .layers import parse_layers
    from .method_compare import compare_methods
    from .models import load_model
    from .personas import get_persona

    p = get_persona(persona)
    lm = load_model(model_id, device=device, dtype=dtype)
    layers = parse_layers(layer_spec, lm.n_layers)
    click.echo(f"{p.name}: {len(p.positive)} pairs, pooling {p.pooling}{' (chat)' if p.chat else ''}, {folds} folds")
    click.echo(f"{'layer':>5}  {'cos md/pca':>10} {'cos md/probe':>12} {'cos pca/probe':>13}  "
               f"{'acc md':>6} {'acc pca':>7} {'acc probe':>9}")
    for row in compare_methods(lm, p.positive, p.negative, layers=layers, pooling=p.pooling, chat=p.chat,
                               folds=folds):
        c, a = row.cosine, row.accuracy
        click.echo(f"{row.layer:>5}  {c['mean_diff', 'pca']:>10.3f} {c['mean_diff', 'probe']:>12.3f} "
                   f"{c['pca', 'probe']:>13.3f}  {a['mean_diff']:>6.2f} {a['pca']:>7.2f} {a['probe']:>9.2f}")


def _snip(text: str, width: int = 100) -> str:
    import textwrap

    return textwrap.shorten(" ".join(text.split()), width=width, placeholder=" ...")


def build_custom(*, personas: tuple[str, ...], pair: tuple[str, str] | None, contrast: Path | None,
                 positive: Path | None, negative: Path | None, name: str | None, out_dir: Path | None, layer_spec: str,
                 method: str | None, pooling: str | None, chat: bool | None, batch_size: int, max_length: int,
                 demo_prompt: str, force: bool, model_id: str | None, device: str, dtype: str) -> None:
    """``steerlab build --pair/--contrast/--positive --negative``: one vector from a custom source."""
    from .contrast import load_contrast, load_text_pair
    from .extract import build_vector
    from .generate import GenerationOptions, compare
    from .layers import parse_layers
    from .personas import check_name

    sources = [bool(pair), bool(contrast), bool(positive or negative)]
    if sum(sources) != 1 or personas:
        raise click.UsageError("give exactly one of --pair, --contrast or --positive/--negative, and no PERSONAS")
    if bool(positive) != bool(negative):
        raise click.UsageError("--positive and --negative go together (one text file each)")
    if not name:
        raise click.UsageError("a custom vector needs --name NAME")
    name = check_name(name)
    cs = None
    if contrast:
        cs = load_contrast(contrast)
    elif positive and negative:
        cs = load_text_pair(positive, negative)
    from .models import load_model
    from .paths import default_vectors_dir
    from .store import VectorStore

    lm = load_model(model_id, device=device, dtype=dtype)
    store = VectorStore(out_dir or default_vectors_dir(), lm, warn=lambda m: click.echo(f"note: {m}", err=True))
    if name in store.vectors and not force:
        raise click.UsageError(f"a vector named {name!r} exists already; use --force to rebuild it")
    click.echo(f"model: {lm.model_id} on {lm.device} ({lm.dtype}), {lm.n_layers} layers, hidden {lm.hidden_size}")
    layers = parse_layers(layer_spec, lm.n_layers)
    if pair:
        from .actadd import build_pair_vector, default_pair_layer

        default = layers[0] if layer_spec != "all" else default_pair_layer(lm)
        vec = build_pair_vector(lm, pair[0], pair[1], layer=default, name=name,
                                layers=None if layer_spec == "all" else layers)
        what = f"pair {pair[0]!r} - {pair[1]!r}"
    else:
        if cs is None:  # unreachable: exactly one source was checked above
            raise click.UsageError("give --contrast FILE or --positive/--negative FILES")
        vec = build_vector(lm, cs.positive, cs.negative, layers=layers, method=method or "mean_diff",
                           pooling=pooling or "mean", chat=bool(chat), batch_size=batch_size, max_length=max_length,
                           name=name, description=f"from {cs.source}",
                           default_layers=[lm.n_layers // 2] if layer_spec == "all" else None)
        what = f"{len(cs.positive)} positive / {len(cs.negative)} negative texts from {cs.source}"
    store.add(vec, overwrite=True)
    d = vec.active_layers
    click.echo(f"\n{name}: built from {what} ({vec.method})")
    click.echo(f"  default layers {d}, residual norm {vec.norms[d[0]]:.1f}, default strength {vec.default_strength:g}")
    base, steered = compare(lm, demo_prompt, [vec], options=GenerationOptions(max_new_tokens=40))
    click.echo(f"  base:    {_snip(base)}")
    click.echo(f"  steered: {_snip(steered)}")
    click.echo(f"  saved:   {store.folder / (name + '.safetensors')}")
