"""One steering entry, and the one resolver that turns it into what the hooks apply.

A :class:`Steer` is what a request entry, a ``--steer`` flag, a vector's saved defaults and a
sweep cell all become: a vector plus *how much* (``dose``, ``strength`` or ``scale``), *how*
(``operator``), *where* (``layers``, ``positions``) and whether the coherence ``governor`` watches
the row. :func:`resolve` is the only place that fills the gaps from the vector's defaults and
turns a dose into a strength; :mod:`steerlab.hooks` only ever sees resolved :class:`Term` s.

Operators (``h`` a token's residual at layer ``l``, ``u`` the unit direction, ``n_l`` the layer's
typical residual norm, ``b_l`` the typical projection of neutral text on ``u``, ``s`` the strength):

* ``add``: ``h + s n_l u`` (classic activation addition; ``scale`` gives ``h + scale u``).
* ``add_norm``: ``add``, then rescaled back to ``|h|`` (norm-preserving).
* ``target``: ``h + max(0, b_l + s n_l - h.u) u``: raise the component along ``u`` to the target
  ``b_l + s n_l``, adding only what is missing (self-limiting: tokens already there are untouched).
* ``cap``: ``h + (clip(h.u, lo, hi) - h.u) u`` with ``[lo, hi] = b_l + [min(0, s), max(0, s)] n_l``:
  keep the component inside a range (``s < 0`` limits a concept to its neutral level).
* ``rotate``: in the plane of ``h`` and ``u``, turn ``h`` toward ``u`` by ``s x 90`` degrees (never past
  ``u``), keeping ``|h|`` (angular steering).

``target``, ``cap`` and ``rotate`` leave attention-sink tokens (norm above ``SINK_RATIO x n_l``) alone.

Condition: ``when`` (a :class:`When`) makes the entry apply only where another vector's reading
holds: on the ``prompt`` (checked once, before generating) or on the ``text`` generated so far
(re-checked at every token; :mod:`steerlab.conditional` evaluates both).

Dose: ``dose`` in ``[0, 1]`` maps linearly onto the vector's measured window for the operator
(see :mod:`steerlab.calibrate` and :func:`dose_strength`): 0 is no effect, a small dose starts at
half the measured onset (just below where the concept shows), 1 is the strongest strength that
kept the text fluent when it was measured, past 1 the text is expected to break.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeAlias

import torch

from .errors import SteeringError
from .layers import check_layers
from .vectors import SteeringVector

Operator = Literal["add", "add_norm", "target", "cap", "rotate"]
OPERATORS: tuple[str, ...] = ("add", "add_norm", "target", "cap", "rotate")
SINK_RATIO = 8.0  # a token whose residual norm is this many typical norms is an attention sink
DOSE_LIMIT = 3.0  # doses past 1 are allowed (to see the text break) up to this
DEFAULT_OPERATOR = "add"
DEFAULT_GOVERNOR = False  # for vectors never calibrated; calibration turns it on (docs/dose.md)
DEFAULT_DOSE = 0.7  # what a calibrated vector applies when no amount is given
BLEND_LIMIT = 1.7  # summed push of a blend (1 = one vector at dose 1) past which it is flagged: bench/blend_eval.py
DOSE_FLOOR = 0.5  # a dose just above 0 starts at this fraction of the onset (measured: below it nothing shows)
# where an entry steers (besides an int N: absolute positions >= N); docs/dose.md "Positions"
POSITION_NAMES: tuple[str, ...] = ("all", "prompt", "generated")


CONDITION_STATS = ("mean", "peak")
CONDITION_ON = ("prompt", "text")


@dataclass(frozen=True)
class When:
    """Apply the entry only where ``vector``'s reading (``stat`` over the tokens) is >= ``threshold``.

    ``on="prompt"``: the user's prompt, read once before generating. ``on="text"``: the reply
    generated so far, re-read at every token, so the entry switches on and off while it writes.
    ``vector`` is a :class:`~steerlab.vectors.SteeringVector`, or a name a store resolves (CLI, server).
    ``value`` and ``baseline`` are filled when the condition is decided (never set them yourself).
    """

    vector: SteeringVector | str
    threshold: float = 1.0
    stat: str = "mean"
    on: str = "prompt"
    value: float | None = None  # the prompt's reading that decided it (on="prompt")
    baseline: object | None = None  # the condition vector's neutral Baseline (on="text")

    def __post_init__(self) -> None:
        if self.stat not in CONDITION_STATS:
            raise SteeringError(f"condition stat {self.stat!r}: use mean or peak")
        if self.on not in CONDITION_ON:
            raise SteeringError(f"condition on {self.on!r}: use prompt or text")
        if not isinstance(self.threshold, (int, float)) or self.threshold != self.threshold:
            raise SteeringError(f"condition threshold {self.threshold!r} is not a number")

    @property
    def name(self) -> str:
        return self.vector if isinstance(self.vector, str) else self.vector.name

    def describe(self) -> dict:
        d = {"vector": self.name, "threshold": self.threshold, "stat": self.stat, "on": self.on}
        return d | ({} if self.value is None else {"value": round(self.value, 3)})


def parse_when(text: str) -> tuple[str, float | None]:
    """The CLI's ``if=`` value: ``NAME`` (threshold given apart, or the default) or ``NAME>=X``."""
    name, sep, value = text.partition(">=")
    try:
        if not name.strip() or any(c in name for c in "<>="):
            raise ValueError
        return name.strip(), float(value) if sep else None
    except ValueError:
        raise SteeringError(f"condition {text!r}: write NAME (with threshold=X) or NAME>=X, "
                            "e.g. tabby_cats>=1.0") from None


