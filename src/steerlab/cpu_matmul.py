"""Decode-step matrix products on CPU in the form the BLAS runs fastest.

Each generation step multiplies a few rows (one per batch row) by every weight matrix, so on a
CPU the step is bound by streaming the weights from memory. PyTorch computes
``F.linear(x, W)`` as a matrix-vector product (one row) or as a product with a transposed
operand (several rows). With the MKL in PyTorch's CPU wheels on the AMD EPYC machines we develop
on, both stream the weights at about 10 GB/s, while ``mm(W, x.T)`` with 2-8 columns streams
them at about 28 GB/s. Measured on SmolLM2-135M, 32 new tokens: batch 2 took 3.2 s with
``F.linear`` and 1.8 s this way, batch 8 6.4 s and 2.8 s, with the same greedy tokens.

:func:`decode_matmuls` swaps the forward of a model's plain ``nn.Linear`` modules for the
duration of a ``with`` block (a generation), for inputs of at most :data:`SMALL_ROWS` rows; prompt
prefill and extraction keep ``F.linear``. Whether it pays is measured once per loaded model on
its largest weight matrix (about 0.3 s), so a machine where the BLAS's own choice is as fast keeps
it. ``STEERLAB_CPU_MATMUL=off`` (or ``on``) skips the measurement.

Inside a compiled decode step (:mod:`steerlab.compiled`) a one-row product is written as a multiply
and a row sum instead: inductor turns it into one vectorised loop that streams the weights, fused
with the norm or activation that feeds it. One thread, load ~2: SmolLM2's 211 products took 38 ms
that way against 58 ms through ``F.linear`` (the tied 113 MB output head alone 7.2 ms against 14.1 ms).
Sums run in another order, so logits differ from ``F.linear``'s in the last bits (docs/performance.md).
"""

from __future__ import annotations

import functools
import os
import time
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .models import LoadedModel

SMALL_ROWS = 8  # decode steps of batches up to this size; more rows are compute-bound anyway
_ENV = "STEERLAB_CPU_MATMUL"
# per model (weights), measured on its first CPU generation: (1 row, 2-8 rows) faster as mm(W, x.T)
_MEASURED: weakref.WeakKeyDictionary[nn.Module, tuple[bool, bool]] = weakref.WeakKeyDictionary()


def _mm(x: torch.Tensor, weight: torch.Tensor, one_as_two: bool) -> torch.Tensor:
    # Row-major in and out: a transposed (column-major) result fed to the next layer made its
    # product 3.4x slower (573 vs 169 us for SmolLM2's down_proj at batch 2).
    if x.shape[0] == 1 and one_as_two:  # a 2-column product beats the matrix-vector one here
        return torch.mm(weight, torch.cat([x, x]).t())[:, :1].t().contiguous()
    return torch.mm(weight, x.contiguous().t()).t().contiguous()


def _timed_pair(a: Callable[[], object], b: Callable[[], object], reps: int = 5) -> tuple[float, float]:
    """Best-of-``reps`` seconds of ``a`` and ``b``, alternating, so a busy moment hits both alike
    (timed one after the other, a neighbour's burst could flip the choice for the model's lifetime)."""
    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for i, fn in enumerate((a, b)):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0], best[1]


def measure(weight: torch.Tensor) -> tuple[bool, bool]:
    """(faster for 1 row, faster for 2-8 rows): ``mm(W, x.T)`` against ``F.linear`` on ``weight``."""
    x = {m: torch.randn(m, weight.shape[1], dtype=weight.dtype) for m in (1, 2, 4, 8)}
    with torch.no_grad():
        F.linear(x[2], weight), _mm(x[2], weight, True)  # warm-up
        mm1, lin1 = _timed_pair(functools.partial(_mm, x[1], weight, True), functools.partial(F.linear, x[1], weight))
        few = [_timed_pair(functools.partial(_mm, x[m], weight, True), functools.partial(F.linear, x[m], weight))
               for m in (2, 4, 8)]
    return mm1 < 0.8 * lin1, sum(f[0] for f in few) < 0.8 * sum(f[1] for f in few)


def _choice(lm: LoadedModel) -> tuple[bool, bool]:
    """Whether to use ``mm(W, x.T)`` for 1 row and for 2-8 rows on this model (measured once)."""
    mode = os.environ.get(_ENV, "auto").strip().lower()
    if mode in ("off", "0", "false") or lm.device.type != "cpu" or lm.dtype != torch.float32:
        return False, False
    if mode in ("on", "1", "true"):
        return True, True
    if lm.model not in _MEASURED:
        linears = [m for m in lm.model.modules() if type(m) is nn.Linear]
        largest = max(linears, key=lambda m: m.weight.numel()).weight if linears else None
        _MEASURED[lm.model] = measure(largest) if largest is not None else (False, False)
    return _MEASURED[lm.model]


def _forward(one: bool, few: bool) -> Callable[[nn.Linear, torch.Tensor], torch.Tensor]:
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() >= 2 else SMALL_ROWS + 1
        if rows == 1 and x.dtype == self.weight.dtype and torch.compiler.is_compiling():
            y = (self.weight * x.reshape(1, -1)).sum(-1)  # inductor: one streaming loop over W (see above)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if rows > SMALL_ROWS or not (one if rows == 1 else few) or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        y = _mm(x.reshape(rows, x.shape[-1]), self.weight, one)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return forward


@contextmanager
def decode_matmuls(lm: LoadedModel) -> Iterator[None]:
    """Inside: small-row products of ``lm``'s plain ``nn.Linear`` layers run as ``mm(W, x.T)`` where faster."""
    one, few = _choice(lm)
    if not (one or few or lm.slots is not None):  # a compiled decode step always takes the row-sum form
        yield
        return
    forward = _forward(one, few)
    patched = []
    try:
        for m in lm.model.modules():
            if type(m) is nn.Linear and "forward" not in m.__dict__:  # subclasses (quantised) keep theirs
                m.forward = types.MethodType(forward, m)  # type: ignore[method-assign]  # undone in finally
                patched.append(m)
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
