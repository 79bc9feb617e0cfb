"""Compare direction estimators (mean_diff, pca, probe) on one contrast set, layer by layer.

For each layer: the cosine similarity between the directions the methods find on all pairs,
and each method's held-out separation accuracy -- K-fold over *pairs* (a pair's two texts stay
in the same fold): fit the direction on the training pairs, put the threshold halfway between
the training positives' and negatives' mean projections, and count held-out texts that land
on the right side. Activations are computed once for every layer. Prints nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any

import torch

from .errors import SteeringError
from .extract import pooled_activations
from .methods import get_method

if TYPE_CHECKING:
    from .models import LoadedModel

DEFAULT_METHODS = ("mean_diff", "pca", "probe")


@dataclass(frozen=True)
class LayerComparison:
    layer: int
    cosine: dict[tuple[str, str], float]  # (method a, method b) -> cos(direction a, direction b)
    accuracy: dict[str, float]  # method -> held-out accuracy in [0, 1]


def _folds(n: int, k: int) -> list[list[int]]:
    k = max(2, min(k, n))
    return [list(range(i, n, k)) for i in range(k)]


def held_out_accuracy(pos: torch.Tensor, neg: torch.Tensor, method: str, *, folds: int = 5) -> float:
    """K-fold accuracy of ``method``'s direction as a linear classifier (pairs kept together)."""
    _, fn = get_method(method)
    n = min(len(pos), len(neg))
    if n < 2:
        raise SteeringError("held-out accuracy needs at least 2 pairs")
    correct = total = 0
    for test in _folds(n, folds):
        train = [i for i in range(n) if i not in set(test)]
        d = fn(pos[train], neg[train]).float()
        thr = ((pos[train] @ d).mean() + (neg[train] @ d).mean()) / 2
        correct += int(((pos[test] @ d) > thr).sum()) + int(((neg[test] @ d) <= thr).sum())
        total += 2 * len(test)
    return correct / total


def compare_methods(
    lm: LoadedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    layers: Sequence[int],
    methods: Sequence[str] = DEFAULT_METHODS,
    pooling: str = "mean",
    chat: bool = False,
    folds: int = 5,
    batch_size: int = 16,
    progress: bool = False,
) -> Iterator[LayerComparison]:
    """Yield one :class:`LayerComparison` per layer (paired texts: pca needs pairs)."""
    if len(positive) != len(negative):
        raise SteeringError(f"compare-methods needs paired texts, got {len(positive)} positives and "
                            f"{len(negative)} negatives")
    kw: dict[str, Any] = dict(pooling=pooling, chat=chat, batch_size=batch_size, progress=progress)
    pos, _ = pooled_activations(lm, list(positive), layers, desc="compare +", **kw)
    neg, _ = pooled_activations(lm, list(negative), layers, desc="compare -", **kw)
    for layer in sorted(pos):
        dirs = {}
        for m in methods:
            d = get_method(m)[1](pos[layer], neg[layer]).float()
            dirs[m] = d / d.norm().clamp_min(1e-12)
        cos = {(a, b): float(dirs[a] @ dirs[b]) for a, b in combinations(methods, 2)}
        acc = {m: held_out_accuracy(pos[layer], neg[layer], m, folds=folds) for m in methods}
        yield LayerComparison(layer=layer, cosine=cos, accuracy=acc)
