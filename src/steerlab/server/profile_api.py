"""Where a concept lives, over HTTP: ``GET /vectors/{name}/profile`` for the page's vector view.

Per layer of a vector: the cross-validated AUC of held-out contrast texts and the cosine to the
next layer's direction (:func:`steerlab.anatomy.layer_profile`, the numbers ``steerlab inspect
--profile`` prints). The AUC needs the vector's contrast texts: those of a build this server ran
(``POST /vectors``) whose texts hash to the vector's ``contrast_hash``, else the persona file of
that name (the answer says whether its texts are the ones the vector was built from).

Computed on demand, never at start-up, on the build thread (so generation never waits behind
it), once per vector object: :class:`Profiles` (per app, in the Studio) keeps the answers, so a
rebuilt vector gets a new profile and concurrent requests share one computation.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request

from ..extract import contrast_hash
from ..personas import available_personas, get_persona
from . import bridge
from .openapi import errors
from .reading_api import check_read
from .state import studio

if TYPE_CHECKING:
    from ..personas import Persona
    from ..vectors import SteeringVector
    from .state import Studio


class Profiles:
    """Profile answers by vector object (at most ``limit``, least recently used dropped)."""

    def __init__(self, limit: int = 32) -> None:
        self.limit = limit
        self.computed = 0  # how many profiles were computed (each vector object once)
        # key: (name, id(vector), texts' hash); the entry keeps the vector so its id cannot be reused meanwhile
        self._cache: OrderedDict[tuple[str, int, str], tuple[SteeringVector, Future]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, vec: SteeringVector, texts_hash: str, start: Callable[[], Future]) -> Future:
        """The answer's future for ``vec`` read on texts hashing to ``texts_hash``; ``start()``
        submits the work when there is none yet."""
        key = (vec.name, id(vec), texts_hash)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key][1]
            future = start()
            self.computed += 1
            self._cache[key] = (vec, future)
            while len(self._cache) > self.limit:
                self._cache.popitem(last=False)
        future.add_done_callback(lambda f: self._forget(key, f))
        return future

    def _forget(self, key: tuple[str, int, str], future: Future) -> None:
        """A failed or cancelled computation is not kept: the next request tries again."""
        if not future.cancelled() and future.exception() is None:
            return
        with self._lock:
            if key in self._cache and self._cache[key][1] is future:
                del self._cache[key]


def contrast_texts(state: Studio, name: str, vec: SteeringVector) -> tuple[Persona, str, bool]:
    """(texts, where they come from, whether they are the vector's own): a build's, else the persona file's."""
    for build in reversed(state.builds.finished(name)):
        p = build.persona
        if p is not None and contrast_hash(p.positive, p.negative) == vec.contrast_hash:
            return p, "this server's build", True
    if name in available_personas():
        p = get_persona(name)
        return p, f"persona file {name}.toml", contrast_hash(p.positive, p.negative) == vec.contrast_hash
    raise HTTPException(404, f"no contrast texts for {name!r}: the profile reads the persona file of that name "
                             "(none here) or the texts of a build this server ran; put the persona's .toml in "
                             "the personas folder, or rebuild it from the page")


router = APIRouter(tags=["glass box"])


@router.get("/vectors/{name}/profile", summary="Where a vector's concept lives: held-out AUC and neighbour cosine "
                                                "per layer", responses=errors(400, 404, 503))
async def profile(name: str, request: Request) -> dict[str, Any]:
    """Per layer: ``auc`` (held-out positive vs negative texts, 2 folds), ``effect`` (Cohen's d) and
    ``cos_next`` (cosine of the direction with the next layer's). Computed once per vector."""
    from ..anatomy import layer_profile

    state = studio(request)
    check_read([name], state.store)
    vec = state.store.vectors[name]
    persona, source, own = contrast_texts(state, name, vec)

    def work() -> dict[str, Any]:
        t0 = time.perf_counter()
        rows = layer_profile(state.build_model(), vec, persona.positive, persona.negative)
        return {"name": name, "layers": [r.to_dict() for r in rows], "active_layers": list(vec.active_layers),
                "pairs": min(len(persona.positive), len(persona.negative)), "texts": source,
                "texts_are_the_vectors": own, "seconds": round(time.perf_counter() - t0, 2)}

    texts_hash = contrast_hash(persona.positive, persona.negative)
    try:
        future = state.profiles.get(vec, texts_hash, lambda: state.build_call(work))
        # shielded: a client that goes away must not cancel the computation other requests wait for
        return await asyncio.shield(asyncio.wrap_future(future))
    except Exception as exc:  # Busy (shutting down), or a SteeringError (e.g. under 4 pairs)
        raise bridge.http_error(exc) from None
