"""Background persona builds for POST /vectors: status records and the work itself.

Owns the list of recent builds (held in app state, bounded) and the job that builds a
vector on the runner's worker, reporting progress as contrast texts are processed. A built
vector is added to the :class:`~steerlab.store.VectorStore`, so it is usable at once.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..personas import Persona, build_persona
from ..store import VectorStore
from .runner import Runner
from .schemas import BuildRequest


@dataclass
class Build:
    """One build's state. Written by the worker thread, read by request handlers."""

    id: str
    name: str
    total: int
    state: str = "queued"  # queued -> running -> done | failed
    done: int = 0
    error: str | None = None
    vector: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def final(self) -> bool:
        return self.state in ("done", "failed")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "state": self.state, "done": self.done, "total": self.total,
                "progress": round(self.done / self.total, 3) if self.total else 0.0, "error": self.error,
                "vector": self.vector, "status_url": f"/builds/{self.id}", "events_url": f"/builds/{self.id}/events"}


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

    def active(self) -> list[Build]:
        with self._lock:
            return [b for b in self._items.values() if not b.final]

    def add(self, build: Build) -> None:
        with self._lock:
            self._items[build.id] = build
            old = [k for k, b in self._items.items() if b.final]
            for k in old[: max(0, len(self._items) - self.keep)]:
                del self._items[k]

    def start(self, req: BuildRequest, *, runner: Runner, store: VectorStore, lm,
              batch_size: int, describe) -> Build:  # noqa: ANN001
        """Queue the build on the runner (raises runner.Busy when full) and return its record."""
        build = Build(id=uuid.uuid4().hex[:12], name=req.name, total=len(req.positive) + len(req.negative))
        persona = Persona(
            name=req.name, description=req.description, keywords=(), positive=tuple(req.positive),
            negative=tuple(req.negative), default_layers=tuple(req.default_layers or ()),
            default_strength=req.default_strength, method=req.method, source="POST /vectors",
        )

        def progress(done: int, total: int) -> None:
            build.done, build.total = done, total

        def work() -> None:
            build.state = "running"
            try:
                vec = build_persona(lm, persona, batch_size=batch_size, progress=False, on_progress=progress)
                store.add(vec, overwrite=req.overwrite)
                build.vector = describe(req.name, vec)
                build.state = "done"
            except Exception as exc:  # shown to the client as the build's error
                build.error = str(exc) or type(exc).__name__
                build.state = "failed"
            finally:
                build.finished = time.time()

        self.add(build)
        try:
            runner.call(work)
        except Exception:
            with self._lock:
                self._items.pop(build.id, None)
            raise
        return build
