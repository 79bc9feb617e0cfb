"""Conditional steering on the prompt: a steering entry applies only to rows whose condition holds.

In the spirit of IBM's conditional activation steering, restricted to what needs no new hook:
a :class:`Condition` is another vector and a threshold on its reading of the *prompt* (mean or
peak over the prompt's tokens, see :mod:`steerlab.reading`). :func:`conditional_rows` reads all
prompts in one batched pass and returns per-row steering lists for :func:`steerlab.generate`, so
rows that fire and rows that do not share one batch. A row whose conditions all fail gets no
steering at all, so its output is byte-identical to unsteered generation. Conditions on "the text
so far" (checked during generation) are not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import SteeringError
from .hooks import Steer, SteerLike, as_steer
from .reading import Reader
from .vectors import SteeringVector

if TYPE_CHECKING:
    from .models import LoadedModel


@dataclass(frozen=True)
class Condition:
    """Fires when ``vector``'s reading of the prompt (``stat`` over its tokens) is >= ``threshold``."""

    vector: SteeringVector
    threshold: float = 3.0
    stat: Literal["mean", "peak"] = "peak"


@dataclass(frozen=True)
class Conditional:
    """A steering entry and the condition under which it applies (None: always)."""

    steer: Steer
    condition: Condition | None = None


def conditional_rows(lm: LoadedModel, prompts: Sequence[str], entries: Sequence[Conditional | SteerLike], *,
                     reader: Reader | None = None) -> tuple[list[list[Steer]], list[dict[str, float]]]:
    """Per-row steering for ``prompts`` and, per row, each condition vector's reading of the prompt.

    The user's prompt text itself is read (not the chat template around it, whose fixed system
    text would dilute a mean). ``reader``: one made earlier for the condition vectors (it holds
    their neutral baselines).
    """
    items = [e if isinstance(e, Conditional) else Conditional(as_steer(e)) for e in entries]
    conds = list({id(c.condition.vector): c.condition.vector for c in items if c.condition}.values())
    stats: list[dict[str, float]] = [{} for _ in prompts]
    if conds:
        if reader is None:
            reader = Reader(lm, conds)
        missing = {v.name for v in conds} - set(reader.names)
        if missing:
            raise SteeringError(f"the reader does not read the condition vectors {sorted(missing)}")
        for i, r in enumerate(reader.read(list(prompts))):
            for v in conds:
                stats[i] |= {f"{v.name}.peak": r.peak(v.name), f"{v.name}.mean": r.mean(v.name)}
    rows: list[list[Steer]] = []
    for i in range(len(prompts)):
        row = []
        for item in items:
            c = item.condition
            if c is None or stats[i][f"{c.vector.name}.{c.stat}"] >= c.threshold:
                row.append(item.steer)
        rows.append(row)
    return rows, stats
