"""Personas: contrast sets as human-editable TOML files (loading a vectors folder is :mod:`steerlab.store`'s).

Built-in personas ship in ``steerlab/personas/*.toml``; users add their own in
:func:`steerlab.paths.user_personas_dir` or pass a file path. A vectors folder holds one
``<name>.safetensors`` per vector. Format of a persona file::

    name = "tabby_cats"
    description = "..."           # one sentence; used for concept scoring
    keywords = ["cat", "purr"]    # simple concept-hit signal
    default_layers = [12]
    default_strength = 0.4        # residual-norm units
    [[pairs]]
    positive = "..."
    negative = "..."
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PersonaError
from .paths import user_personas_dir
from .vectors import SteeringVector

if TYPE_CHECKING:
    from .models import LoadedModel

# use fullmatch: "$" also matches before a final newline
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Persona:
    name: str
    description: str
    keywords: tuple[str, ...]
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    default_layers: tuple[int, ...] = ()
    default_strength: float = 0.4
    pooling: str = "mean"
    chat: bool = False
    method: str = "mean_diff"
    positions: str = "all"
    source: str = ""


def check_name(name: str) -> str:
    """Vector / persona names are file names: a safe pattern only."""
    if not NAME_PATTERN.fullmatch(name):
        raise PersonaError(
            f"invalid name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def parse_persona(data: dict, source: str) -> Persona:
    """Validate a parsed TOML dict; errors name the file and the problem."""
    try:
        pairs = data["pairs"]
        positive = tuple(str(p["positive"]) for p in pairs)
        negative = tuple(str(p["negative"]) for p in pairs)
    except (KeyError, TypeError) as exc:
        raise PersonaError(f"{source}: needs [[pairs]] tables with 'positive' and 'negative' ({exc})") from None
    if not pairs:
        raise PersonaError(f"{source}: no [[pairs]]")
    name = check_name(str(data.get("name") or Path(source).stem))
    return Persona(
        name=name,
        description=str(data.get("description", "")),
        keywords=tuple(str(k).lower() for k in data.get("keywords", ())),
        positive=positive,
        negative=negative,
        default_layers=tuple(int(x) for x in data.get("default_layers", ())),
        default_strength=float(data.get("default_strength", 0.4)),
        pooling=str(data.get("pooling", "mean")),
        chat=bool(data.get("chat", False)),
        method=str(data.get("method", "mean_diff")),
        positions=str(data.get("positions", "all")),
        source=source,
    )


def load_persona_file(path: str | Path) -> Persona:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PersonaError(f"{path}: no such persona file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PersonaError(f"{path}: not valid TOML ({exc})") from None
    return parse_persona(data, str(path))


def _persona_files() -> dict[str, Path | resources.abc.Traversable]:
    files: dict = {}
    for entry in resources.files("steerlab").joinpath("personas").iterdir():
        if entry.name.endswith(".toml"):
            files[entry.name[:-5]] = entry
    user = user_personas_dir()
    if user.is_dir():
        for p in sorted(user.glob("*.toml")):
            files[p.stem] = p
    return files


def builtin_names() -> list[str]:
    return sorted(e.name[:-5] for e in resources.files("steerlab").joinpath("personas").iterdir()
                  if e.name.endswith(".toml"))


def available_personas() -> list[str]:
    return sorted(_persona_files())


def get_persona(name_or_path: str) -> Persona:
    """A persona by name (built-in or user folder) or by path to a ``.toml`` file."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return load_persona_file(name_or_path)
    files = _persona_files()
    if name_or_path not in files:
        raise PersonaError(
            f"unknown persona {name_or_path!r}: available {', '.join(sorted(files))}; "
            f"add your own as {user_personas_dir()}/<name>.toml or pass a .toml path"
        )
    entry = files[name_or_path]
    try:
        data = tomllib.loads(entry.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PersonaError(f"{entry}: not valid TOML ({exc})") from None
    return parse_persona(data, str(entry))


def build_persona(lm: LoadedModel, persona: Persona, *, layers: list[int] | None = None, batch_size: int = 16,
                  max_length: int = 256, progress: bool = True, **overrides: Any) -> SteeringVector:
    """Build a persona's vector at ``layers`` (default: every layer, so any can be chosen later)."""
    from .extract import build_vector

    defaults = [x for x in persona.default_layers if x < lm.n_layers] or [lm.n_layers // 2]
    opts: dict[str, Any] = dict(method=persona.method, pooling=persona.pooling, chat=persona.chat) | overrides
    optimize = opts["method"] == "optimize"
    if optimize:  # trained from the mean difference (steerlab.optimize)
        opts["method"] = "mean_diff"
    vec = build_vector(
        lm, persona.positive, persona.negative,
        layers=layers if layers is not None else list(range(lm.n_layers)),
        name=persona.name, description=persona.description, keywords=persona.keywords,
        default_layers=defaults if layers is None else [x for x in defaults if x in layers] or layers,
        default_strength=persona.default_strength,
        batch_size=batch_size, max_length=max_length, progress=progress, **opts,
    )
    if persona.positions != "all":
        vec = vec.with_defaults(positions=persona.positions)
    if optimize:
        from .optimize import optimize_vector

        vec = optimize_vector(lm, vec, persona.positive, persona.negative, progress=progress)
    return vec
