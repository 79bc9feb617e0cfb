"""Where a concept lives across layers, and how vectors relate: facts about directions.

* :func:`layer_profile`: per layer, how well the direction separates *held-out* positive from
  negative texts (the cross-validated AUC of :func:`steerlab.evaluate.layer_signal`), and the
  cosine between this layer's direction and the next one's (a concept that is "the same
  direction" over a band of layers shows as a plateau of high cosines).
* :func:`similarity`: the cosine matrix of several vectors at every layer they share.

Forward passes only (the profile); prints nothing, draws nothing (see :mod:`steerlab.glass_plots`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import SteeringError
from .vectors import SteeringVector

if TYPE_CHECKING:
    from .models import LoadedModel


@dataclass(frozen=True)
class LayerProfileRow:
    layer: int
    auc: float  # cross-validated P(held-out positive projects above held-out negative)
    effect: float  # Cohen's d of the held-out projections
    cos_next: float | None  # cosine with the vector's direction at the next layer it has

    def to_dict(self) -> dict:
        return {"layer": self.layer, "auc": round(self.auc, 4), "effect": round(self.effect, 3),
                "cos_next": None if self.cos_next is None else round(self.cos_next, 4)}


def _unit(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return t / t.norm().clamp_min(1e-12)


def neighbour_cosines(vec: SteeringVector) -> dict[int, float | None]:
    """Per layer, cosine of its direction with the next layer's (None for the last)."""
    layers = vec.layers
    out: dict[int, float | None] = {}
    for a, b in zip(layers, [*layers[1:], None]):
        out[a] = None if b is None else float(_unit(vec.directions[a]) @ _unit(vec.directions[b]))
    return out


def layer_profile(lm: LoadedModel, vec: SteeringVector, positive: Sequence[str], negative: Sequence[str], *,
                  layers: Sequence[int] | None = None, pooling: str | None = None, chat: bool | None = None,
                  folds: int = 2) -> list[LayerProfileRow]:
    """Held-out separation and neighbour cosine per layer of ``vec`` (default: all its layers).

    The AUC comes from directions re-estimated on the other folds of ``positive``/``negative``
    (with the vector's own method and pooling), so it measures the contrast set, not ``vec``'s
    stored direction; ``cos_next`` is about ``vec`` itself.
    """
    from .evaluate import layer_signal
    from .methods import estimator_of

    use = sorted(layers) if layers is not None else vec.layers
    pool = pooling or (vec.pooling.split(":")[0] if vec.pooling else "mean")
    use_chat = chat if chat is not None else vec.pooling.endswith(":chat")
    signal = {s.layer: s for s in layer_signal(lm, positive, negative, use, pooling=pool, chat=use_chat,
                                                method=estimator_of(vec.method), folds=folds)}
    cos = neighbour_cosines(vec)
    return [LayerProfileRow(x, signal[x].auc, signal[x].effect, cos.get(x)) for x in use]


@dataclass(frozen=True)
class Similarity:
    """Cosine matrices of ``names`` at each shared layer, and their mean over those layers."""

    names: tuple[str, ...]
    layers: tuple[int, ...]
    per_layer: dict[int, torch.Tensor]  # [K, K]

    @property
    def mean(self) -> torch.Tensor:
        return torch.stack([self.per_layer[x] for x in self.layers]).mean(0)

    def pairs(self) -> list[tuple[str, str]]:
        n = self.names
        return [(n[i], n[j]) for i in range(len(n)) for j in range(i + 1, len(n))]

    def to_dict(self) -> dict:
        return {"names": list(self.names), "layers": list(self.layers),
                "per_layer": {str(x): [[round(float(v), 4) for v in row] for row in self.per_layer[x]]
                              for x in self.layers},
                "mean": [[round(float(v), 4) for v in row] for row in self.mean]}


def similarity(vectors: Sequence[SteeringVector], *, layers: Sequence[int] | None = None) -> Similarity:
    """Cosine similarity of the vectors' directions at every layer they all have (or ``layers``)."""
    if len(vectors) < 2:
        raise SteeringError("give at least two vectors to compare")
    if len({v.hidden_size for v in vectors}) != 1:
        raise SteeringError(f"vectors of different hidden sizes cannot be compared: "
                            f"{ {v.name: v.hidden_size for v in vectors} }")
    shared = set(vectors[0].directions)
    for v in vectors[1:]:
        shared &= set(v.directions)
    use = sorted(shared if layers is None else shared & set(layers))
    if not use:
        raise SteeringError("the vectors share no layer" + ("" if layers is None else f" among {list(layers)}")
                            + "; " + ", ".join(f"{v.name}: {v.layers}" for v in vectors))
    per_layer = {}
    for x in use:
        m = torch.stack([_unit(v.directions[x]) for v in vectors])
        per_layer[x] = m @ m.T
    return Similarity(tuple(v.name for v in vectors), tuple(use), per_layer)
