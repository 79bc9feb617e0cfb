"""Small builders shared by tests (not fixtures)."""

from __future__ import annotations

import torch

from steerlab import SteeringVector


def random_vector(lm, layers, *, seed: int = 0, name: str = "rand", strength: float = 1.0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    dirs = {}
    for layer in layers:
        d = torch.randn(lm.hidden_size, generator=g)
        dirs[layer] = d / d.norm()
    return SteeringVector(directions=dirs, norms={layer: 2.0 for layer in layers}, model_id=lm.model_id,
                          name=name, default_strength=strength)


def hidden_states(lm, text: str) -> tuple[torch.Tensor, ...]:
    enc = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return lm.model(**enc, output_hidden_states=True).hidden_states


def logits(lm, texts) -> torch.Tensor:
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        return lm.model(**enc).logits
