"""SteeringVector: per-layer directions plus the metadata that makes them reusable.

A vector is an immutable value. It knows its layers, the typical residual norm of each
layer (so that *strength* means the same thing at every layer and in every model), how to
combine with other vectors (``a + 0.5 * b``, ``-a``), and how to save and load itself as
safetensors. It never touches a model: applying it is :mod:`steerlab.hooks`' job.

Strength unit: ``strength = 1.0`` adds, at each applied layer, a vector whose length equals
that layer's typical residual norm (mean per-token L2 norm of the residual stream measured on
the contrast texts, attention-sink position excluded). ``scale`` is the absolute alternative
(the seed's behaviour: ``scale * unit_direction``).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import torch

from .errors import SteeringError, VectorFileError

FORMAT_VERSION = 1
_PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".bin"}


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """Directions per layer (fp32, CPU) with metadata. Built vectors have unit directions.

    A value: two vectors are equal when their metadata and every direction are exactly equal
    (``torch.equal``); the hash covers the identifying metadata only (model, name, layers, size,
    contrast hash), so equal vectors hash alike and a vector can key a dict or join a set.
    """

    directions: dict[int, torch.Tensor]
    norms: dict[int, float]
    model_id: str
    name: str = "vector"
    method: str = ""
    pooling: str = ""
    description: str = ""
    keywords: tuple[str, ...] = ()
    contrast_hash: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    default_layers: tuple[int, ...] = ()
    default_strength: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.directions:
            raise SteeringError("a steering vector needs at least one layer")
        sizes = {t.shape for t in self.directions.values()}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise SteeringError(f"directions must all be 1-D of one size, got shapes {sizes}")
        missing = set(self.directions) - set(self.norms)
        if missing:
            raise SteeringError(f"no residual norm recorded for layers {sorted(missing)}")
        bad = set(self.default_layers) - set(self.directions)
        if bad:
            raise SteeringError(f"default layers {sorted(bad)} have no direction; vector layers: {self.layers}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return (self is other or self.metadata() == other.metadata()
                and all(torch.equal(d, other.directions[k]) for k, d in self.directions.items()))

    def __hash__(self) -> int:
        return hash((self.model_id, self.name, tuple(self.layers), self.hidden_size, self.contrast_hash))

    # ---- basic facts -------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])

    @property
    def active_layers(self) -> list[int]:
        """Layers applied when none are named: the defaults, else every layer."""
        return list(self.default_layers) or self.layers

    def deltas(
        self,
        *,
        strength: float | None = None,
        scale: float | None = None,
        layers: list[int] | None = None,
    ) -> dict[int, torch.Tensor]:
        """The additive vector per layer (fp32, CPU) for a given dose.

        ``strength`` is in residual-norm units (default: ``default_strength``); ``scale``
        multiplies the stored direction directly. Give one, not both.
        """
        if strength is not None and scale is not None:
            raise SteeringError("give strength (residual-norm units) or scale (absolute), not both")
        use = layers if layers is not None else self.active_layers
        unknown = [layer for layer in use if layer not in self.directions]
        if unknown:
            raise SteeringError(f"{self.name} has no direction at layers {unknown}; it has {self.layers}")
        if scale is not None:
            return {layer: self.directions[layer] * scale for layer in use}
        s = self.default_strength if strength is None else strength
        return {layer: self.directions[layer] * (s * self.norms[layer]) for layer in use}

    # ---- derived vectors ---------------------------------------------------------------
    def select(self, layers: list[int]) -> SteeringVector:
        """Keep only ``layers``."""
        missing = [layer for layer in layers if layer not in self.directions]
        if missing:
            raise SteeringError(f"{self.name} has no direction at layers {missing}; it has {self.layers}")
        keep = set(layers)
        return replace(
            self,
            directions={k: v for k, v in self.directions.items() if k in keep},
            norms={k: v for k, v in self.norms.items() if k in keep},
            default_layers=tuple(x for x in self.default_layers if x in keep),
        )

    def with_defaults(self, *, layers: list[int] | None = None, strength: float | None = None,
                      **extra: Any) -> SteeringVector:
        """Return a copy with new default layers / strength and extra metadata merged in."""
        return replace(
            self,
            default_layers=tuple(layers) if layers is not None else self.default_layers,
            default_strength=float(strength) if strength is not None else self.default_strength,
            extra={**self.extra, **extra},
        )

    def _combine(self, other: SteeringVector, sign: float) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if other.model_id != self.model_id or other.hidden_size != self.hidden_size:
            raise SteeringError(
                f"cannot combine vectors of different models ({self.model_id}, {self.hidden_size}) "
                f"and ({other.model_id}, {other.hidden_size})"
            )
        directions = dict(self.directions)
        norms = dict(self.norms)
        for layer, d in other.directions.items():
            if layer in directions:
                directions[layer] = directions[layer] + sign * d
                norms[layer] = (norms[layer] + other.norms[layer]) / 2
            else:
                directions[layer] = sign * d
                norms[layer] = other.norms[layer]
        op = "+" if sign > 0 else "-"
        defaults = tuple(sorted(set(self.active_layers) | set(other.active_layers)))
        return replace(self, directions=directions, norms=norms, name=f"{self.name}{op}{other.name}",
                       method="combined", contrast_hash="", default_layers=defaults,
                       keywords=tuple(dict.fromkeys(self.keywords + other.keywords)), extra={})

    def __add__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self._combine(other, -1.0)

    def __mul__(self, k: float) -> SteeringVector:
        if not isinstance(k, (int, float)):
            return NotImplemented
        return replace(self, directions={i: d * float(k) for i, d in self.directions.items()})

    __rmul__ = __mul__

    def __truediv__(self, k: float) -> SteeringVector:
        return self * (1.0 / k)

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    # ---- persistence -------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-serialisable."""
        meta = asdict(self)
        meta.pop("directions")
        meta["norms"] = {str(k): v for k, v in self.norms.items()}
        meta["layers"] = self.layers
        meta["hidden_size"] = self.hidden_size
        meta["format_version"] = FORMAT_VERSION
        return meta

    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.safetensors`` file atomically (temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in self.directions.items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"steerlab": json.dumps(self.metadata())})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_metadata(cls, directions: dict[int, torch.Tensor], meta: dict[str, Any], *,
                      default_name: str = "vector", **override: Any) -> SteeringVector:
        """Rebuild a vector from :meth:`metadata` output (file formats share this)."""
        norms = {int(k): float(v) for k, v in meta["norms"].items()}
        fields = dict(
            directions=directions,
            norms={layer: norms[layer] for layer in directions},
            model_id=meta["model_id"],
            name=meta.get("name", default_name),
            method=meta.get("method", ""),
            pooling=meta.get("pooling", ""),
            description=meta.get("description", ""),
            keywords=tuple(meta.get("keywords", ())),
            contrast_hash=meta.get("contrast_hash", ""),
            created_at=meta.get("created_at", ""),
            default_layers=tuple(meta.get("default_layers", ())),
            default_strength=float(meta.get("default_strength", 1.0)),
            extra=dict(meta.get("extra", {})),
        )
        return cls(**(fields | override))

    @classmethod
    def load(cls, path: str | os.PathLike, *, model_id: str | None = None,
             hidden_size: int | None = None) -> SteeringVector:
        """Read a vector file; check it matches ``model_id`` / ``hidden_size`` when given."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if path.suffix in _PICKLE_SUFFIXES:
            raise VectorFileError(
                f"{path}: refusing to load a pickle-based file (loading pickle can run arbitrary code); "
                "steerlab vectors are .safetensors: rebuild it with `steerlab build`"
            )
        if not path.exists():
            raise VectorFileError(f"{path}: no such vector file (see `steerlab list`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("steerlab")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise VectorFileError(f"{path}: not a readable safetensors file ({exc}); rebuild it") from None
        if raw is None:
            raise VectorFileError(f"{path}: safetensors file without steerlab metadata; was it written by steerlab?")
        try:
            meta = json.loads(raw)
            directions = {int(k.split(".", 1)[1]): v.float() for k, v in tensors.items()}
            vec = cls.from_metadata(directions, meta, default_name=path.stem)
        except (KeyError, ValueError, TypeError, IndexError, SteeringError) as exc:
            raise VectorFileError(f"{path}: corrupt steerlab metadata ({exc}); rebuild it") from None
        if hidden_size is not None and vec.hidden_size != hidden_size:
            raise VectorFileError(
                f"{path}: vector has hidden size {vec.hidden_size} but the model has {hidden_size}; "
                f"it was built for {vec.model_id}: rebuild it for this model"
            )
        if model_id is not None and vec.model_id != model_id:
            raise VectorFileError(
                f"{path}: built for {vec.model_id}, not {model_id}; rebuild it for this model "
                "(or load without a model check if you know the models share a residual stream)"
            )
        return vec
