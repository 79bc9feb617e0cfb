"""From request fields to library objects: steering entries, generation options, vector facts.

Owns the rules a request's steering follows (entry strength > request strength > the
server's STRENGTH > the vector's default; entry layers > the vector's default layers), the
checks that need the loaded model (vector exists, layers in range and present in the vector),
and the JSON description of a vector. Raises HTTP errors with messages a client can act on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException

from ..defaults import REPETITION_PENALTY
from ..errors import SteeringError
from ..generate import GenerationOptions
from ..spec import DEFAULT_GOVERNOR, DEFAULT_OPERATOR, Resolved, Steer, When, default_dose, resolve, window
from ..personas import builtin_names
from ..store import VectorStore
from ..vectors import SteeringVector
from .limits import MIN_SAMPLING_TEMPERATURE
from .schemas import SteerEntry
from .settings import ServerSettings  # re-exported: it lived here

if TYPE_CHECKING:
    from ..models import ModelInfo


def effective_strength(vec: SteeringVector, settings: ServerSettings) -> float:
    return settings.strength if settings.strength is not None else vec.default_strength


def plot_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.sweep.png"


def plain_file(path: Path) -> bool:
    """A file in the folder itself: a planted symlink must not expose a file from elsewhere."""
    return path.is_file() and not path.is_symlink()


def describe(name: str, vec: SteeringVector, *, settings: ServerSettings, folder: Path) -> dict[str, Any]:
    """A vector's metadata for GET /vectors (tensors left out)."""
    return {
        "name": name,
        "description": vec.description,
        "model_id": vec.model_id,
        "method": vec.method,
        "pooling": vec.pooling,
        "layers": vec.layers,
        "default_layers": vec.active_layers,
        "default_strength": effective_strength(vec, settings),
        "stored_default_strength": vec.default_strength,
        "positions": vec.extra.get("positions", "all"),
        "operator": vec.extra.get("operator", DEFAULT_OPERATOR),
        "governor": bool(vec.extra.get("governor", DEFAULT_GOVERNOR)),
        "default_dose": default_dose(vec),
        "window": window(vec, vec.extra.get("operator", DEFAULT_OPERATOR),
                         bool(vec.extra.get("governor", DEFAULT_GOVERNOR))),
        "keywords": list(vec.keywords),
        "created_at": vec.created_at,
        "builtin": name in builtin_names(),
        "plot": _plot_url(folder, name),
    }


def _plot_url(folder: Path, name: str) -> str | None:
    """The plot's URL, versioned by its mtime so a browser never shows an older sweep's plot."""
    path = plot_path(folder, name)
    if not plain_file(path):  # never a link out of the folder
        return None
    try:
        version = path.stat().st_mtime_ns
    except OSError:
        return None
    return f"/vectors/{name}/plot?v={version}"


def unknown_vector(name: str, store: VectorStore) -> HTTPException:
    names = store.names()
    return HTTPException(404, f"unknown vector {name!r}: available {', '.join(names) or 'none'} (GET /vectors lists "
                              "them; POST /vectors builds a new one)")


def resolve_steering(steering: list[SteerEntry] | None, strength: float | None, *, store: VectorStore, lm: ModelInfo,
                     settings: ServerSettings, dose: float | None = None, governor: bool | None = None,
                     positions: str | int | None = None) -> tuple[list[Resolved], list[dict[str, Any]]]:
    """Resolved entries for one row, and what was applied (vector, dose/strength, operator, layers...).

    Amount: the entry's dose/strength/scale > the request's dose or strength > the server's
    STRENGTH > the vector's default (a dose once calibrated).
    """
    out: list[Resolved] = []
    for entry in steering or []:
        vec = store.vectors.get(entry.vector)
        if vec is None:
            raise unknown_vector(entry.vector, store)
        amount = {k: getattr(entry, k) for k in ("dose", "strength", "scale") if getattr(entry, k) is not None}
        if not amount:
            amount = {"dose": dose} if dose is not None else {"strength": strength} if strength is not None else \
                {"strength": settings.strength} if settings.strength is not None else {}
        when = None
        if entry.when is not None:  # an unknown condition vector is a 404 before anything runs
            other = store.vectors.get(entry.when.vector)
            if other is None:
                raise unknown_vector(entry.when.vector, store)
            when = When(other, threshold=entry.when.threshold, stat=entry.when.stat, on=entry.when.on)
        st = Steer(vec, layers=tuple(entry.layers) if entry.layers else None, operator=entry.operator,
                   positions=entry.positions, governor=entry.governor if entry.governor is not None else governor,
                   when=when, **amount)
        try:
            out.append(resolve(st, lm.n_layers, positions=positions))
        except SteeringError as exc:
            raise HTTPException(400, f"{entry.vector}: {exc}") from None
    return out, [r.describe() for r in out]


def label(applied: list[dict[str, Any]]) -> str:
    """The seed's steering label: a name, names joined by '+', or 'none'."""
    return "+".join(a["vector"] for a in applied) or "none"


def options(req: Any, steers: list[Resolved], *, lm: ModelInfo, max_new_tokens: int,
            chat: bool | None) -> GenerationOptions:
    """Generation options of a request (``positions``: the request's, for entries that set none)."""
    if chat and not lm.has_chat_template:
        raise HTTPException(400, f"{lm.model_id} has no chat template: send \"chat\": false (raw completion)")
    positions = getattr(req, "positions", None)
    return GenerationOptions(
        max_new_tokens=max_new_tokens,
        # (0, MIN_SAMPLING_TEMPERATURE): greedy, the limit of sampling as T -> 0 (logits / 1e-37 overflow to NaN)
        temperature=req.temperature if req.temperature >= MIN_SAMPLING_TEMPERATURE else 0.0,
        top_p=req.top_p,
        seed=req.seed,
        chat=lm.has_chat_template if chat is None else chat,
        positions=positions,
        repetition_penalty=getattr(req, "repetition_penalty", REPETITION_PENALTY),
    )
