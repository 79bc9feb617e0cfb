"""llama.cpp control vectors: export a SteeringVector to GGUF, import GGUF files as vectors.

The format is the one llama.cpp reads with ``--control-vector`` / ``--control-vector-scaled``
and repeng writes: a GGUF file with ``general.architecture = "controlvector"``,
``controlvector.model_hint`` and ``controlvector.layer_count`` keys, and one 1-D F32 tensor
``direction.N`` per steered layer. This module knows nothing about hooks or generation.

Layer numbering (read from llama.cpp's source, see docs/interop.md): llama.cpp adds
``direction.N`` to the output of decoder block N (0-based) -- ``build_cvec(cur, il)`` at the end
of block ``il``'s graph -- and rejects ``direction.0``. That is exactly steerlab's layer N (layer N
= output of block N = ``hidden_states[N + 1]``): **no offset**. steerlab's layer 0 has no
llama.cpp equivalent and is refused on export.

Scale: an exported tensor is exactly what steerlab adds at that layer, ``vec.deltas(strength=s)``
= ``s * norm_N * direction_N`` with ``s = 1.0`` unless asked otherwise. So
``--control-vector-scaled FILE k`` in llama.cpp == steerlab strength ``k * s`` (with the default
``s = 1``: llama.cpp scale == steerlab strength), and plain ``--control-vector FILE`` == strength s.

Import: files written by steerlab carry their metadata (``steerlab.metadata``) and round-trip
exactly (directions, residual norms, defaults). Foreign files (repeng, llama.cpp's
cvector-generator) carry no residual norms; see :func:`import_gguf` for how strength is defined.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from .errors import SteeringError, VectorFileError
from .vectors import SteeringVector

if TYPE_CHECKING:
    from .models import LoadedModel

ARCH = "controlvector"
META_KEY = "steerlab.metadata"
NormsSource = Literal["auto", "measure", "file"]


# ---- export --------------------------------------------------------------------------------
def export_gguf(
    vec: SteeringVector,
    path: str | os.PathLike,
    *,
    strength: float | None = None,
    scale: float | None = None,
    layers: Sequence[int] | None = None,
    model_hint: str | None = None,
) -> Path:
    """Write ``vec`` as a llama.cpp control vector; return the path written (atomically).

    ``layers``: which layers to write (default: the vector's active layers, i.e. what steerlab
    applies when no layer is named). ``strength`` (default 1.0) or ``scale`` is baked into the
    tensors: ``direction.N = vec.deltas(strength=strength, scale=scale)[N]``.
    ``model_hint`` (default: the vector's model id) is informational; llama.cpp ignores it.
    """
    import gguf

    if strength is None and scale is None:
        strength = 1.0
    use = sorted(layers) if layers is not None else vec.active_layers
    if 0 in use:
        raise SteeringError(
            "llama.cpp cannot apply a control vector at layer 0 (it rejects direction.0; its layer N is "
            "steerlab's layer N, the output of block N): choose layers >= 1"
        )
    deltas = vec.deltas(strength=strength, scale=scale, layers=list(use))
    meta = vec.metadata() | {
        "exported_strength": strength,
        "exported_scale": scale,
        "exported_layers": list(use),
    }
    path = Path(path)
    if path.suffix != ".gguf":
        path = path.with_name(path.name + ".gguf")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_string(f"{ARCH}.model_hint", model_hint or vec.model_id)
        writer.add_uint32(f"{ARCH}.layer_count", len(deltas))
        writer.add_string(META_KEY, json.dumps(meta))
        for layer in use:
            writer.add_tensor(f"direction.{layer}", deltas[layer].numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---- reading -------------------------------------------------------------------------------
def _field_str(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not field.parts:
        return None
    try:
        return bytes(field.parts[-1]).decode("utf-8")
    except (UnicodeDecodeError, TypeError, ValueError):
        return None


def read_gguf(path: str | os.PathLike) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """The raw ``direction.N`` tensors ``{N: float32 array}`` and the file's metadata.

    Validates what llama.cpp validates (names ``direction.N`` with N >= 1, F32, 1-D, one size)
    and raises :class:`VectorFileError` naming the file and the problem.
    """
    import gguf

    path = Path(path)
    if not path.exists():
        raise VectorFileError(f"{path}: no such control-vector file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds on garbage
        raise VectorFileError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    arch = _field_str(reader, "general.architecture")
    if arch is not None and arch != ARCH:
        raise VectorFileError(
            f"{path}: GGUF architecture is {arch!r}, not {ARCH!r}: this is not a control vector "
            "(a model file? control vectors come from steerlab export, repeng or llama-cvector-generator)"
        )
    directions: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        prefix, _, idx = t.name.partition(".")
        if prefix != "direction" or not idx.isdigit():
            raise VectorFileError(f"{path}: unexpected tensor {t.name!r}; a control vector has direction.N tensors")
        layer = int(idx)
        if layer == 0:
            raise VectorFileError(f"{path}: has direction.0, which llama.cpp rejects (layers start at 1)")
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise VectorFileError(f"{path}: {t.name} is {t.tensor_type.name}; control vectors are F32")
        data = np.asarray(t.data, dtype=np.float32).reshape(-1).copy()
        if len([d for d in t.shape if d != 1]) > 1:
            raise VectorFileError(f"{path}: {t.name} has shape {list(t.shape)}; control vectors are 1-D")
        if directions and data.shape != next(iter(directions.values())).shape:
            raise VectorFileError(f"{path}: {t.name} has {data.size} values, the other directions "
                                  f"{next(iter(directions.values())).size}")
        if not np.isfinite(data).all():
            raise VectorFileError(f"{path}: {t.name} contains NaN or infinite values")
        directions[layer] = directions.get(layer, 0) + data  # llama.cpp sums repeated layers too
    if not directions:
        raise VectorFileError(f"{path}: no direction.N tensors: not a control vector")
    meta: dict[str, Any] = {"architecture": arch, "model_hint": _field_str(reader, f"{ARCH}.model_hint")}
    raw = _field_str(reader, META_KEY)
    if raw is not None:
        try:
            meta["steerlab"] = json.loads(raw)
        except json.JSONDecodeError:
            raise VectorFileError(f"{path}: corrupt {META_KEY} (not JSON); re-export it") from None
    return directions, meta


# ---- import --------------------------------------------------------------------------------
def import_gguf(
    path: str | os.PathLike,
    *,
    lm: LoadedModel | None = None,
    name: str | None = None,
    norms: NormsSource = "auto",
    model_id: str | None = None,
    hidden_size: int | None = None,
) -> SteeringVector:
    """Read a control-vector file as a :class:`SteeringVector`.

    * Written by steerlab: the stored metadata is restored (directions, residual norms, default
      strength); ``direction.N / (s * norm_N)`` gives back the unit directions. Default layers
      are the layers in the file (what llama.cpp applies), as for foreign files.
    * Foreign files: each direction is the file's tensor normalised to unit length, default
      layers are all layers in the file (what llama.cpp applies), and the residual norms are

      - ``norms="measure"`` (the default when ``lm`` is given): measured on ``lm`` with the
        neutral prompts, so strength means residual-norm units as for built vectors; the
        default strength is the mean over layers of ``|direction.N| / norm_N`` (the file's own
        dose at llama.cpp scale 1).
      - ``norms="file"`` (the default without a model): ``norm_N = |direction.N|``, so strength
        ``k`` adds exactly ``k * direction.N`` -- steerlab strength == llama.cpp scale, per layer.

    ``model_id`` / ``hidden_size`` (taken from ``lm`` when given) are checked like
    :meth:`SteeringVector.load`; a foreign file records ``model_id`` (it names no model itself).
    """
    path = Path(path)
    raw, meta = read_gguf(path)
    if lm is not None:
        model_id = model_id or lm.model_id
        hidden_size = hidden_size or lm.hidden_size
        too_deep = [layer for layer in raw if layer >= lm.n_layers]
        if too_deep:
            raise VectorFileError(f"{path}: has directions for layers {too_deep} but {lm.model_id} has "
                                  f"{lm.n_layers} layers (0..{lm.n_layers - 1}): it was made for another model")
    size = next(iter(raw.values())).size
    if hidden_size is not None and size != hidden_size:
        raise VectorFileError(
            f"{path}: directions have {size} values but the model's hidden size is {hidden_size}; "
            f"it was made for another model (hint: {meta.get('model_hint') or 'none'})"
        )
    if "steerlab" in meta:
        vec = _from_steerlab(path, raw, meta["steerlab"])
        if model_id is not None and vec.model_id != model_id:
            raise VectorFileError(f"{path}: exported from a vector built for {vec.model_id}, not {model_id}; "
                                  "rebuild it for this model")
        return vec if name is None else _renamed(vec, name)
    if norms not in ("auto", "measure", "file"):
        raise SteeringError(f"norms must be auto, measure or file, not {norms!r}")
    if norms == "measure" and lm is None:
        raise SteeringError("norms='measure' needs the model (lm=...) to measure residual norms on")
    file_norms = {layer: float(np.linalg.norm(d)) for layer, d in raw.items()}
    zero = [layer for layer, n in file_norms.items() if n == 0.0]
    kept = {layer: d for layer, d in raw.items() if layer not in zero}
    if not kept:
        raise VectorFileError(f"{path}: every direction is all zeros")
    directions = {layer: torch.from_numpy(d / file_norms[layer]) for layer, d in kept.items()}
    source = "measured" if (norms == "measure" or (norms == "auto" and lm is not None)) else "file"
    if source == "measured":
        if lm is None:
            raise VectorFileError(f"{path}: norms='measure' needs the model (pass lm=)")
        from .extract import measure_norms

        measured = measure_norms(lm, sorted(kept))
        residual = {layer: measured[layer] for layer in kept}
        strength = float(np.mean([file_norms[layer] / residual[layer] for layer in kept]))
    else:
        residual = {layer: file_norms[layer] for layer in kept}
        strength = 1.0
    return SteeringVector(
        directions=directions,
        norms=residual,
        model_id=model_id or meta.get("model_hint") or "unknown",
        name=name or path.stem,
        method="gguf",
        description=f"imported from {path.name}",
        default_layers=tuple(sorted(kept)),
        default_strength=strength,
        extra={"source": "gguf", "model_hint": meta.get("model_hint") or "", "norms_source": source,
               "file_norms": {str(k): v for k, v in sorted(file_norms.items())}, "zero_layers": sorted(zero)},
    )


def _renamed(vec: SteeringVector, name: str) -> SteeringVector:
    from dataclasses import replace

    return replace(vec, name=name)


def _from_steerlab(path: Path, raw: dict[int, np.ndarray], meta: dict) -> SteeringVector:
    """Undo :func:`export_gguf` using the metadata it stored."""
    try:
        norms = {int(k): float(v) for k, v in meta["norms"].items()}
        strength, scale = meta.get("exported_strength"), meta.get("exported_scale")
        directions = {}
        for layer, d in raw.items():
            factor = float(scale) if scale is not None else float(strength or 0.0) * norms[layer]
            if factor == 0:
                raise ValueError("exported at strength 0: the directions cannot be recovered")
            directions[layer] = torch.from_numpy(d / factor)
        # default_layers: what llama.cpp applies, i.e. every layer in the file
        return SteeringVector.from_metadata(directions, meta, default_name=path.stem,
                                            default_layers=tuple(sorted(raw)))
    except (KeyError, ValueError, TypeError, SteeringError) as exc:
        raise VectorFileError(f"{path}: corrupt {META_KEY} ({exc}); re-export it") from None
