"""Direction estimators: plain functions from (positive, negative) activations to a direction.

Each takes ``pos [N, H]`` and ``neg [M, H]`` fp32 tensors for one layer and returns an ``[H]``
direction pointing from negative toward positive (not necessarily unit length). Register your
own by adding a callable to :data:`METHODS` or passing one to ``build_vector(method=...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import SteeringError

Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Difference of class means (the seed's method)."""
    return pos.double().mean(0).float() - neg.double().mean(0).float()


def pca(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """First principal direction of the *paired* differences ``pos[i] - neg[i]``.

    Uncentred (the common offset is the signal we want), computed with a full deterministic
    SVD in float64, then sign-aligned so positives project above negatives.
    """
    if pos.shape != neg.shape:
        raise SteeringError(
            f"pca needs paired texts: got {pos.shape[0]} positives and {neg.shape[0]} negatives; "
            "give the same number of each, or use method='mean_diff'"
        )
    diffs = (pos - neg).double()
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    direction = vh[0]
    if (diffs @ direction).mean() < 0:
        direction = -direction
    return direction.float()


def probe(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Weight vector of an L2-regularised logistic-regression probe (positive = 1).

    Features are standardised for conditioning; the weight is mapped back to the raw
    residual basis so it is a direction in activation space.
    """
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
    lam = 1.0  # strong ridge: contrast sets are small (tens of texts) next to hidden sizes (hundreds)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + lam * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (w.detach() / sd).float()


METHODS: dict[str, Method] = {"mean_diff": mean_diff, "pca": pca, "probe": probe}


def estimator_of(method: str) -> str:
    """The plain estimator behind a vector's ``method``: the one to re-estimate its direction with
    (``optimize`` and ``mean_centred`` start from the mean difference)."""
    return method if method in METHODS else "mean_diff"


def get_method(method: str | Method) -> tuple[str, Method]:
    """Look a method up by name (or pass a callable through)."""
    if callable(method):
        return getattr(method, "__name__", "custom"), method
    if method not in METHODS:
        raise SteeringError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return method, METHODS[method]
