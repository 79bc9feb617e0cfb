"""The app factory: ``create_app(lm, store, settings)`` returns the studio's FastAPI app.

The app's :class:`~steerlab.server.state.Studio` (``app.state.studio``) holds the model facts,
the vector store, the settings, the engine (a :class:`~steerlab.server.runner.Runner`, started
and stopped by the app's lifespan), the builds and the readers. There is no module-level state:
two apps in one process are independent. Routes live in routers over that state:
:mod:`.pages_api` (page, health, examples), :mod:`.generation_api` (generate, compare),
:mod:`.vectors_api` (vectors, builds), :mod:`.reading_api` (read, lens), :mod:`.profile_api` (layer
profile), :mod:`.openai_api` (/v1).
This module also owns the error shape: ``{"error": message, "detail": ...}`` (OpenAI's under /v1).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SteeringError
from ..store import VectorStore
from . import generation_api, openai_api, pages_api, profile_api, reading_api, vectors_api
from .budget import PromptBudget, context_length
from .builds import Builds, BuildWorker
from .guard import Guard, error_body
from .jobs import Engine
from .limits import MAX_ERROR_ITEMS
from .profile_api import Profiles
from .reading_api import Readers
from .runner import Runner
from .settings import ServerSettings
from .state import Studio

if TYPE_CHECKING:
    from ..models import ModelInfo

DESCRIPTION = """Activation-steering studio: compare a model's base and steered output, build persona
vectors from contrast texts, and talk to a steered model through an OpenAI-compatible API.
Strength is in residual-norm units (1.0 adds one typical residual norm at each applied layer)."""


def _adds_special_tokens(tok: Any) -> bool:
    """Whether plain encoding adds tokens (a BOS) of its own; asked once, before the runner owns the tokenizer."""
    return tok("x")["input_ids"] != tok("x", add_special_tokens=False)["input_ids"]


def create_app(lm: ModelInfo, store: VectorStore, settings: ServerSettings | None = None,
               runner: Engine | None = None) -> FastAPI:
    """The studio app for a model and its vectors folder.

    ``runner``: what generates; default the transformers engine's batching :class:`Runner` on
    ``lm``. ``steerlab serve --engine vllm`` passes a :class:`~steerlab.server.vllm_runner.VLLMRunner`
    (then ``lm`` is the transformers side that builds vectors).
    """
    settings = settings or ServerSettings()
    if settings.strength is not None and not math.isfinite(settings.strength):
        raise SteeringError(f"STRENGTH {settings.strength} is not a finite number: unset it or give one in "
                            "-20..20")
    if runner is None:
        runner = Runner(lm.loaded(), max_queue=settings.max_queue, max_batch_rows=settings.max_batch_rows,
                        batch_wait_s=settings.batch_wait_s, max_batch_tokens=settings.max_batch_tokens)
    # builds never wait behind generation: the transformers engine gets a build thread with its own
    # copy of the model; vLLM's runner already builds beside generation on the transformers side
    build_worker = BuildWorker(lm.loaded()) if isinstance(runner, Runner) else None
    studio = Studio(lm=lm, store=store, settings=settings, runner=runner, builds=Builds(), readers=Readers(),
                    profiles=Profiles(),
                    build_worker=build_worker,
                    build_call=build_worker.call if build_worker is not None else runner.call,
                    build_model=build_worker.model if build_worker is not None else lm.loaded,
                    adds_special_tokens=_adds_special_tokens(lm.tokenizer),
                    budget=PromptBudget(lm, max_prompt_tokens=settings.max_prompt_tokens, context=context_length(lm)),
                    examples=json.loads(pages_api.data_file("examples.json")))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        studio.runner.start()
        try:
            yield
        finally:
            for build in studio.builds.active():
                build.cancel.set()
            if studio.build_worker is not None:
                studio.build_worker.close()
            await asyncio.to_thread(studio.runner.close)

    # /docs and /redoc with Swagger UI / ReDoc served from the fastapi-offline package: no CDN, works offline
    app = FastAPIOffline(title="steerlab studio", description=DESCRIPTION, version="0.1.0", lifespan=lifespan)
    app.state.studio = studio
    _install_error_handlers(app)
    app.add_middleware(Guard, settings=settings)
    for module in (pages_api, generation_api, vectors_api, openai_api, reading_api, profile_api):
        app.include_router(module.router)
    return app


# ---- errors: one JSON shape, {"error": message, "detail": ...} (OpenAI's shape under /v1) ----------
def _body(request: Request, status: int, message: str, detail: Any = None) -> dict[str, Any]:
    return error_body(request.url.path, status, message, detail)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return JSONResponse(_body(request, exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        found = exc.errors()
        for err in found[:MAX_ERROR_ITEMS]:  # bounded: 300,000 unknown keys once made a 30 MB answer
            if err.get("type") == "json_invalid":
                where = err.get("loc", ("body", "?"))[-1]
                reason = (err.get("ctx") or {}).get("error", "")
                msg = f"malformed JSON at character {where}: {reason}".rstrip(": ")
            else:
                msg = f"{_clip(_field(tuple(err.get('loc', ()))))}: {_clip(str(err.get('msg', 'invalid')))}"
            errors.append({"loc": [_clip(str(p)) for p in err.get("loc", ())][:8], "msg": msg, "type": err.get("type")})
        message = "; ".join(dict.fromkeys(e["msg"] for e in errors[:4]))
        if len(found) > MAX_ERROR_ITEMS:
            message += f" (and {len(found) - MAX_ERROR_ITEMS} more errors)"
        return JSONResponse(_body(request, 422, message, errors), status_code=422)

    @app.exception_handler(SteeringError)
    async def steering_error(request: Request, exc: SteeringError) -> JSONResponse:
        return JSONResponse(_body(request, 400, str(exc)), status_code=400)
