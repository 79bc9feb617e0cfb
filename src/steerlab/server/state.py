"""The app's typed state: what every route reads (model facts, vectors, settings, engine, builds, caches).

``create_app`` builds one :class:`Studio` per app and keeps it as ``app.state.studio``; routes take
it as a dependency (``s: StudioDep``), so they are plain functions in routers that can be
imported and tested alone. There is no module-level state: two apps in one process are independent.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

if TYPE_CHECKING:
    from ..models import LoadedModel, ModelInfo
    from ..store import VectorStore
    from .budget import PromptBudget
    from .builds import Builds, BuildWorker
    from .jobs import Engine
    from .profile_api import Profiles
    from .reading_api import Readers
    from .settings import ServerSettings


@dataclass(eq=False)
class Studio:
    """One app's state. Set once by ``create_app``; the objects in it guard their own mutation."""

    lm: ModelInfo  # facts for the routes; ``lm.loaded()`` for code that runs the model
    store: VectorStore
    settings: ServerSettings
    runner: Engine  # what generates (transformers Runner or vLLM runner)
    builds: Builds
    readers: Readers
    profiles: Profiles  # layer profiles of vectors, computed on demand (GET /vectors/{name}/profile)
    build_worker: BuildWorker | None  # the transformers engine's build thread (None on vLLM)
    build_call: Callable[[Callable[[], Any]], Future]  # runs a build off the generation worker
    build_model: Callable[[], LoadedModel]  # the model a build runs on (called on the build thread)
    adds_special_tokens: bool  # whether plain encoding adds a BOS of its own (asked once)
    budget: PromptBudget
    examples: list[dict[str, Any]]


def studio(request: Request) -> Studio:
    """The dependency routes take: this app's :class:`Studio`."""
    return request.app.state.studio


StudioDep = Annotated[Studio, Depends(studio)]