@dataclass(frozen=True)
class Steer:
    """One vector, how much, how and where. Unset fields come from the vector's defaults.

    Give at most one of ``dose`` (0..1 of the measured window), ``strength`` (residual-norm
    units per layer) and ``scale`` (absolute, the seed's ``STRENGTH``). ``positions``: ``all``,
    ``prompt`` (the prompt's positions only: the reply is read from a steered prompt but its own
    tokens are left alone), ``generated`` (only positions that produce new tokens) or an int ``p``
    (absolute positions >= p). ``governor``: let the coherence governor lower this row's steering when it breaks.
    ``when``: a :class:`When` condition (None: always applies).
    """

    vector: SteeringVector
    strength: float | None = None
    scale: float | None = None
    layers: tuple[int, ...] | None = None
    dose: float | None = None
    operator: str | None = None
    positions: str | int | None = None
    governor: bool | None = None
    when: When | None = None


SteerLike: TypeAlias = "Steer | SteeringVector | tuple | Resolved"


def as_steer(item: SteerLike) -> Steer:
    """Accept ``Steer``, a bare vector (default dose) or ``(vector, strength)``."""
    if isinstance(item, Steer):
        return item
    if isinstance(item, SteeringVector):
        return Steer(item)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], SteeringVector):
        return Steer(item[0], strength=float(item[1]))
    raise SteeringError(f"cannot steer with {item!r}: give a SteeringVector, (vector, strength) or Steer")


@dataclass(frozen=True)
class Term:
    """What one hook applies for one entry at one layer (fp32, CPU; the hook moves it once)."""

    layer: int
    operator: str
    direction: torch.Tensor  # unit for target/cap/rotate; for add: the full delta (s n_l u)
    amount: float  # add: 1; target/cap: s n_l; rotate: angle in radians
    baseline: float  # b_l (target, cap)
    norm: float  # n_l (sink detection)
    positions: str | int


@dataclass(frozen=True)
class Resolved:
    """A :class:`Steer` with every field decided, plus its terms."""

    steer: Steer
    dose: float | None  # the dose given, or the vector's default dose; None when a strength/scale was given
    strength: float | None
    scale: float | None
    layers: tuple[int, ...]
    operator: str
    positions: str | int
    governor: bool
    note: str  # e.g. why a dose was rescaled; "" when nothing to say
    terms: tuple[Term, ...]

    @property
    def governed(self) -> bool:
        """The governor watches this entry: it asked for it and steers decoding steps (a ``prompt``
        entry leaves them alone, so there is nothing to lower)."""
        return self.governor and self.positions != "prompt"

    def describe(self) -> dict:
        """JSON-able record of what was applied (responses, CLI)."""
        d: dict[str, Any] = {"vector": self.steer.vector.name, "operator": self.operator, "layers": list(self.layers),
             "positions": self.positions, "governor": self.governor}
        if self.dose is not None:
            d["dose"] = self.dose
        if self.scale is not None:
            d["scale"] = self.scale
        else:
            d["strength"] = round(_given(self.strength), 6)
        if self.note:
            d["note"] = self.note
        if self.steer.when is not None:
            d["when"] = self.steer.when.describe()
        return d

    @property
    def gated(self) -> bool:
        """Switched on and off while generating (a condition on the text so far)."""
        return self.steer.when is not None and self.steer.when.on == "text"


def check_positions(p: str | int) -> str | int:
    if isinstance(p, bool) or not (p in POSITION_NAMES or (isinstance(p, int) and p >= 0)):
        raise SteeringError(f"positions must be {', '.join(map(repr, POSITION_NAMES))} or a position >= 0, not {p!r}")
    return p


