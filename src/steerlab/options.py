"""Click options and start-up helpers shared by every steerlab command module.

Kept apart from cli.py so command modules (sweep, interop, server) can import them without
importing the CLI group that registers those modules.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from .models import LoadedModel
    from .models import ModelInfo
    from .store import VectorStore

F = TypeVar("F", bound=Callable[..., Any])  # a click command callback, returned decorated

MODEL_HELP = ("Hugging Face model id or local folder (default: embedded SmolLM2-135M-Instruct; gemma-3-270m: the "
              "built-in Gemma 3 270M base, extra steerlab[gemma]). Env: STEERLAB_MODEL.")


class AliasedOption(click.Option):
    """An option accepted under all its names, shown in help under the first only.

    One vocabulary across commands (``--layer``) while older spellings (``--layers``) keep working.
    """

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        names = self.opts
        self.opts = names[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = names


def model_options(f: F) -> F:
    """--model, --device, --dtype."""
    f = click.option("--dtype", default="auto", show_default=True, help="auto, float32, float16 or bfloat16.")(f)
    f = click.option("--device", default="auto", show_default=True, envvar="STEERLAB_DEVICE",
                     help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps. Env: STEERLAB_DEVICE.")(f)
    f = click.option("--model", "model_id", default=None, envvar="STEERLAB_MODEL", help=MODEL_HELP)(f)
    return f


QUANTIZE_HELP = ("CPU only: store the linear layers' weights as int8 (one scale per row) or int4 (groups of 32; "
                 "the head int8) and decode from them: fewer bytes read per token, faster at small batches; "
                 "replies can differ from float32's (docs/performance.md). Env: STEERLAB_QUANTIZE.")


def quantize_option(f: F) -> F:
    """--quantize none|int8|int4 (generate, compare, serve: the commands that decode)."""
    return click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default="none", show_default=True,
                        envvar="STEERLAB_QUANTIZE", help=QUANTIZE_HELP)(f)


COMPILE_HELP = ("Decode through one torch.compile graph over a static KV cache: faster per token, about a minute "
                "to compile on the first generation (again for a new batch size); replies can differ from "
                "eager decoding's in rare tokens (docs/performance.md). Env: STEERLAB_COMPILE=1.")


def compile_option(f: F) -> F:
    """--compile (generate, compare: the commands that decode)."""
    return click.option("--compile", "compile_decode", is_flag=True, default=False, envvar="STEERLAB_COMPILE",
                        help=COMPILE_HELP)(f)


def vectors_option(f: F) -> F:
    """--vectors DIR."""
    return click.option("--vectors", "vectors_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Vectors folder (default: printed by `steerlab list`). Env: STEERLAB_VECTORS.")(f)


def load_lm(model_id: str | None, device: str, dtype: str, *, announce: bool = False,
            quantize: str = "none", compile_decode: bool | None = None) -> LoadedModel:
    """The model named by --model/--device/--dtype (and --quantize, --compile where a command has them).

    Says "loading ..." on stderr if that takes over 2 s (at once with ``announce``), and before
    the embedded model's one-time conversion.
    """
    from . import threads
    from .phases import say, slow

    try:
        threads.apply()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    with slow(f"loading {model_id or 'the embedded model (SmolLM2-135M-Instruct)'}...", after=0 if announce else 2.0):
        from .models import load_model

        return load_model(model_id, device=device, dtype=dtype, quantize=quantize, compile=compile_decode,
                          notify=say)


def open_store(lm: ModelInfo, vectors_dir: Path | None) -> VectorStore:
    """The vectors folder (--vectors, else the model's default) for ``lm``; notes go to stderr."""
    from .store import VectorStore

    return VectorStore(vectors_dir or model_vectors_dir(lm.model_id), lm,
                       warn=lambda m: click.echo(f"note: {m}", err=True))


def model_vectors_dir(model_id: str) -> Path:
    """The default vectors folder of a model: the folder itself for the embedded default model,
    a subfolder named after any other model (vectors carry their model; the folder keeps models apart)."""
    from .models import DEFAULT_MODEL
    from .paths import default_vectors_dir

    folder = default_vectors_dir()
    if model_id == DEFAULT_MODEL:
        return folder
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id.strip("/")).strip("._") or "model"
    return folder / slug
