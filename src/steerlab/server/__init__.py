"""The web studio and HTTP API: ``create_app(lm, store, settings)``; ``steerlab serve`` runs it.

Modules: ``schemas`` (request bounds), ``runner`` (the worker thread that owns the model,
dynamic batching), ``bridge`` (worker <-> asyncio, server-sent events), ``resolve`` (request
steering -> library objects), ``builds`` (background persona builds), ``app`` (routes),
``openai_api`` (/v1), ``precompute`` (the page's pre-computed examples), ``command`` (CLI).
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
        from .resolve import ServerSettings

        return ServerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