def parse_positions(text: str) -> str | int:
    """``all``, ``prompt``, ``generated`` or ``from:N`` / ``N`` (absolute positions >= N)."""
    t = text.strip()
    if t in POSITION_NAMES:
        return t
    try:
        return check_positions(int(t.removeprefix("from:")))
    except ValueError:
        raise SteeringError(f"positions {text!r}: use {', '.join(POSITION_NAMES)} or from:N (e.g. from:5)") from None


def window_key(operator: str, governor: bool) -> str:
    return operator + ("+governor" if governor else "")


def window(vector: SteeringVector, operator: str, governor: bool = False) -> dict | None:
    """The measured dose window of ``vector`` for ``operator`` (with or without the governor;
    see :mod:`steerlab.calibrate`). A window measured with the governor serves only governed rows."""
    return (vector.extra.get("windows") or {}).get(window_key(operator, governor))


def default_dose(vector: SteeringVector) -> float:
    return float(vector.extra.get("default_dose", DEFAULT_DOSE))


def _dose_line(w: dict) -> tuple[float, float]:
    """(strength just above dose 0, strength at dose 1) of a stored window."""
    top = float(w["max_strength"])
    onset = w.get("onset")
    return DOSE_FLOOR * (min(float(onset), top) if onset is not None else top), top


def dose_strength(w: dict, dose: float) -> float:
    """Strength for ``dose`` in a stored window: 0 at dose 0, then linear from ``lo`` to ``max_strength``.

    ``lo = DOSE_FLOOR x min(onset, max_strength)``: a linear map from 0 spent most of the slider
    below the onset (measured: doses 0-0.6 showed nothing), so the slider starts just below it.
    Negative doses mirror positive ones; past 1 the line continues (into the breaking zone).
    """
    lo, top = _dose_line(w)
    if dose == 0:
        return 0.0
    d = abs(dose)
    return (lo + d * (top - lo)) * (1 if dose > 0 else -1)


def strength_dose(w: dict, strength: float) -> float:
    """The inverse of :func:`dose_strength` for a positive strength (clamped to 0.05..1)."""
    lo, top = _dose_line(w)
    d = (strength - lo) / (top - lo) if top > lo else 1.0
    return round(min(1.0, max(0.05, d)), 3)


def dose_to_strength(vector: SteeringVector, operator: str, dose: float, layers: Sequence[int],
                     governor: bool = False, positions: str | int = "all") -> tuple[float, str]:
    """:func:`dose_strength` of the window; rescaled by layer count when ``layers`` differ, and a note
    when the window was measured at other ``positions`` (the same strength acts differently there)."""
    w = window(vector, operator, governor)
    fallback = ""
    if w is None and not governor and window(vector, operator, True) is not None:
        w = window(vector, operator, True)
        fallback = ("dose window measured with the governor, which is off here: the text may break earlier "
                    f"(`steerlab calibrate {vector.name} --no-governor` measures it without)")
    if w is None:
        flag = " --governor" if governor else ""
        raise SteeringError(
            f"{vector.name} has no measured dose window for operator {operator!r}"
            f"{' with the governor' if governor else ''}: run `steerlab calibrate {vector.name} --operator "
            f"{operator}{flag}` (or give a strength)")
    strength = dose_strength(w, dose)
    cal_layers = [int(x) for x in w["layers"]]
    note = ""
    if sorted(layers) != sorted(cal_layers):
        # Same total push spread over other layers: a first guess, not a measurement.
        strength *= len(cal_layers) / len(layers)
        note = (f"dose window measured at layers {cal_layers}; rescaled for {len(layers)} layer(s) "
                f"(calibrate for these layers to measure it)")
    measured_at = w.get("positions", "all")
    where = (f"dose window measured steering positions {measured_at!r}, not {positions!r}: the same dose acts "
             "differently here" if str(measured_at) != str(positions) else "")
    return strength, "; ".join(x for x in (fallback, note, where) if x)


