"""steerlab: build, measure and serve activation-steering vectors for Hugging Face causal LMs."""

from .errors import LayerError, ModelLoadError, PersonaError, SteeringError, VectorFileError
from .extract import build_vector
from .generate import GenerationOptions, compare, generate, stream
from .hooks import Steer, steer
from .models import DEFAULT_MODEL, LoadedModel, load_model
from .vectors import SteeringVector

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
