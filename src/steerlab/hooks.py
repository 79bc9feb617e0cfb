"""The only place that registers forward hooks on a model.

Kinds of hook, all handed out as context managers that always remove what they added:

* :func:`steer` adds per-layer steering to decoder-block outputs. Each row of a batch may carry
  its own vectors and strengths (the server and the sweeps batch different steering together).
  The additive tensors are built once, on the model's device and dtype, when the context opens;
  the hook itself is one add (no per-step allocation beyond the result, no transfers).
* :func:`capture` records block outputs for extraction and can stop the forward pass right
  after the deepest layer asked for, so extraction never runs layers it does not need.
* :func:`add_at_front` adds a per-position tensor to the first positions of one block's output
  (ActAdd's injection; used by :mod:`steerlab.actadd`).

Transformers versions differ in what a decoder block returns (a tensor, or a tuple whose first
item is the hidden state); both hooks accept either and return the same kind.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Union

import torch

from .errors import SteeringError
from .layers import check_layers
from .vectors import SteeringVector

Positions = Literal["all", "generated"]


@dataclass(frozen=True)
class Steer:
    """One vector at one dose. ``strength`` in residual-norm units, or absolute ``scale``."""

    vector: SteeringVector
    strength: float | None = None
    scale: float | None = None
    layers: tuple[int, ...] | None = None


SteerLike = Union[Steer, SteeringVector, tuple]
RowSteering = Sequence[SteerLike]


def as_steer(item: SteerLike) -> Steer:
    """Accept ``Steer``, a bare vector (default dose) or ``(vector, strength)``."""
    if isinstance(item, Steer):
        return item
    if isinstance(item, SteeringVector):
        return Steer(item)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], SteeringVector):
        return Steer(item[0], strength=float(item[1]))
    raise SteeringError(f"cannot steer with {item!r}: give a SteeringVector, (vector, strength) or Steer")


def steering_rows(steering: RowSteering | Sequence[RowSteering] | None, n_rows: int | None = None) -> list[list]:
    """Normalise steering to one list per row. Per-row form: a list of *lists*.

    A flat list (vectors, ``Steer`` or ``(vector, strength)`` items) is one row that every
    batch row shares. ``n_rows`` checks the per-row form against the batch size.
    """
    if steering is None:
        return [[]]
    steering = list(steering)
    if steering and all(isinstance(r, list) for r in steering):
        if n_rows is not None and len(steering) != n_rows:
            raise SteeringError(f"{n_rows} prompts but steering for {len(steering)} rows")
        return steering
    return [steering]


def build_deltas(
    lm, rows: Sequence[RowSteering], *, device: torch.device, dtype: torch.dtype
) -> dict[int, torch.Tensor]:
    """Per layer, a ``[rows, 1, hidden]`` tensor summing every row's steering at that layer."""
    hidden = lm.hidden_size
    acc: dict[int, torch.Tensor] = {}
    for r, row in enumerate(rows):
        for item in row:
            st = as_steer(item)
            if st.vector.hidden_size != hidden:
                raise SteeringError(
                    f"vector {st.vector.name} has hidden size {st.vector.hidden_size}, the model {hidden}: "
                    f"it was built for {st.vector.model_id}"
                )
            layers = check_layers(list(st.layers), lm.n_layers) if st.layers else None
            for layer, d in st.vector.deltas(strength=st.strength, scale=st.scale, layers=layers).items():
                check_layers([layer], lm.n_layers)
                if layer not in acc:
                    acc[layer] = torch.zeros(len(rows), 1, hidden, dtype=torch.float32)
                acc[layer][r, 0] += d
    return {layer: t.to(device=device, dtype=dtype) for layer, t in acc.items()}