def resolve(item: SteerLike, n_layers: int, *, operator: str | None = None, positions: str | int | None = None,
            governor: bool | None = None) -> Resolved:
    """Fill an entry's gaps (entry > call-level defaults given here > the vector's) and build its terms."""
    if isinstance(item, Resolved):
        return item
    st = as_steer(item)
    vec = st.vector
    cond = st.when.vector if st.when is not None else None
    if isinstance(cond, SteeringVector) and st.when is not None and cond.hidden_size != vec.hidden_size:
        raise SteeringError(f"{vec.name}: condition vector {st.when.name} has hidden size "
                            f"{cond.hidden_size}, not {vec.hidden_size}")
    given = [k for k in ("dose", "strength", "scale") if getattr(st, k) is not None]
    if len(given) > 1:
        raise SteeringError(f"{vec.name}: give one of dose, strength or scale, not {' and '.join(given)}")
    op = st.operator or operator or vec.extra.get("operator") or DEFAULT_OPERATOR
    if op not in OPERATORS:
        raise SteeringError(f"unknown operator {op!r}: use one of {', '.join(OPERATORS)}")
    pos = check_positions(st.positions if st.positions is not None else
                          positions if positions is not None else vec.extra.get("positions", "all"))
    gov = bool(st.governor if st.governor is not None else governor if governor is not None
               else vec.extra.get("governor", DEFAULT_GOVERNOR))
    layers = tuple(check_layers(list(st.layers), n_layers)) if st.layers else tuple(vec.active_layers)
    check_layers(list(layers), n_layers)
    missing = [x for x in layers if x not in vec.directions]
    if missing:
        raise SteeringError(f"{vec.name} has no direction at layers {missing}; it has {vec.layers}")
    note = ""
    strength, scale, dose = st.strength, st.scale, st.dose
    if dose is None and strength is None and scale is None and window(vec, op, gov) is not None:
        dose = default_dose(vec)  # a measured vector's default is a dose
    if dose is not None:
        if not -DOSE_LIMIT <= dose <= DOSE_LIMIT:
            raise SteeringError(f"dose {dose} is outside -{DOSE_LIMIT:g}..{DOSE_LIMIT:g} "
                                "(1 = the strongest fluent setting)")
        strength, note = dose_to_strength(vec, op, dose, layers, gov, pos)
    elif strength is None and scale is None:
        strength = vec.default_strength
    if scale is not None and op not in ("add", "add_norm"):
        raise SteeringError(f"scale is for the add operators; give {op!r} a dose or strength")
    terms = tuple(_term(vec, layer, op, strength, scale, pos) for layer in layers)
    return Resolved(st, dose, strength, scale, layers, op, pos, gov, note, terms)


def _term(vec: SteeringVector, layer: int, op: str, strength: float | None, scale: float | None,
          pos: str | int) -> Term:
    u = vec.directions[layer].float()
    n = float(vec.norms[layer])
    base = float((vec.extra.get("baselines") or {}).get(str(layer), 0.0))
    if op in ("add", "add_norm"):
        k = scale if scale is not None else _given(strength) * n
        return Term(layer, op, u * k, 1.0, 0.0, n, pos)
    unit = u / u.norm().clamp_min(1e-12)
    if op == "rotate":
        return Term(layer, op, unit, _given(strength) * torch.pi / 2, 0.0, n, pos)
    return Term(layer, op, unit, _given(strength) * n, base, n, pos)


def _given(strength: float | None) -> float:
    """A strength the resolver has filled in (every path to a term sets one)."""
    if strength is None:
        raise SteeringError("internal: a steering term without a strength")
    return float(strength)


def push(r: Resolved) -> float | None:
    """How hard an entry pushes, in units of its vector's dose 1 (None: no measured window)."""
    w = window(r.steer.vector, r.operator, r.governor) or window(r.steer.vector, r.operator, not r.governor)
    if w is None or r.strength is None or not w.get("max_strength"):
        return None
    return abs(float(r.strength)) * len(r.layers) / (float(w["max_strength"]) * len(w["layers"]))


def blend_push(row: Sequence[Resolved]) -> float:
    """The summed push of a row's measured entries (1.0 = one vector at dose 1)."""
    return sum(p for r in row if (p := push(r)) is not None)


def check_blend(row: list[Resolved]) -> list[Resolved]:
    """Blends: each part keeps its own dose; when the parts together push past ``BLEND_LIMIT``
    (measured, bench/blend_eval.py), every entry's note says so."""
    if len(row) < 2:
        return row
    total = blend_push(row)
    if total <= BLEND_LIMIT:
        return row
    warn = (f"blend: together the {len(row)} entries push {total:.2f}x one vector's dose 1; measured, blends past "
            f"{BLEND_LIMIT:g} lose fluency (lower the doses)")
    return [replace(r, note="; ".join(x for x in (r.note, warn) if x)) for r in row]


def resolve_rows(rows: Sequence[Sequence[SteerLike]], n_layers: int, **defaults: object) -> list[list[Resolved]]:
    """:func:`resolve` for every entry of every row, with the blend check."""
    return [check_blend([resolve(item, n_layers, **defaults) for item in row]) for row in rows]  # type: ignore[arg-type]


def with_dose(st: Steer, dose: float) -> Steer:
    """The same entry at another dose (strength and scale cleared)."""
    return replace(st, dose=dose, strength=None, scale=None)
