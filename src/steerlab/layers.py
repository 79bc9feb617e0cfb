"""Find a model's decoder blocks once, with one numbering convention.

Convention (used everywhere in steerlab): layer ``i`` is the *output* of decoder block ``i``,
counted from 0. In Hugging Face terms that is ``output_hidden_states[i + 1]``
(index 0 is the embedding output). This module knows nothing about steering.
"""

from __future__ import annotations

from torch import nn

from .errors import LayerError

# Attribute paths of the decoder block list, per architecture family.
_KNOWN_PATHS: tuple[str, ...] = (
    "model.layers",  # llama, mistral, qwen2, gemma, phi, phi3, olmo, ...
    "model.language_model.layers",  # multimodal wrappers (gemma3, llava-style)
    "transformer.h",  # gpt2, gpt-j, bloom, falcon
    "gpt_neox.layers",  # gpt-neox, pythia
    "model.decoder.layers",  # opt
    "transformer.layers",
    "transformer.blocks",  # mpt
)


def _get_path(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layers(model: nn.Module) -> nn.ModuleList:
    """Return the decoder block list of ``model``.

    Tries the known attribute paths first, then any ``ModuleList`` whose length matches
    ``config.num_hidden_layers``.
    """
    for path in _KNOWN_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if n:
        for _, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n:
                return module
    raise LayerError(
        f"could not find the decoder layers of {type(model).__name__}; steerlab knows "
        f"{', '.join(_KNOWN_PATHS)}. Open an issue with the model id, or load it yourself "
        "and pass LoadedModel(..., layers=<the nn.ModuleList of decoder blocks>)."
    )


def check_layers(layers: list[int], n_layers: int) -> list[int]:
    """Validate and normalise layer indices (negative counts from the end)."""
    out = []
    for layer in layers:
        idx = layer + n_layers if layer < 0 else layer
        if not 0 <= idx < n_layers:
            raise LayerError(
                f"layer {layer} is out of range: this model has {n_layers} layers, "
                f"numbered 0..{n_layers - 1} (negative numbers count from the end)"
            )
        out.append(idx)
    return sorted(set(out))


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Parse a layer spec: ``12``, ``10,12,14``, ``4:24:2`` (python slice), ``all``."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layers))
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if ":" in part:
                bits = [int(b) if b else None for b in part.split(":")]
                out.extend(range(n_layers)[slice(*bits)])
            else:
                out.append(int(part))
    except ValueError:
        raise LayerError(
            f"cannot read layer spec {spec!r}: use a number (12), a list (10,12,14), "
            "a range start:stop:step (4:24:2) or 'all'"
        ) from None
    return check_layers(out, n_layers)
