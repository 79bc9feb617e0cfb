"""The web studio and HTTP API: ``create_app(lm, store, settings)``; ``steerlab serve`` runs it.

Modules: ``app`` (the factory), ``state``/``settings`` (typed app state, settings), the routers
``pages_api``, ``generation_api``, ``vectors_api``, ``reading_api``, ``openai_api``; ``schemas``
(request bounds), ``resolve`` (request steering -> library objects), ``jobs``/``runner``/
``batch_streamer``/``slices`` (the worker thread that owns the model, dynamic batching),
``bridge`` (worker <-> asyncio, server-sent events), ``builds`` (background persona builds),
``precompute`` (the page's pre-computed examples), ``command`` (CLI). docs/ARCHITECTURE.md maps them.
Importing this package is cheap: FastAPI and torch load only when ``create_app`` is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
