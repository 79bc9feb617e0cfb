"""steerlab: build, measure and serve activation-steering vectors for Hugging Face causal LMs.

The public names below load on first use (PEP 562), so ``import steerlab`` (and every
``steerlab`` command, which imports this package first) does not pay for torch and
transformers before it needs them: ``steerlab --help`` answers at once.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import LayerError, ModelLoadError, PersonaError, SteeringError, VectorFileError

if TYPE_CHECKING:
    from .extract import build_vector
    from .generate import GenerationOptions, compare, generate, stream
    from .hooks import Steer, steer
    from .models import DEFAULT_MODEL, LoadedModel, load_model
    from .vectors import SteeringVector

_LAZY = {
    "build_vector": "extract",
    "GenerationOptions": "generate", "compare": "generate", "generate": "generate", "stream": "generate",
    "Steer": "hooks", "steer": "hooks",
    "DEFAULT_MODEL": "models", "LoadedModel": "models", "load_model": "models",
    "SteeringVector": "vectors",
}

__all__ = [
    "DEFAULT_MODEL",
    "GenerationOptions",
    "LayerError",
    "LoadedModel",
    "ModelLoadError",
    "PersonaError",
    "Steer",
    "SteeringError",
    "SteeringVector",
    "VectorFileError",
    "build_vector",
    "compare",
    "generate",
    "load_model",
    "steer",
    "stream",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'steerlab' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodule ``steerlab.generate`` sets the package attribute ``generate`` to that
    module; keep the public function there instead (what the eager ``from .generate import
    generate`` did)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
