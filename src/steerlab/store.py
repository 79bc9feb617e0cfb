"""A folder of vectors for one model: load, look up, build missing built-ins, save.

:func:`load_vectors` reads a folder (``<name>.safetensors``, llama.cpp ``.gguf``); :class:`VectorStore`
holds one for a model.

Used by the CLI and held in the server's app state (there is no global instance). Bad files
are skipped with a warning naming the file and the reason, never fatal: besides unreadable
files, a vector whose numbers are not finite or whose layers the model lacks is refused here,
at load, rather than failing every request batched with it later. Built-in persona files are
never overwritten unless asked.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PersonaError, VectorFileError
from .personas import available_personas, build_persona, builtin_names, check_name, get_persona
from .vectors import SteeringVector

if TYPE_CHECKING:
    from .models import ModelInfo

log = logging.getLogger("steerlab")


class VectorStore:
    """Vectors by name, backed by ``folder`` (``<name>.safetensors``)."""

    def __init__(self, folder: str | Path, lm: ModelInfo, *, warn: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.lm = lm
        self.warn = warn or log.warning
        self._lock = threading.Lock()
        self._stamps = _stamps(self.folder)
        loaded = load_vectors(
            self.folder, model_id=lm.model_id, hidden_size=lm.hidden_size,
            on_error=lambda p, e: self.warn(f"skipping {p.name}: {e}"),
        )
        self.vectors: dict[str, SteeringVector] = {}
        for name, vec in loaded.items():
            if why := vector_problem(vec, lm.n_layers):
                self.warn(f"skipping {name}.safetensors: {why}")
            else:
                self.vectors[name] = vec

    def refresh(self) -> list[str]:
        """Re-read the folder if a vector file changed on disk since it was read (``steerlab sweep``
        storing new defaults while a server runs, a file copied in or deleted); return the names
        whose files changed. One ``stat`` per file when nothing did."""
        stamps = _stamps(self.folder)
        if stamps == self._stamps:
            return []
        with self._lock:
            changed = sorted({n for n in stamps.keys() | self._stamps.keys() if stamps.get(n) != self._stamps.get(n)})
            self._stamps = stamps
            self.vectors = load_vectors(
                self.folder, model_id=self.lm.model_id, hidden_size=self.lm.hidden_size,
                on_error=lambda p, e: p.name in changed and self.warn(f"skipping {p.name}: {e}"),
            )
        return sorted({n.rsplit(".", 1)[0] for n in changed})

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

    def ensure_builtins(self, *, progress: bool = False, notify: Callable[[str], None] | None = None) -> list[str]:
        """Build every built-in persona with no vector yet, or whose contrast texts changed since
        its vector was built (e.g. after an upgrade); return the names built.

        ``notify(line)`` hears "building NAME (i/n)..." before each build."""
        from .extract import contrast_hash

        todo = []
        for name in builtin_names():
            old = self.vectors.get(name)
            persona = get_persona(name)
            if old is not None and old.contrast_hash in ("", contrast_hash(persona.positive, persona.negative)):
                if not old.extra.get("windows"):  # built before dose windows existed: measure it once
                    from .calibrate import calibrated

                    if notify is not None:
                        notify(f"measuring the dose window of {name} (built before dose windows existed)...")
                    self.add(calibrated(self.lm.loaded(), old)[0], overwrite=True)
                continue
            if old is not None:
                self.warn(f"vector {name!r} was built from older contrast texts: rebuilding it")
            todo.append(persona)
        for i, persona in enumerate(todo, 1):
            if notify is not None:
                notify(f"building {persona.name} ({i}/{len(todo)}) from {len(persona.positive)} contrast pairs, "
                       "then measuring its dose window...")
            self.add(self._build(persona.name, progress), overwrite=True)
        return [p.name for p in todo]

    def _build(self, name: str, progress: bool) -> SteeringVector:
        """A persona's vector with its dose window measured (steerlab.calibrate)."""
        from .calibrate import calibrated, with_known_entropy

        lm = self.lm.loaded()  # the weights (a vLLM server loads its transformers copy now)
        vec = with_known_entropy(build_persona(lm, get_persona(name), progress=progress), self.vectors.values())
        return calibrated(lm, vec, progress=self.warn if progress else None)[0]

    def add(self, vec: SteeringVector, *, overwrite: bool = False, name: str | None = None) -> SteeringVector:
        """Save ``vec`` as ``<name>.safetensors`` (atomic) and make it available."""
        name = name or vec.name
        if why := vector_problem(vec, self.lm.n_layers):
            raise PersonaError(f"vector {name!r} cannot be used: {why}")
        path = vector_path(self.folder, name)
        with self._lock:
            if not overwrite and (name in self.vectors or path.exists()):
                raise PersonaError(f"a vector named {name!r} exists already; choose another name or overwrite it")
            vec.save(path)
            self.vectors[name] = vec
            self._stamps[path.name] = _stamp(path)
        return vec

    def update(self, name: str, vec: SteeringVector) -> SteeringVector:
        """Replace an existing vector (e.g. new defaults from a sweep)."""
        return self.add(vec, overwrite=True, name=name)


