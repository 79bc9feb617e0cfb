"""The studio's vector routes: list, describe, plot, build (in the background) and build status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, StreamingResponse

from ..personas import NAME_PATTERN, available_personas
from ..vectors import SteeringVector
from . import bridge
from .builds import Build
from .jobs import Busy
from .openapi import errors
from .resolve import describe, plain_file, plot_path, unknown_vector
from .schemas import BuildRequest
from .state import Studio, StudioDep

router = APIRouter()


def vector_info(s: Studio, name: str, vec: SteeringVector) -> dict[str, Any]:
    return describe(name, vec, settings=s.settings, folder=s.store.folder)


@router.get("/vectors", summary="Loaded vectors with metadata")
def list_vectors(s: StudioDep) -> dict[str, Any]:
    lm, store = s.lm, s.store
    store.refresh()
    return {"model": lm.model_id, "n_layers": lm.n_layers, "hidden_size": lm.hidden_size,
            "strength_override": s.settings.strength,
            "vectors": [vector_info(s, n, store.vectors[n]) for n in store.names()]}


def _named(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise HTTPException(404, f"no vector named {name!r}")
    return name


@router.get("/vectors/{name}", summary="One vector's metadata", responses=errors(404))
def get_vector(name: str, s: StudioDep) -> dict[str, Any]:
    s.store.refresh()
    vec = s.store.vectors.get(_named(name))
    if vec is None:
        raise unknown_vector(name, s.store)
    return vector_info(s, name, vec)


@router.get("/vectors/{name}/plot", summary="The vector's sweep plot (written by `steerlab sweep`)",
            response_class=FileResponse,
            responses={200: {"content": {"image/png": {}}, "description": "PNG"}, **errors(404)})
def get_plot(name: str, s: StudioDep) -> FileResponse:
    path = plot_path(s.store.folder, _named(name))
    if not plain_file(path):
        raise HTTPException(404, f"no sweep plot for {name!r}: run `steerlab sweep {name}` to make one")
    return FileResponse(path, media_type="image/png")


@router.post("/vectors", status_code=202, summary="Build a persona vector from contrast texts (background)",
             responses=errors(400, 403, 409, 413, 422, 503))
def build_vector(req: BuildRequest, s: StudioDep) -> dict[str, Any]:
    builds, store, lm = s.builds, s.store, s.lm
    if builds.running(req.name):
        raise HTTPException(409, f"{req.name!r} is being built already; follow GET /builds/<id>")
    if not req.overwrite and (req.name in store.vectors or req.name in available_personas()):
        raise HTTPException(409, f"a vector or persona named {req.name!r} exists already: choose another name, "
                                 "or send \"overwrite\": true to replace it")
    bad = [x for x in req.default_layers or () if x >= lm.n_layers]
    if bad:
        raise HTTPException(400, f"default_layers {bad} out of range: this model has layers 0..{lm.n_layers - 1}")
    try:
        build = builds.start(req, call=s.build_call, store=store, model=s.build_model,
                             batch_size=s.settings.build_batch_size,
                             describe=lambda name, vec: vector_info(s, name, vec))
    except Busy as exc:
        raise bridge.http_error(exc) from None
    return build.as_dict()


def _build(s: Studio, build_id: str) -> Build:
    build = s.builds.get(build_id)
    if build is None:
        raise HTTPException(404, f"no build {build_id!r} (builds are kept while the server runs)")
    return build


@router.get("/builds/{build_id}", summary="A build's state and progress (poll it)", responses=errors(404))
def build_status(build_id: str, s: StudioDep) -> dict[str, Any]:
    return _build(s, build_id).as_dict()


@router.delete("/builds/{build_id}", summary="Cancel a build (it stops at its next batch of texts)",
               responses=errors(403, 404))
def cancel_build(build_id: str, s: StudioDep) -> dict[str, Any]:
    build = _build(s, build_id)
    if not build.final:
        build.cancel.set()
    return build.as_dict()


@router.get("/builds/{build_id}/events", summary="A build's progress as server-sent events",
            responses={200: {"content": {"text/event-stream": {}}, "description": "progress events"},
                       **errors(404)})
async def build_events(build_id: str, request: Request, s: StudioDep) -> StreamingResponse:
    build = _build(s, build_id)

    async def frames() -> AsyncIterator[bytes]:
        last = None
        while True:
            now = build.as_dict()
            if now != last:
                yield bridge.sse("progress" if not build.final else build.state, now)
                last = now
            if build.final or await request.is_disconnected():
                return
            await asyncio.sleep(0.2)

    return StreamingResponse(frames(), media_type="text/event-stream", headers=bridge.SSE_HEADERS)
