"""The small error hierarchy every steerlab failure goes through.

Messages say what went wrong *and what to do*; the CLI and the server show them as one
line, so they must stand on their own.
"""

from __future__ import annotations


class SteeringError(Exception):
    """Base class: a user-facing problem with a clear message."""


class ModelLoadError(SteeringError):
    """The model or tokenizer could not be found or loaded."""


class LayerError(SteeringError):
    """Decoder layers could not be located, or a layer index is out of range."""


class VectorFileError(SteeringError):
    """A vector file is missing, corrupt, pickled, or made for another model."""


class PersonaError(SteeringError):
    """A persona / contrast-set file is missing or malformed."""
