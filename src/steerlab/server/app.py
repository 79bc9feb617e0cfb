"""The app factory and the studio's routes.

``create_app(lm, store, settings)`` returns a FastAPI app whose state holds the model, the
vector store, the settings, the :class:`~steerlab.server.runner.Runner` (started and stopped
by the app's lifespan) and the recent builds. There is no module-level state: two apps in one
process are independent. Routes: the page, health, examples, generate/compare (JSON or
server-sent events), vectors (list, describe, plot, build) and build status; the
OpenAI-compatible routes live in :mod:`steerlab.server.openai_api`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SteeringError
from ..personas import NAME_PATTERN, available_personas
from ..store import VectorStore
from . import bridge
from .budget import PromptBudget, context_length
from .builds import Builds, BuildWorker
from .guard import Guard, error_body
from .limits import MAX_ERROR_ITEMS, MAX_NEW_TOKENS
from .openapi import GENERATION, errors, json_or_sse
from .reading_api import Readers, check_read, read_rows
from .reading_api import router as reading_router
from .resolve import ServerSettings, plain_file, describe, label, options, plot_path, resolve_steering, unknown_vector
from .runner import Busy, Done, Engine, GenJob, Runner
from .schemas import BuildRequest, CompareRequest, GenerateRequest

if TYPE_CHECKING:
    from ..models import ModelInfo
    from ..vectors import SteeringVector
    from .builds import Build

DESCRIPTION = """Activation-steering studio: compare a model's base and steered output, build persona
vectors from contrast texts, and talk to a steered model through an OpenAI-compatible API.
Strength is in residual-norm units (1.0 adds one typical residual norm at each applied layer)."""


def _adds_special_tokens(tok: Any) -> bool:
    """Whether plain encoding adds tokens (a BOS) of its own; asked once, before the runner owns the tokenizer."""
    return tok("x")["input_ids"] != tok("x", add_special_tokens=False)["input_ids"]


def _data(name: str) -> str:
    return resources.files("steerlab").joinpath("data", name).read_text(encoding="utf-8")


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
    build_call = build_worker.call if build_worker is not None else runner.call
    build_model = build_worker.model if build_worker is not None else lm.loaded

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            for build in app.state.builds.active():
                build.cancel.set()
            if build_worker is not None:
                build_worker.close()
            await asyncio.to_thread(runner.close)

    # /docs and /redoc with Swagger UI / ReDoc served from the fastapi-offline package: no CDN, works offline
    app = FastAPIOffline(title="steerlab studio", description=DESCRIPTION, version="0.1.0", lifespan=lifespan)
    app.state.lm = lm
    app.state.store = store
    app.state.settings = settings
    app.state.runner = runner
    app.state.builds = Builds()
    app.state.readers = Readers()
    app.state.build_worker = build_worker
    app.state.adds_special_tokens = _adds_special_tokens(lm.tokenizer)
    app.state.budget = budget = PromptBudget(lm, max_prompt_tokens=settings.max_prompt_tokens,
                                             context=context_length(lm))
    examples = json.loads(_data("examples.json"))
    _install_error_handlers(app)
    app.add_middleware(Guard, settings=settings)

    def vector_info(name: str, vec: SteeringVector) -> dict[str, Any]:
        return describe(name, vec, settings=settings, folder=store.folder)

    # ---- page, health, examples -------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        html = resources.files(__package__).joinpath("static", "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html)

    @app.get("/health", summary="Liveness, model facts and queue state")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": lm.model_id, **runner.engine_info(),
                "n_layers": lm.n_layers, "hidden_size": lm.hidden_size, "chat_template": lm.has_chat_template,
                "vectors": store.names(), "strength_override": settings.strength, "max_new_tokens": MAX_NEW_TOKENS,
                "max_prompt_tokens": settings.max_prompt_tokens, "context": budget.context,
                "runner": runner.stats(), "builds": [b.as_dict() for b in app.state.builds.active()]}

    @app.get("/examples", summary="Example prompts (the seed's list of strings; ?detail=true adds hints)",
             responses=errors(422))
    def get_examples(detail: bool = False) -> list[Any]:
        return examples if detail else [e["prompt"] for e in examples]

    @app.get("/examples/precomputed", summary="Pre-computed base vs steered outputs (no model run)",
             responses=errors(404))
    def precomputed() -> Response:
        try:
            return Response(_data("precomputed.json"), media_type="application/json")
        except FileNotFoundError:
            raise HTTPException(404, "no pre-computed examples: run `steerlab examples`") from None

    # ---- generation -----------------------------------------------------------------------
    async def make_job(req: GenerateRequest | CompareRequest, compare: bool) -> tuple[GenJob, bridge.Channel, list]:
        store.refresh()  # a vector file changed on disk (e.g. `steerlab sweep` stored new defaults): re-read it
        steers, applied = resolve_steering(req.steering, req.strength, store=store, lm=lm, settings=settings,
                                           dose=req.dose, governor=req.governor, positions=req.positions)
        check_read(req.read, store)
        if compare and not steers:
            raise HTTPException(400, "compare needs steering: name a vector (GET /vectors lists them)")
        opts = options(req, steers, lm=lm, max_new_tokens=req.max_length, chat=req.chat)
        n_prompt = await asyncio.to_thread(budget.prompt_tokens, req.prompt, opts.chat)
        budget.check(n_prompt, req.max_length)
        channel = bridge.Channel()
        rows = [[], steers] if compare else [steers]
        job = GenJob(prompts=[req.prompt] * len(rows), steering=rows, options=opts, emit=channel.emit,
                     timeout_s=settings.request_timeout_s, prompt_tokens=n_prompt)
        bridge.submit(runner, job)
        return job, channel, applied

    def meta(done: Done) -> dict[str, Any]:
        return {"batch": {"jobs": done.batch_jobs, "rows": done.batch_rows},
                "timing": {"queued_s": round(done.queued_s, 4), "total_s": round(done.total_s, 4),
                           "first_token_s": None if done.first_token_s is None else round(done.first_token_s, 4)}}

    async def with_reading(req: GenerateRequest | CompareRequest, rows: list[str], done: Done,
                           result: dict[str, Any]) -> dict[str, Any]:
        """``result`` plus ``read``: per row, token readings of the reply (only when the request asks)."""
        if not req.read:
            return result
        got = await read_rows(app.state, req.read, [r.text for r in done.rows], prompts=[req.prompt] * len(rows),
                              chat=req.chat)
        return {**result, "read": dict(zip(rows, got))}

    def stream(job: GenJob, channel: bridge.Channel, request: Request, rows: list[str], applied: list,
               payload: Callable[[Done], dict[str, Any]], req: GenerateRequest | CompareRequest) -> StreamingResponse:
        held: list[Done] = []

        def hold(done: Done) -> list[bytes]:
            held.append(done)
            return []  # sent below, after the readings (if any)

        frames = bridge.stream_events(
            job, channel, request, first=[bridge.sse("start", {"rows": rows, "applied": applied})],
            delta=lambda d: bridge.sse("delta", {"row": rows[d.row], "text": d.text}
                                       | ({} if d.gain is None else {"gain": d.gain})),
            done=hold,
            error=lambda e: [bridge.sse("error", {"error": e.detail, "status": e.status_code})],
        )

        async def framed() -> AsyncIterator[bytes]:
            async for frame in frames:
                yield frame
            if held:
                try:
                    yield bridge.sse("done", await with_reading(req, rows, held[0], payload(held[0])))
                except HTTPException as e:
                    yield bridge.sse("error", {"error": e.detail, "status": e.status_code})

        return StreamingResponse(framed(), media_type="text/event-stream", headers=bridge.SSE_HEADERS)

    @app.post("/generate", summary="Generate one completion (the seed's endpoint; stream=true for SSE)",
              responses={**json_or_sse("The completion, or its events"), **errors(*GENERATION)})
    async def generate(req: GenerateRequest, request: Request) -> Any:
        job, channel, applied = await make_job(req, compare=False)

        def payload(done: Done) -> dict[str, Any]:
            row = done.rows[0]
            return {"success": True, "prompt": req.prompt, "generated": row.text, "steering": label(applied),
                    "applied": applied, "tokens": row.tokens, "finish_reason": row.finish_reason,
                    "governor": row.governor, **meta(done)}

        if req.stream:
            return stream(job, channel, request, ["generated"], applied, payload, req)
        done = await bridge.collect(job, channel, request)
        return await with_reading(req, ["generated"], done, payload(done))

    @app.post("/compare", summary="Base vs steered, in ONE batched generation (stream=true for SSE)",
              responses={**json_or_sse("Base and steered text, or their events"), **errors(*GENERATION)})
    async def compare(req: CompareRequest, request: Request) -> Any:
        job, channel, applied = await make_job(req, compare=True)

        def payload(done: Done) -> dict[str, Any]:
            base, steered = done.rows
            return {"success": True, "prompt": req.prompt, "base": base.text, "steered": steered.text,
                    "steering_type": label(applied), "applied": applied,
                    "tokens": {"base": base.tokens, "steered": steered.tokens}, "governor": steered.governor,
                    **meta(done)}

        if req.stream:
            return stream(job, channel, request, ["base", "steered"], applied, payload, req)
        done = await bridge.collect(job, channel, request)
        return await with_reading(req, ["base", "steered"], done, payload(done))

    # ---- vectors and builds ---------------------------------------------------------------
    @app.get("/vectors", summary="Loaded vectors with metadata")
    def list_vectors() -> dict[str, Any]:
        store.refresh()
        return {"model": lm.model_id, "n_layers": lm.n_layers, "hidden_size": lm.hidden_size,
                "strength_override": settings.strength,
                "vectors": [vector_info(n, store.vectors[n]) for n in store.names()]}

    def _named(name: str) -> str:
        if not NAME_PATTERN.fullmatch(name):
            raise HTTPException(404, f"no vector named {name!r}")
        return name

    @app.get("/vectors/{name}", summary="One vector's metadata", responses=errors(404))
    def get_vector(name: str) -> dict[str, Any]:
        store.refresh()
        vec = store.vectors.get(_named(name))
        if vec is None:
            raise unknown_vector(name, store)
        return vector_info(name, vec)

    @app.get("/vectors/{name}/plot", summary="The vector's sweep plot (written by `steerlab sweep`)",
             response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}, "description": "PNG"}, **errors(404)})
    def get_plot(name: str) -> FileResponse:
        path = plot_path(store.folder, _named(name))
        if not plain_file(path):
            raise HTTPException(404, f"no sweep plot for {name!r}: run `steerlab sweep {name}` to make one")
        return FileResponse(path, media_type="image/png")

    @app.post("/vectors", status_code=202, summary="Build a persona vector from contrast texts (background)",
              responses=errors(400, 403, 409, 413, 422, 503))
    def build_vector(req: BuildRequest) -> dict[str, Any]:
        builds: Builds = app.state.builds
        if builds.running(req.name):
            raise HTTPException(409, f"{req.name!r} is being built already; follow GET /builds/<id>")
        if not req.overwrite and (req.name in store.vectors or req.name in available_personas()):
            raise HTTPException(409, f"a vector or persona named {req.name!r} exists already: choose another name, "
                                     "or send \"overwrite\": true to replace it")
        bad = [x for x in req.default_layers or () if x >= lm.n_layers]
        if bad:
            raise HTTPException(400, f"default_layers {bad} out of range: this model has layers 0..{lm.n_layers - 1}")
        try:
            build = builds.start(req, call=build_call, store=store, model=build_model,
                                 batch_size=settings.build_batch_size, describe=vector_info)
        except Busy as exc:
            raise bridge.http_error(exc) from None
        return build.as_dict()

    def _build(build_id: str) -> Build:
        build = app.state.builds.get(build_id)
        if build is None:
            raise HTTPException(404, f"no build {build_id!r} (builds are kept while the server runs)")
        return build

    @app.get("/builds/{build_id}", summary="A build's state and progress (poll it)", responses=errors(404))
    def build_status(build_id: str) -> dict[str, Any]:
        return _build(build_id).as_dict()

    @app.delete("/builds/{build_id}", summary="Cancel a build (it stops at its next batch of texts)",
                responses=errors(403, 404))
    def cancel_build(build_id: str) -> dict[str, Any]:
        build = _build(build_id)
        if not build.final:
            build.cancel.set()
        return build.as_dict()

    @app.get("/builds/{build_id}/events", summary="A build's progress as server-sent events",
             responses={200: {"content": {"text/event-stream": {}}, "description": "progress events"},
                        **errors(404)})
    async def build_events(build_id: str, request: Request) -> StreamingResponse:
        build = _build(build_id)

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

    from .openai_api import router as openai_router

    app.include_router(openai_router)
    app.include_router(reading_router)
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