def _fit_rows(d: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Match the delta's rows to the batch (beam search / several returns expand rows)."""
    n = hidden.shape[0]
    if d.shape[0] == 1 or d.shape[0] == n:
        return d
    if n % d.shape[0]:
        raise SteeringError(f"steering was set up for {d.shape[0]} rows but the model got a batch of {n}")
    return d.repeat_interleave(n // d.shape[0], dim=0)


def _make_steer_hook(delta: torch.Tensor, positions: Positions, norm_preserve: bool):
    """A forward hook adding ``delta`` ([rows or 1, 1, hidden]) to a block's output."""
    if positions == "all" and not norm_preserve:
        # Hot path (every block call of every decoding step): one add, nothing else.
        def add(module, args, output):  # noqa: ANN001, ANN202
            if type(output) is tuple:
                return (output[0] + _fit_rows(delta, output[0]), *output[1:])
            return output + _fit_rows(delta, output)

        return add

    def hook(module, args, output):  # noqa: ANN001, ANN202
        hidden = output[0] if isinstance(output, tuple) else output
        d = _fit_rows(delta, hidden)
        if positions == "generated" and hidden.shape[1] > 1:
            # Prefill: leave the prompt alone, steer only the position that predicts token 1.
            new = torch.cat([hidden[:, :-1], hidden[:, -1:] + d], dim=1)
        else:
            new = hidden + d
        if norm_preserve:
            ratio = hidden.float().norm(dim=-1, keepdim=True) / new.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
            new = new * ratio.to(new.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        return new

    return hook


@contextmanager
def steer(
    lm,
    steering: RowSteering | Sequence[RowSteering],
    *,
    positions: Positions = "all",
    norm_preserve: bool = False,
) -> Iterator[None]:
    """Steer ``lm`` inside the ``with`` block.

    ``steering`` is either one list of vectors/doses applied to every row, or a list with one
    such *list* per batch row (an empty list leaves that row unsteered). ``positions``: ``all``
    (every token, the seed's behaviour) or ``generated`` (only the positions that produce new
    tokens). ``norm_preserve`` rescales each steered hidden state back to its original norm.
    """
    if positions not in ("all", "generated"):
        raise SteeringError(f"positions must be 'all' or 'generated', not {positions!r}")
    rows = steering_rows(steering)
    deltas = build_deltas(lm, rows, device=lm.device, dtype=lm.dtype)
    handles = []
    try:
        for layer, delta in deltas.items():
            hook = _make_steer_hook(delta, positions, norm_preserve)
            handles.append(lm.layers[layer].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def add_at_front(lm, layer: int, delta: torch.Tensor) -> Iterator[None]:
    """Add ``delta[p]`` (``delta`` is ``[n, hidden]``) to block ``layer``'s output at positions ``p < n``.

    ActAdd's injection (see :mod:`steerlab.actadd`): the front of the sequence only, so cached
    generation steps (positions >= n) are left alone. Positions are the block's ``position_ids``
    when the model passes them, else a multi-token pass is taken to start at 0; one prompt at a
    time, or equal-length prompts (left padding would shift the front).
    """
    (layer,) = check_layers([layer], lm.n_layers)
    if delta.dim() != 2 or delta.shape[1] != lm.hidden_size:
        raise SteeringError(f"delta must be [positions, {lm.hidden_size}], got {list(delta.shape)}")
    d = delta.to(device=lm.device, dtype=lm.dtype)
    n = d.shape[0]

    def hook(module, args, kwargs, output):  # noqa: ANN001, ANN202
        hidden = output[0] if isinstance(output, tuple) else output
        pos = kwargs.get("position_ids")
        if pos is None:
            if hidden.shape[1] == 1:  # a cached step: past the front when the prompt covered it
                return output
            pos = torch.arange(hidden.shape[1], device=hidden.device)
        pos = pos.to(hidden.device).expand(hidden.shape[0], hidden.shape[1])
        if int(pos.min()) == 0 and int(pos.max()) < n - 1:
            raise SteeringError(f"the prompt has {int(pos.max()) + 1} tokens but the ActAdd steering spans {n}: "
                                "use a longer prompt (or a single-vector pair vector)")
        inside = (pos >= 0) & (pos < n)
        if not bool(inside.any()):
            return output
        new = hidden + d[pos.clamp(0, n - 1)] * inside[..., None].to(hidden.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        return new

    handle = lm.layers[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early; never escapes :func:`capture`."""


@contextmanager
def capture(lm, layers: Sequence[int], *, stop_early: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of decoder blocks ``layers`` into the yielded dict.

    With ``stop_early`` the forward pass is cut after the deepest requested block: call the
    model through :func:`run_until_captured` so the stop is swallowed.
    """
    layers = check_layers(list(layers), lm.n_layers)
    deepest = max(layers)
    store: dict[int, torch.Tensor] = {}
    handles = []

    def make(layer: int):  # noqa: ANN202
        def hook(module, args, output):  # noqa: ANN001, ANN202
            store[layer] = output[0] if isinstance(output, tuple) else output
            if stop_early and layer == deepest:
                raise _StopForward

        return hook

    try:
        for layer in layers:
            handles.append(lm.layers[layer].register_forward_hook(make(layer)))
        yield store
    finally:
        for h in handles:
            h.remove()


def run_until_captured(lm, **inputs: torch.Tensor) -> None:
    """Run a forward pass that a :func:`capture` hook may stop early."""
    try:
        lm.model(**inputs, use_cache=False)
    except _StopForward:
        pass
