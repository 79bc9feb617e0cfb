"""Background persona builds for POST /vectors: status records, the build thread and the work.

Owns the list of recent builds (held in app state, bounded), the :class:`BuildWorker` that runs
them beside generation (its own thread and its own copy of the model: forward hooks are per
model, so a build's capture hooks must never sit on the model that generates), cancellation
(``DELETE /builds/{id}``, effective at the next batch of contrast texts) and the job that builds
a vector, reporting progress as contrast texts are processed. A built vector is added to the
:class:`~steerlab.store.VectorStore`, so it is usable at once. Error messages never carry the
server's absolute paths.
"""

from __future__ import annotations

import collections
import copy
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..doctor import as_built, checkup
from ..personas import Persona, build_persona
from ..store import VectorStore
from .schemas import BuildRequest

if TYPE_CHECKING:
    from ..models import LoadedModel
    from ..vectors import SteeringVector

FINAL_STATES = ("done", "failed", "cancelled")


class BuildCancelled(Exception):
    """Raised from a build's progress callback once its cancel flag is set."""


class BuildWorker:
    """One thread for builds, on a copy of ``lm`` made at the first build (so generation never waits)."""

    def __init__(self, lm: LoadedModel) -> None:
        self._lm = lm
        self._copy: LoadedModel | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steerlab-build")

    def model(self) -> LoadedModel:
        """The build copy (called on the build thread only)."""
        if self._copy is None:
            self._copy = copy.deepcopy(self._lm)
        return self._copy

    def call(self, fn: Callable[[], Any]) -> Future:
        return self._pool.submit(fn)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_PATH = re.compile(r"(?<![\w.~])(?:[A-Za-z]:)?(?:[\\/][^\s'\"\\/:,;()]+)+")


def public_message(error: BaseException) -> str:
    """``error`` as a client may see it: absolute paths reduced to their file names."""
    text = str(error) or type(error).__name__
    return _PATH.sub(lambda m: Path(m.group(0).replace("\\", "/")).name or "<path>", text)


@dataclass
class Build:
    """One build's state. Written by the worker thread, read by request handlers."""

    id: str
    name: str
    total: int
    state: str = "queued"  # queued -> running -> done | failed | cancelled
    done: int = 0
    error: str | None = None
    vector: dict[str, Any] | None = None
    doctor: dict[str, Any] | None = None  # the contrast set's grade and advice (steerlab.doctor.checkup)
    persona: Persona | None = field(default=None, repr=False)  # the texts built from (GET /vectors/{name}/profile)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "state": self.state, "done": self.done, "total": self.total,
                "progress": round(self.done / self.total, 3) if self.total else 0.0, "error": self.error,
                "vector": self.vector, "doctor": self.doctor, "status_url": f"/builds/{self.id}",
                "events_url": f"/builds/{self.id}/events"}


class Builds:
    """Recent builds by id (the oldest finished ones are forgotten past ``keep``)."""

    def __init__(self, keep: int = 32) -> None:
        self.keep = keep
        self._items: collections.OrderedDict[str, Build] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, build_id: str) -> Build | None:
        with self._lock:
            return self._items.get(build_id)

    def running(self, name: str) -> Build | None:
        with self._lock:
            return next((b for b in self._items.values() if b.name == name and not b.final), None)

    def finished(self, name: str) -> list[Build]:
        """The builds of ``name`` that finished as ``done``, oldest first."""
        with self._lock:
            return [b for b in self._items.values() if b.name == name and b.state == "done"]

    def active(self) -> list[Build]:
        with self._lock:
            return [b for b in self._items.values() if not b.final]

    def add(self, build: Build) -> None:
        with self._lock:
            self._items[build.id] = build
            old = [k for k, b in self._items.items() if b.final]
            for k in old[: max(0, len(self._items) - self.keep)]:
                del self._items[k]

    def start(self, req: BuildRequest, *, call: Callable[[Callable[[], Any]], Future], store: VectorStore,
              model: Callable[[], LoadedModel], batch_size: int,
              describe: Callable[[str, SteeringVector], dict[str, Any]]) -> Build:
        """Queue the build with ``call`` (raises runner.Busy when refused) and return its record.

        ``model()`` gives the model to build on; it is called on the build thread.
        """
        persona = Persona(
            name=req.name, description=req.description, keywords=(), positive=tuple(req.positive),
            negative=tuple(req.negative), default_layers=tuple(req.default_layers or ()),
            default_strength=req.default_strength, method=req.method, source="POST /vectors",
        )
        build = Build(id=uuid.uuid4().hex[:12], name=req.name, total=len(req.positive) + len(req.negative),
                      persona=persona)

        def progress(done: int, total: int) -> None:
            build.done, build.total = done, total
            if build.cancel.is_set():
                raise BuildCancelled

        def work() -> None:
            try:
                if build.cancel.is_set():
                    raise BuildCancelled
                build.state = "running"
                pooled: list[tuple[dict, dict]] = []  # the build's activations: the doctor reads no text again
                vec = build_persona(model(), persona, batch_size=batch_size, progress=False, on_progress=progress,
                                    on_pooled=lambda pos, neg: pooled.append((pos, neg)))
                if build.cancel.is_set():
                    raise BuildCancelled
                build.doctor = checkup(model(), as_built(persona, vec), vec.active_layers, pooled=pooled[-1])
                store.add(vec, overwrite=req.overwrite)
                build.vector = describe(req.name, vec)
                build.state = "done"
            except BuildCancelled:
                build.state = "cancelled"
            except Exception as exc:  # shown to the client as the build's error, without server paths
                build.error = public_message(exc)
                build.state = "failed"
            finally:
                build.finished = time.time()

        self.add(build)
        try:
            call(work)
        except Exception:
            with self._lock:
                self._items.pop(build.id, None)
            raise
        return build