def vector_path(folder: str | Path, name: str) -> Path:
    return Path(folder) / f"{check_name(name)}.safetensors"


def load_vectors(folder: str | Path, *, model_id: str | None = None, hidden_size: int | None = None,
                 on_error: Callable[[Path, VectorFileError], object] | None = None) -> dict[str, SteeringVector]:
    """Load every ``*.safetensors`` / ``*.gguf`` vector in ``folder``; bad files go to ``on_error(path, exc)``."""
    out: dict[str, SteeringVector] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return out
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix not in (".safetensors", ".gguf", ".pkl", ".pickle", ".pt", ".pth"):
            continue
        try:
            if path.is_symlink():  # a planted link could expose (or load) a file from outside the folder
                raise VectorFileError(f"{path.name} is a symbolic link; vectors must be plain files in the folder "
                                      "(copy the file in instead)")
            if path.suffix == ".gguf":  # llama.cpp / repeng control vector (a same-named .safetensors wins)
                from .gguf_io import import_gguf

                vec = import_gguf(path, model_id=model_id, hidden_size=hidden_size)
            else:
                vec = SteeringVector.load(path, model_id=model_id, hidden_size=hidden_size)
        except VectorFileError as exc:
            if on_error is None:
                raise
            on_error(path, exc)
            continue
        out[path.stem] = vec
    return out


_VECTOR_SUFFIXES = (".safetensors", ".gguf", ".pkl", ".pickle", ".pt", ".pth")  # what load_vectors looks at


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _stamps(folder: Path) -> dict[str, tuple[int, int] | None]:
    """File name -> (mtime, size) of every file in ``folder`` that load_vectors would read."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return {}
    return {p.name: _stamp(p) for p in entries if p.suffix in _VECTOR_SUFFIXES and not p.name.startswith(".")}
def vector_problem(vec: SteeringVector, n_layers: int) -> str | None:
    """Why ``vec`` cannot steer a model of ``n_layers`` layers (None when it can): layers out of
    range, or directions, norms or default strength that are not finite numbers."""
    bad = sorted(layer for layer in vec.directions if not 0 <= layer < n_layers)
    if bad:
        return f"it has layers {bad}, but the model has layers 0..{n_layers - 1}; rebuild it for this model"
    for layer, direction in vec.directions.items():
        if not bool(direction.isfinite().all()):
            return f"its direction at layer {layer} holds NaN or infinite values; rebuild it"
    for layer, norm in vec.norms.items():
        if not math.isfinite(float(norm)):
            return f"its norm at layer {layer} is {norm}; rebuild it"
    if not math.isfinite(float(vec.default_strength)):
        return f"its default strength is {vec.default_strength}; rebuild it or set a finite one"
    return None
