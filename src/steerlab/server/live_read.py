"""Readings streamed with each token: the ``read`` events of /generate and /compare streams.

When a streaming request asks for ``read``, each new token's reading is computed from the steered
batch itself: a :func:`steerlab.hooks.watch` hook at the reading layers records the last position's
projections at every decode step (no second pass), and :class:`LiveStreamer` (wrapped around the
runner's streamer) turns them into readings (neutral standard deviations, as :mod:`steerlab.reading`)
of the token that step fed back. A token is fed back one step after it is chosen, so its reading
comes one token after its text; the last token of a row cut by the length limit is never fed
back and gets none (the ``done`` event's readings cover every token).

What it measures: the hook runs before the block's own steering, so the base row and layers at or
before a row's first steered layer read exactly what the unsteered model would on the same tokens;
deeper layers of a steered row also carry the push added at earlier layers (docs/glassbox.md).
Batches without such a job get no hook and no wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..conditional import LiveScores
from ..hooks import watch
from ..reading import Reader


@dataclass(frozen=True)
class LiveRead:
    """What one job wants read while it streams: a reader (made on the worker) for these vectors."""

    reader: Callable[[], Reader]


class LiveStreamer:
    """Around the runner's streamer: before each step's tokens, emit readings of the tokens fed back."""

    def __init__(self, inner, store: dict, live: LiveScores, wanted: dict[Any, list[tuple[str, int]]]) -> None:  # noqa: ANN001
        self.inner, self.store, self.live, self.wanted = inner, store, live, wanted
        self.pending: list[tuple[int, int] | None] = [None] * len(inner.slots)

    def put(self, value) -> None:  # noqa: ANN001
        from .runner import Delta

        if self.inner.prompt_seen and any(p is not None for p in self.pending):
            scores = self.live.scores(self.store)
            for r, (job, row) in enumerate(self.inner.slots):
                span, names = self.pending[r], self.wanted.get(job)
                if span is not None and names and not job.finished:
                    job.emit(Delta(row, "", read=(*span, {n: round(float(scores[r, k]), 3) for n, k in names})))
                self.pending[r] = None
        before = [(len(ids), len(t.sent)) for ids, t in zip(self.inner.ids, self.inner.texts)]
        self.inner.put(value)
        for r, (n, chars) in enumerate(before):
            if len(self.inner.ids[r]) > n:
                self.pending[r] = (chars, len(self.inner.texts[r].sent))

    def end(self) -> None:
        self.inner.end()


@contextmanager
def live_reads(lm, jobs: Sequence, streamer) -> Iterator[Any]:  # noqa: ANN001
    """``streamer``, wrapped with per-token readings when a job of the batch asked for them."""
    wanting = [j for j in jobs if getattr(j, "live_read", None) is not None and not j.finished]
    if not wanting:
        yield streamer
        return
    vectors: list[Any] = []
    baselines: list[Any] = []
    index: dict[Any, int] = {}
    wanted: dict[Any, Any] = {}
    for job in wanting:
        reader = job.live_read.reader()
        names = []
        for vec, base in zip(reader.vectors, reader.baselines):
            key = (vec.name, id(vec))
            if key not in index:
                index[key] = len(vectors)
                vectors.append(vec)
                baselines.append(base)
            names.append((vec.name, index[key]))
        wanted[job] = names
    live = LiveScores(vectors, baselines)
    wrapper = getattr(streamer, "live", None)  # a resumed slice keeps what is pending
    with watch(lm, live.dirs) as store:
        if wrapper is None:
            wrapper = streamer.live = LiveStreamer(streamer, store, live, wanted)
        wrapper.store = store
        yield wrapper


def delta_frame(d, rows: Sequence[str]) -> bytes:  # noqa: ANN001
    """The SSE frame of a runner ``Delta``: ``delta`` (new text) or ``read`` (an earlier token's reading)."""
    from .bridge import sse

    if d.read is not None:
        start, end, values = d.read
        return sse("read", {"row": rows[d.row], "start": start, "end": end, "read": values})
    return sse("delta", {"row": rows[d.row], "text": d.text} | ({} if d.gain is None else {"gain": d.gain}))
