"""The only place that registers forward hooks on a model.

Kinds of hook, all handed out as context managers that always remove what they added:

* :func:`steer` applies resolved steering entries (:mod:`steerlab.spec`) to decoder-block outputs.
  Each row of a batch may carry its own vectors, doses and operators (the server and the sweeps
  batch different steering together). Tensors are built once, on the model's device and dtype,
  when the context opens; for plain adds at every position the hook is one add (no per-step
  allocation beyond the result, no transfers); other operators cost a projection per token.
* :func:`capture` records block outputs for extraction and can stop the forward pass right
  after the deepest layer asked for, so extraction never runs layers it does not need.
* :func:`watch` records, at every forward call, the last position's projection on some
  directions (readings and text conditions while generating; :mod:`steerlab.conditional`).
* :func:`add_at_front` adds a per-position tensor to the first positions of one block's output
  (ActAdd's injection; used by :mod:`steerlab.actadd`).

Transformers versions differ in what a decoder block returns (a tensor, or a tuple whose first
item is the hidden state); both hooks accept either and return the same kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

import torch
from torch import nn

from .errors import SteeringError
from .layers import check_layers
from .spec import SINK_RATIO, Resolved, Steer, SteerLike, as_steer, check_positions, resolve, resolve_rows

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from .compiled import DecodeSlots
    from .models import LoadedModel

__all__ = ["Hook", "Positions", "RowSteering", "Steer", "SteerLike", "add_at_front", "add_trainable", "as_steer",
           "build_deltas", "capture", "run_until_captured", "steer", "steering_rows", "watch"]

Hook = Callable[..., Any]  # a forward hook; a block's output is a tensor or a tuple (hidden state first)
Positions = Literal["all", "prompt", "generated"]
RowSteering: TypeAlias = Sequence[SteerLike]


def steering_rows(steering: RowSteering | Sequence[RowSteering] | None, n_rows: int | None = None) -> list[list[Any]]:
    """Normalise steering to one list per row. Per-row form: a list of *lists*.

    A flat list (vectors, ``Steer`` or ``(vector, strength)`` items) is one row that every
    batch row shares. ``n_rows`` checks the per-row form against the batch size.
    """
    if steering is None:
        return [[]]
    items = list(steering)
    if items and all(isinstance(r, list) for r in items):
        if n_rows is not None and len(items) != n_rows:
            raise SteeringError(f"{n_rows} prompts but steering for {len(items)} rows")
        return cast("list[list[Any]]", items)
    return [items]


def _check_hidden(lm: LoadedModel, resolved: Resolved) -> None:
    vec = resolved.steer.vector
    if vec.hidden_size != lm.hidden_size:
        raise SteeringError(f"vector {vec.name} has hidden size {vec.hidden_size}, the model {lm.hidden_size}: "
                            f"it was built for {vec.model_id}")


def build_deltas(lm: LoadedModel, rows: Sequence[RowSteering], *, device: torch.device, dtype: torch.dtype,
                 positions: str | int = "all") -> dict[int, torch.Tensor]:
    """Per layer, a ``[rows, 1, hidden]`` tensor summing every row's steering (add operator only).

    For engines that can only add a fixed vector (vLLM): any other operator is refused with its reason.
    """
    acc: dict[int, torch.Tensor] = {}
    for r, row in enumerate(rows):
        for res in (resolve(item, lm.n_layers, positions=positions) for item in row):
            _check_hidden(lm, res)
            if res.operator != "add" or res.governor or res.gated:
                what = "the governor" if res.governor else "a condition on the text" if res.gated else \
                    f"operator {res.operator!r}"
                raise SteeringError(f"{what} needs the hidden state at every step; this engine can only add a "
                                    "fixed vector: use operator 'add' without governor, or the transformers engine")
            for t in res.terms:
                acc.setdefault(t.layer, torch.zeros(len(rows), 1, lm.hidden_size, dtype=torch.float32))
                acc[t.layer][r, 0] += t.direction
    return {layer: t.to(device=device, dtype=dtype) for layer, t in acc.items()}


def _fit_rows(d: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Match per-row tensors to the batch (beam search / several returns expand rows)."""
    n = hidden.shape[0]
    if d.shape[0] == 1 or d.shape[0] == n:
        return d
    if n % d.shape[0]:
        raise SteeringError(f"steering was set up for {d.shape[0]} rows but the model got a batch of {n}")
    return d.repeat_interleave(n // d.shape[0], dim=0)


@dataclass
class _Group:
    """Terms of one operator and positions rule, one per row at most (absent rows: ``on`` = 0)."""

    operator: str
    positions: str | int
    u: torch.Tensor  # [rows, 1, H]: unit direction, or the add delta
    amount: torch.Tensor  # [rows, 1, 1]
    baseline: torch.Tensor  # [rows, 1, 1]
    norm: torch.Tensor  # [rows, 1, 1]
    on: torch.Tensor  # [rows, 1, 1] 1 where the row has this term
    slot: int | None = None  # entry index whose gate (``steer(gate=)``) switches these terms on and off

    def to(self, device: torch.device, dtype: torch.dtype) -> _Group:
        f = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return _Group(self.operator, self.positions, f(self.u), f(self.amount), f(self.baseline), f(self.norm),
                      f(self.on), self.slot)


def _position_mask(positions: str | int, hidden: torch.Tensor,
                   position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """[rows or 1, T, 1] mask of the positions to steer (None: all of them)."""
    # "prompt": every position of a pass that reads the prompt; _apply skips one-token decoding steps first
    if positions in ("all", "prompt"):
        return None
    t = hidden.shape[1]
    if positions == "generated":
        if t == 1:
            return None
        m = torch.zeros(1, t, 1, dtype=hidden.dtype, device=hidden.device)
        m[:, -1] = 1
        return m
    if position_ids is None:
        if t == 1:
            return None  # a cached step without positions: past any front the prompt covered
        position_ids = torch.arange(t, device=hidden.device)[None]
    return (position_ids.to(hidden.device) >= int(positions)).to(hidden.dtype)[..., None]


def _apply(g: _Group, h: torch.Tensor, gain: torch.Tensor | None, position_ids: torch.Tensor | None,
           gate: torch.Tensor | None = None) -> torch.Tensor:
    """One group's operator on hidden states ``h`` [rows, T, H] (formulas: :mod:`steerlab.spec`)."""
    if g.positions == "prompt" and h.shape[1] == 1:  # a decoding step: nothing of this group applies
        return h
    fit = lambda t: _fit_rows(t, h)  # noqa: E731
    u, amount, on = fit(g.u), fit(g.amount), fit(g.on)
    if g.slot is not None and gate is not None:  # a closed gate is "no term" (not amount 0: target would still act)
        on = on * fit(gate[:, g.slot : g.slot + 1])
    if gain is not None:
        amount = amount * fit(gain)
    mask = _position_mask(g.positions, h, position_ids)
    if mask is not None:
        on = on * mask
    if g.operator in ("add", "add_norm"):
        new = h + u * (amount * on)
        if g.operator == "add_norm":
            ratio = h.float().norm(dim=-1, keepdim=True) / new.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
            new = torch.where(on > 0, new * ratio.to(new.dtype), h)
        return new
    hn = h.float().norm(dim=-1, keepdim=True)
    on = on * (hn < SINK_RATIO * fit(g.norm).float()).to(on.dtype)  # leave attention sinks alone
    proj = (h * u).sum(-1, keepdim=True)
    if g.operator == "target":
        change = (fit(g.baseline) + amount - proj).clamp_min(0)
    elif g.operator == "cap":
        lo = fit(g.baseline) + amount.clamp(max=0)
        hi = fit(g.baseline) + amount.clamp(min=0)
        change = torch.maximum(torch.minimum(proj, hi), lo) - proj
    else:  # rotate toward sign(amount) * u by |amount| radians, never past it
        sign = torch.where(amount < 0, -1.0, 1.0).to(h.dtype)
        uu = (u * sign).float()
        a = (proj * sign).float()
        w = h.float() - a * uu
        b = w.norm(dim=-1, keepdim=True)
        phi2 = (torch.atan2(b, a) - amount.abs().float()).clamp_min(0)
        rotated = hn * (torch.cos(phi2) * uu + torch.sin(phi2) * w / b.clamp_min(1e-6))
        return torch.where(on > 0, rotated.to(h.dtype), h)
    return h + change * u * on


def _make_steer_hook(add: torch.Tensor | None, groups: list[_Group], gain: torch.Tensor | None,
                     gate: torch.Tensor | None = None) -> Hook:
    """A forward hook on one block: the summed plain adds, then each operator group in order."""
    if not groups and gain is None and add is not None:
        # Hot path (every block call of every decoding step): one add, nothing else.
        def plain(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if type(output) is tuple:
                return (output[0] + _fit_rows(add, output[0]), *output[1:])
            return output + _fit_rows(add, output)

        return plain

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if add is not None:
            hidden = hidden + _fit_rows(add if gain is None else add * gain, hidden)
        for g in groups:
            hidden = _apply(g, hidden, gain, kwargs.get("position_ids"), gate)
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    return hook


def plan(lm: LoadedModel,
         rows: Sequence[Sequence[Resolved]]) -> tuple[dict[int, torch.Tensor], dict[int, list[_Group]]]:
    """Per layer: the summed plain adds (all positions) and the operator groups, on CPU in fp32."""
    n, hsz = len(rows), lm.hidden_size
    adds: dict[int, torch.Tensor] = {}
    groups: dict[tuple, _Group] = {}
    for r, row in enumerate(rows):
        for j, res in enumerate(row):
            _check_hidden(lm, res)
            for t in res.terms:
                if t.operator == "add" and t.positions == "all" and not res.gated:
                    adds.setdefault(t.layer, torch.zeros(n, 1, hsz))[r, 0] += t.direction
                    continue
                key = (t.layer, j, t.operator, str(t.positions), res.gated)
                if key not in groups:
                    z = lambda k: torch.zeros(n, 1, k)  # noqa: E731
                    groups[key] = _Group(t.operator, t.positions, z(hsz), z(1), z(1), z(1), z(1),
                                         j if res.gated else None)
                g = groups[key]
                g.u[r, 0] = t.direction
                g.amount[r, 0], g.baseline[r, 0], g.norm[r, 0], g.on[r, 0] = t.amount, t.baseline, t.norm, 1.0
    by_layer: dict[int, list[_Group]] = {}
    for key in sorted(groups, key=lambda k: (k[0], k[1])):
        by_layer.setdefault(key[0], []).append(groups[key])
    return adds, by_layer


@contextmanager
def steer(
    lm: LoadedModel,
    steering: RowSteering | Sequence[RowSteering],
    *,
    positions: str | int | None = None,
    norm_preserve: bool = False,
    operator: str | None = None,
    gain: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> Iterator[list[list[Resolved]]]:
    """Steer ``lm`` inside the ``with`` block; yields the resolved entries per row.

    ``steering`` is either one list of entries applied to every row, or a list with one such
    *list* per batch row (an empty list leaves that row unsteered). ``positions`` and
    ``operator`` are call-level defaults for entries that set none (``norm_preserve`` is the
    older spelling of ``operator="add_norm"``). ``gain``: a ``[rows, 1, 1]`` tensor on the
    model's device that scales each row's steering at every step (the coherence governor
    writes it between steps). ``gate``: a ``[rows, entries, 1]`` tensor of 0/1, entry ``j`` of a
    row applies where ``gate[row, j]`` is 1 (for entries with a condition on the text so far; the
    :class:`~steerlab.conditional.TextGate` writes it between steps).
    """
    if positions is not None:
        check_positions(positions)
    rows = steering_rows(steering)
    resolved = resolve_rows(rows, lm.n_layers, positions=positions, operator=operator)
    if norm_preserve:
        resolved = [[_norm_preserving(r, lm.n_layers) for r in row] for row in resolved]
    if gate is None and any(r.gated for row in resolved for r in row):
        raise SteeringError("entries with a condition on the text need a gate: generate through "
                            "steerlab.generate (it runs the conditions)")
    adds, groups = plan(lm, resolved)
    if lm.slots is not None and not groups and gate is None:  # compiled decoding: plain adds as data
        on_model = {layer: a.to(device=lm.device, dtype=lm.dtype) for layer, a in adds.items()}
        with lm.slots.holding(on_model, gain, len(resolved)):
            yield resolved
        return
    handles = []
    try:
        for layer in sorted(set(adds) | set(groups)):
            add = adds[layer].to(device=lm.device, dtype=lm.dtype) if layer in adds else None
            hook = _make_steer_hook(add, [x.to(lm.device, lm.dtype) for x in groups.get(layer, [])], gain, gate)
            with_kwargs = bool(groups.get(layer)) or gain is not None
            handles.append(lm.layers[layer].register_forward_hook(hook, with_kwargs=with_kwargs))
        yield resolved
    finally:
        for h in handles:
            h.remove()


def slot_hooks(lm: LoadedModel, slots: DecodeSlots) -> list[RemovableHandle]:
    """The permanent hooks of compiled decoding (:mod:`steerlab.compiled`): block ``i`` adds
    ``slots.adds[i] * slots.gain``, read at every call (the same arithmetic as :func:`steer`'s adds)."""

    def make(i: int) -> Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if type(output) is tuple:
                return (output[0] + _fit_rows(slots.adds[i] * slots.gain, output[0]), *output[1:])
            return output + _fit_rows(slots.adds[i] * slots.gain, output)

        return hook

    return [block.register_forward_hook(make(i)) for i, block in enumerate(lm.layers)]


def _norm_preserving(res: Resolved, n_layers: int) -> Resolved:
    """``norm_preserve=True`` turns plain adds into ``add_norm`` (other operators keep theirs)."""
    if res.operator != "add":
        return res
    return resolve(replace(res.steer, operator="add_norm"), n_layers, positions=res.positions, governor=res.governor)


@contextmanager
def add_at_front(lm: LoadedModel, layer: int, delta: torch.Tensor) -> Iterator[None]:
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

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
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


@contextmanager
def add_trainable(lm: LoadedModel, deltas: dict[int, torch.Tensor], sign: torch.Tensor) -> Iterator[None]:
    """Add ``sign[row] * deltas[layer]`` to block outputs, keeping the autograd graph (for training
    a vector: :mod:`steerlab.optimize`). ``sign`` is a ``[rows]`` tensor of +1 / -1 / 0."""
    handles = []

    def make(delta: torch.Tensor) -> Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            new = hidden + sign.to(hidden.dtype)[:, None, None] * delta.to(hidden.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    try:
        for layer, delta in deltas.items():
            handles.append(lm.layers[check_layers([layer], lm.n_layers)[0]].register_forward_hook(make(delta)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def watch(lm: LoadedModel, dirs: dict[int, torch.Tensor]) -> Iterator[dict[int, torch.Tensor]]:
    """At every forward call, ``store[layer]`` = the last position's block output projected on
    ``dirs[layer]`` (``[K, hidden]``): a ``[rows, K]`` fp32 tensor on the model's device.

    Entered before :func:`steer`, its hook runs first, so it sees each block's output before that
    block's own steering (steering at earlier blocks still reaches it).
    """
    layers = check_layers(list(dirs), lm.n_layers)
    table = {x: dirs[x].to(device=lm.device, dtype=torch.float32).T for x in layers}
    store: dict[int, torch.Tensor] = {}

    def make(layer: int):  # noqa: ANN202
        def hook(module, args, output):  # noqa: ANN001, ANN202
            hidden = output[0] if isinstance(output, tuple) else output
            store[layer] = hidden[:, -1].float() @ table[layer]

        return hook

    handles = [lm.layers[x].register_forward_hook(make(x)) for x in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early; never escapes :func:`capture`."""


@contextmanager
def capture(lm: LoadedModel, layers: Sequence[int], *, stop_early: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of decoder blocks ``layers`` into the yielded dict.

    With ``stop_early`` the forward pass is cut after the deepest requested block: call the
    model through :func:`run_until_captured` so the stop is swallowed.
    """
    layers = check_layers(list(layers), lm.n_layers)
    deepest = max(layers)
    store: dict[int, torch.Tensor] = {}
    handles = []

    def make(layer: int) -> Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
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


def run_until_captured(lm: LoadedModel, **inputs: torch.Tensor) -> None:
    """Run a forward pass that a :func:`capture` hook may stop early."""
    try:
        lm.model(**inputs, use_cache=False)
    except _StopForward:
        pass
