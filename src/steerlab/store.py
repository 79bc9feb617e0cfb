"""A folder of vectors for one model: load, look up, build missing built-ins, save.

Used by the CLI and held in the server's app state (there is no global instance). Bad files
are skipped with a warning naming the file and the reason, never fatal. Built-in persona
files are never overwritten unless asked.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import PersonaError, VectorFileError
from .personas import available_personas, build_persona, builtin_names, get_persona, load_vectors, vector_path
from .vectors import SteeringVector

log = logging.getLogger("steerlab")


class VectorStore:
    """Vectors by name, backed by ``folder`` (``<name>.safetensors``)."""

    def __init__(self, folder: str | Path, lm, *, warn: Callable[[str], None] | None = None) -> None:  # noqa: ANN001
        self.folder = Path(folder)
        self.lm = lm
        self.warn = warn or log.warning
        self._lock = threading.Lock()
        self.vectors: dict[str, SteeringVector] = load_vectors(
            self.folder, model_id=lm.model_id, hidden_size=lm.hidden_size,
            on_error=lambda p, e: self.warn(f"skipping {p.name}: {e}"),
        )

    def names(self) -> list[str]:
        return sorted(self.vectors)

    def get(self, name: str, *, build_missing: bool = True, progress: bool = False) -> SteeringVector:
        """A loaded vector; a known persona that was never built is built and saved first."""
        with self._lock:
            if name in self.vectors:
                return self.vectors[name]
        if build_missing and name in available_personas():
            self.warn(f"vector {name!r} not built yet: building it from its persona file and measuring its dose window")
            return self.add(self._build(name, progress), overwrite=True)
        known = sorted(set(self.vectors) | set(available_personas()))
        raise VectorFileError(f"unknown vector {name!r}: available {', '.join(known) or 'none'} (see `steerlab list`)")

    def ensure_builtins(self, *, progress: bool = False) -> list[str]:
        """Build every built-in persona with no vector yet, or whose contrast texts changed since
        its vector was built (e.g. after an upgrade); return the names built."""
        from .extract import contrast_hash

        built = []
        for name in builtin_names():
            old = self.vectors.get(name)
            persona = get_persona(name)
            if old is not None and old.contrast_hash in ("", contrast_hash(persona.positive, persona.negative)):
                continue
            if old is not None:
                self.warn(f"vector {name!r} was built from older contrast texts: rebuilding it")
            self.add(self._build(name, progress), overwrite=True)
            built.append(name)
        return built

    def _build(self, name: str, progress: bool) -> SteeringVector:
        """A persona's vector with its dose window measured (steerlab.calibrate)."""
        from .calibrate import calibrated

        vec = build_persona(self.lm, get_persona(name), progress=progress)
        return calibrated(self.lm, vec, progress=self.warn if progress else None)[0]

    def add(self, vec: SteeringVector, *, overwrite: bool = False, name: str | None = None) -> SteeringVector:
        """Save ``vec`` as ``<name>.safetensors`` (atomic) and make it available."""
        name = name or vec.name
        path = vector_path(self.folder, name)
        with self._lock:
            if not overwrite and (name in self.vectors or path.exists()):
                raise PersonaError(f"a vector named {name!r} exists already; choose another name or overwrite it")
            vec.save(path)
            self.vectors[name] = vec
        return vec

    def update(self, name: str, vec: SteeringVector) -> SteeringVector:
        """Replace an existing vector (e.g. new defaults from a sweep)."""
        return self.add(vec, overwrite=True, name=name)
