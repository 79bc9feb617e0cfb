"""The studio's generation routes: POST /generate and POST /compare (JSON or server-sent events).

Owns turning a request into a runner job (steering resolved, prompt budget checked), the
response payloads, and the optional token readings of the replies. The OpenAI-compatible
route is :mod:`steerlab.server.openai_api`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from . import bridge
from .conditions import annotate, decide_rows
from .jobs import Done, GenJob
from .live_read import LiveRead, delta_frame
from .openapi import GENERATION, errors, json_or_sse
from .reading_api import check_read, read_rows
from .resolve import label, options, resolve_steering
from .schemas import CompareRequest, GenerateRequest
from .state import Studio, StudioDep

router = APIRouter()


Applied = Callable[[Done | None], list[dict[str, Any]]]  # what was applied; with conditions' outcomes once done


async def make_job(s: Studio, req: GenerateRequest | CompareRequest,
                   compare: bool) -> tuple[GenJob, bridge.Channel, Applied]:
    """Resolve the request's steering, check its budget, and submit its job (1 row, or base + steered)."""
    lm, store, settings, budget = s.lm, s.store, s.settings, s.budget
    store.refresh()  # a vector file changed on disk (e.g. `steerlab sweep` stored new defaults): re-read it
    steers, applied = resolve_steering(req.steering, req.strength, store=store, lm=lm, settings=settings,
                                       dose=req.dose, governor=req.governor, positions=req.positions)
    check_read(req.read, store)
    if compare and not steers:
        raise HTTPException(400, "compare needs steering: name a vector (GET /vectors lists them)")
    opts = options(req, steers, lm=lm, max_new_tokens=req.max_length, chat=req.chat)
    n_prompt = await asyncio.to_thread(budget.prompt_tokens, req.prompt, opts.chat)
    budget.check(n_prompt, req.max_length)
    rows, outcomes = await decide_rows(s, req.prompt, [[], steers] if compare else [steers])
    channel = bridge.Channel()
    job = GenJob(prompts=[req.prompt] * len(rows), steering=rows, options=opts, emit=channel.emit,
                 timeout_s=settings.request_timeout_s, prompt_tokens=n_prompt)
    if req.stream and req.read:  # each token's reading streams too (the reader is made on the worker)
        vecs = [store.vectors[n] for n in dict.fromkeys(req.read)]
        job.live_read = LiveRead(lambda: s.readers.get(lm.loaded(), vecs))
    bridge.submit(s.runner, job)
    # what was applied, with whether each condition fired (text conditions: known once done)
    return job, channel, lambda done: annotate(applied, outcomes[-1], done.rows[-1].conditions if done else None)


def meta(done: Done) -> dict[str, Any]:
    return {"batch": {"jobs": done.batch_jobs, "rows": done.batch_rows},
            "timing": {"queued_s": round(done.queued_s, 4), "total_s": round(done.total_s, 4),
                       "first_token_s": None if done.first_token_s is None else round(done.first_token_s, 4)}}


async def with_reading(s: Studio, req: GenerateRequest | CompareRequest, rows: list[str], done: Done,
                       result: dict[str, Any]) -> dict[str, Any]:
    """``result`` plus ``read``: per row, token readings of the reply (only when the request asks)."""
    if not req.read:
        return result
    got = await read_rows(s, req.read, [r.text for r in done.rows], prompts=[req.prompt] * len(rows),
                          chat=req.chat)
    return {**result, "read": dict(zip(rows, got))}


def stream(s: Studio, job: GenJob, channel: bridge.Channel, request: Request, rows: list[str], applied: Applied,
           payload: Callable[[Done], dict[str, Any]], req: GenerateRequest | CompareRequest) -> StreamingResponse:
    held: list[Done] = []

    def hold(done: Done) -> list[bytes]:
        held.append(done)
        return []  # sent below, after the readings (if any)

    frames = bridge.stream_events(
        job, channel, request, first=[bridge.sse("start", {"rows": rows, "applied": applied(None)})],
        delta=lambda d: delta_frame(d, rows),
        done=hold,
        error=lambda e: [bridge.sse("error", {"error": e.detail, "status": e.status_code})],
    )

    async def framed() -> AsyncIterator[bytes]:
        async for frame in frames:
            yield frame
        if held:
            try:
                yield bridge.sse("done", await with_reading(s, req, rows, held[0], payload(held[0])))
            except HTTPException as e:
                yield bridge.sse("error", {"error": e.detail, "status": e.status_code})

    return StreamingResponse(framed(), media_type="text/event-stream", headers=bridge.SSE_HEADERS)


@router.post("/generate", summary="Generate one completion (the seed's endpoint; stream=true for SSE)",
             responses={**json_or_sse("The completion, or its events"), **errors(*GENERATION)})
async def generate(req: GenerateRequest, request: Request, s: StudioDep) -> Any:
    job, channel, applied = await make_job(s, req, compare=False)

    def payload(done: Done) -> dict[str, Any]:
        row = done.rows[0]
        return {"success": True, "prompt": req.prompt, "generated": row.text, "steering": label(applied(None)),
                "applied": applied(done), "tokens": row.tokens, "finish_reason": row.finish_reason,
                "governor": row.governor, **meta(done)}

    if req.stream:
        return stream(s, job, channel, request, ["generated"], applied, payload, req)
    done = await bridge.collect(job, channel, request)
    return await with_reading(s, req, ["generated"], done, payload(done))


@router.post("/compare", summary="Base vs steered, in ONE batched generation (stream=true for SSE)",
             responses={**json_or_sse("Base and steered text, or their events"), **errors(*GENERATION)})
async def compare(req: CompareRequest, request: Request, s: StudioDep) -> Any:
    job, channel, applied = await make_job(s, req, compare=True)

    def payload(done: Done) -> dict[str, Any]:
        base, steered = done.rows
        return {"success": True, "prompt": req.prompt, "base": base.text, "steered": steered.text,
                "steering_type": label(applied(None)), "applied": applied(done),
                "tokens": {"base": base.tokens, "steered": steered.tokens}, "governor": steered.governor,
                **meta(done)}

    if req.stream:
        return stream(s, job, channel, request, ["base", "steered"], applied, payload, req)
    done = await bridge.collect(job, channel, request)
    return await with_reading(s, req, ["base", "steered"], done, payload(done))
