"""Conditional steering: an entry applies only where another vector's reading holds (``Steer.when``).

In the spirit of IBM's conditional activation steering. A :class:`~steerlab.spec.When` is checked

* on the ``prompt``: :func:`decide` reads every row's prompt text (not the chat template around
  it, whose fixed system text would dilute a mean) in one batched pass and drops the entry from
  rows where it fails. A row where nothing fires gets no steering: byte-identical to unsteered.
* on the ``text`` generated so far: a :class:`TextGate` (a logits processor) reads each row's
  newest token from the generating batch itself (a :func:`steerlab.hooks.watch` hook at the
  condition vector's layers, no second pass) and switches that row's entry on or off for the next
  step through ``steer(gate=)``. Readings come one token late (a token is read when it is fed
  back), so the first reply token is never steered by a text condition. The reading is of the
  *steered* stream: steering at blocks before a read layer reaches it (docs/glassbox.md).

Readings are the ones of :mod:`steerlab.reading` (neutral standard deviations). Prints nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor

from .errors import SteeringError
from .hooks import watch
from .reading import Baseline, Reader
from .spec import Resolved, Steer, SteerLike, When, as_steer
from .vectors import SteeringVector

if TYPE_CHECKING:
    from .models import LoadedModel


def Condition(vector: SteeringVector, threshold: float = 3.0, stat: str = "peak") -> When:  # noqa: N802
    """A condition on the prompt (the first API's defaults: peak >= 3)."""
    return When(vector, threshold=threshold, stat=stat, on="prompt")


@dataclass(frozen=True)
class Conditional:
    """A steering entry and the condition under which it applies (None: always). Same as ``Steer(when=)``."""

    steer: Steer
    condition: When | None = None

    def as_steer(self) -> Steer:
        return self.steer if self.condition is None else replace(self.steer, when=self.condition)


def _when(res: Resolved) -> When:
    """The condition of an entry known to have one (a gated or conditioned entry)."""
    if res.steer.when is None:
        raise SteeringError(f"{res.steer.vector.name} has no condition")
    return res.steer.when


def _vector(when: When) -> SteeringVector:
    if isinstance(when.vector, str):
        raise SteeringError(f"condition vector {when.vector!r} is a name: give the vector (a store's get() finds it)")
    return when.vector


def condition_vectors(rows: Sequence[Sequence[Resolved | Steer]]) -> list[SteeringVector]:
    """The distinct condition vectors still to decide in ``rows`` (by object)."""
    found: dict[int, SteeringVector] = {}
    for row in rows:
        for item in row:
            w = (item.steer if isinstance(item, Resolved) else item).when
            if w is not None and w.value is None and w.baseline is None:
                found.setdefault(id(_vector(w)), _vector(w))
    return list(found.values())


def _record(item: Resolved, when: When, **outcome: object) -> dict:
    """What a condition did for one row's entry (responses, ``generate(report=)``, the CLI)."""
    return {"vector": item.steer.vector.name, "if": when.name, "stat": when.stat, "threshold": when.threshold,
            "on": when.on, **outcome}


def _with_when(item: Resolved, when: When) -> Resolved:
    return replace(item, steer=replace(item.steer, when=when))


def decide(lm, prompts: Sequence[str], rows: Sequence[Sequence[Resolved]], *,  # noqa: ANN001
           reader: Reader | None = None) -> tuple[list[list[Resolved]], list[list[dict]]]:
    """Rows with prompt conditions decided (failed entries dropped) and text conditions armed.

    Returns the rows and, per row, one record per conditioned entry (``fired`` for prompt
    conditions; text conditions are reported by their :class:`TextGate`). ``rows`` has one row
    per prompt. ``reader``: one made earlier for (at least) the condition vectors. Entries
    decided before (``when.value`` / ``when.baseline`` set) are kept as they are.
    """
    if len(rows) != len(prompts):
        raise SteeringError(f"{len(prompts)} prompts but steering for {len(rows)} rows")
    conds = condition_vectors(rows)
    outcomes: list[list[dict]] = [[] for _ in rows]
    if not conds:
        return [list(r) for r in rows], outcomes
    reader = reader or Reader(lm, conds)
    missing = {v.name for v in conds} - set(reader.names)
    if missing:
        raise SteeringError(f"the reader does not read the condition vectors {sorted(missing)}")
    base = {name: reader.baselines[k] for k, name in enumerate(reader.names)}
    on_prompt = any(r.steer.when and r.steer.when.on == "prompt" and r.steer.when.value is None
                    for row in rows for r in row)
    readings = reader.read(list(prompts)) if on_prompt else []
    out: list[list[Resolved]] = []
    for i, row in enumerate(rows):
        kept = []
        for item in row:
            w = item.steer.when
            if w is None or w.value is not None or w.baseline is not None:
                kept.append(item)
            elif w.on == "text":
                kept.append(_with_when(item, replace(w, baseline=base[w.name])))
            else:
                r = readings[i]
                value = r.mean(w.name) if w.stat == "mean" else r.peak(w.name)
                fired = value == value and value >= w.threshold  # an empty prompt (nan) never fires
                outcomes[i].append(_record(item, w, value=round(value, 3), fired=bool(fired)))
                if fired:
                    kept.append(_with_when(item, replace(w, value=value)))
        out.append(kept)
    return out, outcomes


def conditional_rows(lm: LoadedModel, prompts: Sequence[str], entries: Sequence[Conditional | SteerLike], *,
                     reader: Reader | None = None) -> tuple[list[list[Steer]], list[dict[str, float]]]:
    """Per-row steering for ``prompts`` (prompt conditions only) and each condition vector's readings.

    The first API, kept: :func:`steerlab.generate` now decides ``Steer(when=)`` entries itself.
    """
    items = [e.as_steer() if isinstance(e, Conditional) else as_steer(e) for e in entries]
    conds = condition_vectors([items])
    stats: list[dict[str, float]] = [{} for _ in prompts]
    if conds:
        reader = reader or Reader(lm, conds)
        missing = {v.name for v in conds} - set(reader.names)
        if missing:
            raise SteeringError(f"the reader does not read the condition vectors {sorted(missing)}")
        for i, r in enumerate(reader.read(list(prompts))):
            for v in conds:
                stats[i] |= {f"{v.name}.peak": r.peak(v.name), f"{v.name}.mean": r.mean(v.name)}
    rows: list[list[Steer]] = []
    for i in range(len(prompts)):
        row = []
        for st in items:
            w = st.when
            if w is None or stats[i][f"{w.name}.{w.stat}"] >= w.threshold:
                row.append(replace(st, when=None) if w is not None else st)
        rows.append(row)
    return rows, stats


class LiveScores:
    """Readings of each batch row's newest token from the projections a :func:`~steerlab.hooks.watch` recorded."""

    def __init__(self, vectors: Sequence[SteeringVector], baselines: Sequence[Baseline]) -> None:
        table: dict[int, list[torch.Tensor]] = {}
        self.cols: list[list[tuple[int, int]]] = []
        for vec, base in zip(vectors, baselines, strict=True):
            cols = []
            for layer in base.layers:
                d = vec.directions[layer].float()
                table.setdefault(layer, []).append(d / d.norm().clamp_min(1e-12))
                cols.append((layer, len(table[layer]) - 1))
            self.cols.append(cols)
        self.names = [v.name for v in vectors]
        self.baselines = list(baselines)
        self.dirs = {layer: torch.stack(ds) for layer, ds in table.items()}

    def scores(self, store: dict[int, torch.Tensor]) -> torch.Tensor:
        """``[rows, vectors]`` readings (fp64, CPU) of the position the last forward pass ended on."""
        cpu = {layer: t.double().cpu() for layer, t in store.items()}
        return torch.stack([base.score(torch.stack([cpu[x][:, c] for x, c in cols], dim=1))
                            for base, cols in zip(self.baselines, self.cols)], dim=1)


class TextGate(LogitsProcessor):
    """Per row and entry, whether a condition on the reply so far holds; writes ``gate`` for the next step.

    Use as a logits processor inside :meth:`watching` (entered before ``steer(gate=self.gate)``).
    """

    def __init__(self, lm, rows: Sequence[Sequence[Resolved]], *, eos: Sequence[int] = ()) -> None:  # noqa: ANN001
        n, width = len(rows), max((len(r) for r in rows), default=0)
        self.slots = [(r, j, res) for r, row in enumerate(rows) for j, res in enumerate(row) if res.gated]
        vecs: dict[int, tuple[SteeringVector, Baseline]] = {}
        for _, _, res in self.slots:
            w = _when(res)
            if not isinstance(w.baseline, Baseline):
                raise SteeringError(f"{res.steer.vector.name}: its text condition was not decided (decide() arms it)")
            vecs.setdefault(id(_vector(w)), (_vector(w), w.baseline))
        self.index = {key: k for k, key in enumerate(vecs)}
        self.live = LiveScores([v for v, _ in vecs.values()], [b for _, b in vecs.values()])
        self.lm, self.eos = lm, set(eos)
        self.gate = torch.ones(n, width, 1, device=lm.device, dtype=lm.dtype)
        for r, j, _ in self.slots:
            self.gate[r, j] = 0
        k = len(vecs)
        self.sum = torch.zeros(n, k, dtype=torch.float64)
        self.count = torch.zeros(n, 1, dtype=torch.float64)
        self.peak = torch.full((n, k), float("-inf"), dtype=torch.float64)
        self.done = torch.zeros(n, dtype=torch.bool)
        self.first: list[int | None] = [None] * len(self.slots)
        self.steered = [0] * len(self.slots)
        self.store: dict[int, torch.Tensor] = {}
        self._prompt_len: int | None = None

    @contextmanager
    def watching(self) -> Iterator[TextGate]:
        """The watch hooks; enter before the steering hooks so they run first."""
        with watch(self.lm, self.live.dirs) as store:
            self.store = store
            yield self

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = self.gate.shape[0]
        if input_ids.shape[0] != n:  # beams or several returns per prompt: not supported, leave closed
            return scores
        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]  # this step read the prompt's last (template) token
            return scores
        fed = input_ids[:, -1].cpu()
        self.done |= torch.tensor([int(t) in self.eos for t in fed.tolist()])
        alive = (~self.done)[:, None]
        vals = self.live.scores(self.store)
        self.sum += torch.where(alive, vals, 0.0)
        self.count += alive.double()
        self.peak = torch.where(alive, torch.maximum(self.peak, vals), self.peak)
        mean = self.sum / self.count.clamp_min(1)
        for s, (r, j, res) in enumerate(self.slots):
            w = _when(res)
            k = self.index[id(_vector(w))]
            value = float(mean[r, k] if w.stat == "mean" else self.peak[r, k])
            is_open = bool(self.count[r, 0] > 0) and value >= w.threshold and not bool(self.done[r])
            self.gate[r, j] = 1.0 if is_open else 0.0
            if is_open:
                self.steered[s] += 1
                if self.first[s] is None:
                    self.first[s] = int(self.count[r, 0]) + 1  # 0-based: the first reply token predicted steered
        return scores

    def summary(self) -> list[list[dict]]:
        """Per row, one record per text condition: fired at all, from which reply token, on how many."""
        out: list[list[dict]] = [[] for _ in range(self.gate.shape[0])]
        for s, (r, _, res) in enumerate(self.slots):
            out[r].append(_record(res, _when(res), fired=self.first[s] is not None,
                                  first_steered_token=self.first[s], steered_tokens=self.steered[s],
                                  tokens_read=int(self.count[r, 0])))
        return out


def text_gate_for(lm, rows: Sequence[Sequence[Resolved]], n_rows: int, eos: Sequence[int]) -> TextGate | None:  # noqa: ANN001
    """A gate for the rows' text conditions (None when no entry has one)."""
    rows = rows if len(rows) == n_rows else [rows[0]] * n_rows
    if not any(r.gated for row in rows for r in row):
        return None
    return TextGate(lm, rows, eos=eos)
