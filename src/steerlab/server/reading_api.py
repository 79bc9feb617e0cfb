"""Token readings over HTTP: the ``read`` field of /generate, /compare and /v1/chat/completions,
``POST /read`` (monitor any text without generating) and ``GET /vectors/{name}/lens``.

Readings come from :class:`steerlab.reading.Reader`: one forward pass of the *unsteered* model over
prompt + reply per row, run on the runner's worker (:meth:`Runner.call`) so it never overlaps a
steered batch. A request without ``read`` costs nothing. Readers (with their neutral baselines)
are kept per app in :class:`Readers`, keyed by the vector objects, so a rebuilt vector gets a new
baseline. Knows nothing about generation.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from ..reading import Reader, TextReading
from . import bridge
from .limits import MAX_PROMPT_CHARS, MAX_VECTORS
from .openapi import errors
from .resolve import unknown_vector
from .schemas import VectorName
from .state import studio

if TYPE_CHECKING:
    from .state import Studio
    from ..models import LoadedModel
    from ..store import VectorStore

MAX_READ_CHARS = 4 * MAX_PROMPT_CHARS


class Readers:
    """Readers by the vectors they read (at most ``limit``, least recently used dropped)."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._cache: OrderedDict[tuple, Reader] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, lm: LoadedModel, vectors: Sequence) -> Reader:
        key = tuple((v.name, id(v)) for v in vectors)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        reader = Reader(lm, list(vectors))  # the neutral baseline: one batched pass
        with self._lock:
            self._cache[key] = reader
            while len(self._cache) > self.limit:
                self._cache.popitem(last=False)
        return reader


def compact(reading: TextReading) -> dict[str, Any]:
    """One row's readings: token pieces (they concatenate to the text) and values per vector."""
    names = list(reading.tokens[0].values) if reading.tokens else []
    return {"tokens": [t.text for t in reading.tokens],
            "values": {n: [round(v, 3) for v in reading.values(n)] for n in names},
            "mean": {n: round(reading.mean(n), 3) for n in names},
            "peak": {n: round(reading.peak(n), 3) for n in names}}


def check_read(names: Sequence[str] | None, store: VectorStore) -> None:
    """Refuse unknown vector names in ``read`` before anything is generated."""
    for name in names or ():
        if name not in store.vectors:
            raise unknown_vector(name, store)


async def read_rows(state: Studio, names: Sequence[str], texts: Sequence[str], *,
                    prompts: Sequence[str] | None = None, chat: bool | None = None) -> list[dict[str, Any]]:
    """Readings of ``texts`` (replies to ``prompts`` when given) for vectors ``names``, on the worker."""
    check_read(names, state.store)
    vectors = [state.store.vectors[name] for name in dict.fromkeys(names)]

    def work() -> list[TextReading]:
        reader = state.readers.get(state.lm.loaded(), vectors)
        if prompts is None:
            return reader.read(list(texts))
        return reader.read_replies(list(prompts), list(texts), chat=chat)

    try:
        future = state.runner.call(work)
    except Exception as exc:  # Busy: queue full or closing
        raise bridge.http_error(exc) from None
    try:
        readings = await asyncio.wrap_future(future)
    except Exception as exc:
        raise bridge.http_error(exc) from None
    return [compact(r) for r in readings]


class ReadRequest(BaseModel):
    """POST /read: readings of a text, no generation."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_READ_CHARS, description="Text to read.")
    read: list[VectorName] = Field(min_length=1, max_length=MAX_VECTORS, description="Vectors to read.")
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS,
                               description="Read `text` as the reply to this prompt (chat template when the model "
                                           "has one).")


router = APIRouter(tags=["glass box"])


@router.post("/read", summary="Token readings of a text for some vectors (monitoring, no generation)",
             responses=errors(404, 413, 422))
async def read(req: ReadRequest, request: Request) -> dict[str, Any]:
    rows = await read_rows(studio(request), req.read or [], [req.text],
                           prompts=None if req.prompt is None else [req.prompt])
    return {"text": req.text, "read": rows[0]}


@router.get("/vectors/{name}/lens", summary="Tokens a vector's direction promotes and suppresses (logit lens)",
            responses=errors(404, 422))
async def lens(name: str, request: Request, k: int = Query(8, ge=1, le=50)) -> dict[str, Any]:
    """At the vector's active layers and its deepest layer (where the lens reads clearest)."""
    from ..lens import lens_layers, logit_lens

    state = studio(request)
    check_read([name], state.store)
    vec = state.store.vectors[name]
    try:
        work = lambda: logit_lens(state.lm.loaded(), vec, layers=lens_layers(vec), k=k)  # noqa: E731
        rows = await asyncio.wrap_future(state.runner.call(work))
    except Exception as exc:
        raise bridge.http_error(exc) from None
    return {"name": name, "layers": [r.to_dict() for r in rows]}
