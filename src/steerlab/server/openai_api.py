"""OpenAI-compatible routes: POST /v1/chat/completions (plain and streaming) and GET /v1/models.

Owns the translation between OpenAI's chat schema and a runner job: messages become one
prompt (the chat template renders them), the extra ``steering``/``strength`` fields steer the
reply, and results come back as ``chat.completion`` objects or ``chat.completion.chunk``
server-sent events ending with ``data: [DONE]``. Existing clients work unchanged; steering
goes in the request body (``extra_body`` in the ``openai`` Python client).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from . import bridge
from .conditions import annotate, decide_rows
from .reading_api import check_read, read_rows
from .openapi import GENERATION, errors, json_or_sse
from .resolve import options, resolve_steering
from .runner import Done, GenJob
from .schemas import ChatRequest
from .state import studio

if TYPE_CHECKING:
    from ..models import ModelInfo

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


def render(lm: ModelInfo, messages: list, *, adds_special: bool) -> tuple[str, bool | None]:
    """One prompt from chat messages, and the ``chat`` flag to generate it with."""
    try:
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    except ValueError as exc:
        raise HTTPException(400, f"messages: {exc}") from None
    if msgs[-1]["role"] != "user":
        raise HTTPException(400, "messages: the last message must come from the user")
    if len(msgs) == 1:  # the same path as /generate: the template (if any) is applied by generate()
        return msgs[0]["content"], None
    if not lm.has_chat_template:
        raise HTTPException(400, f"{lm.model_id} has no chat template: send a single user message")
    text = lm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    bos = getattr(lm.tokenizer, "bos_token", None)
    if adds_special and bos and text.startswith(bos):  # the tokenizer will add it again
        text = text[len(bos):]
    return text, False


@router.get("/models", summary="The one loaded model, as OpenAI's model list", responses=errors(openai=True))
def models(request: Request) -> dict[str, Any]:
    lm = studio(request).lm
    return {"object": "list", "data": [{"id": lm.model_id, "object": "model", "created": 0, "owned_by": "steerlab"}]}


@router.post("/chat/completions", summary="OpenAI chat completions with an extra `steering` field",
             responses={**json_or_sse("A chat.completion, or chat.completion.chunk events ending in [DONE]"),
                        **errors(*GENERATION, openai=True)})
async def chat_completions(req: ChatRequest, request: Request) -> Any:
    state = studio(request)
    lm, settings = state.lm, state.settings
    prompt, chat = render(lm, req.messages, adds_special=state.adds_special_tokens)
    steers, applied = resolve_steering(req.steering, req.strength, store=state.store, lm=lm, settings=settings,
                                       dose=req.dose, governor=req.governor)
    check_read(req.read, state.store)
    opts = options(req, steers, lm=lm, max_new_tokens=req.new_tokens, chat=chat)
    n_prompt = await asyncio.to_thread(state.budget.prompt_tokens, prompt, opts.chat)
    state.budget.check(n_prompt, req.new_tokens, field="messages", new_field="max_tokens")
    user = next((m.text() for m in reversed(req.messages) if m.role == "user"), prompt)  # what conditions read
    rows, outcomes = await decide_rows(state, user, [steers])
    channel = bridge.Channel()
    job = GenJob(prompts=[prompt], steering=rows, options=opts, emit=channel.emit,
                 timeout_s=settings.request_timeout_s, prompt_tokens=n_prompt)
    bridge.submit(state.runner, job)
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.model or lm.model_id

    def usage(done: Done) -> dict[str, int]:
        row = done.rows[0]
        return {"prompt_tokens": row.prompt_tokens, "completion_tokens": row.tokens,
                "total_tokens": row.prompt_tokens + row.tokens}

    async def reading(done: Done) -> dict[str, Any]:
        """The extra ``read`` field: token readings of the reply (only when asked)."""
        if not req.read:
            return {}
        rows = await read_rows(state, req.read, [done.rows[0].text], prompts=[prompt], chat=chat)
        return {"read": rows[0]}

    if not req.stream:
        done = await bridge.collect(job, channel, request)
        row = done.rows[0]
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": row.text},
                             "finish_reason": row.finish_reason, "logprobs": None}],
                "usage": usage(done), "steering": annotate(applied, outcomes[0], done.rows[0].conditions),
                **(await reading(done))}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    held: list[Done] = []

    def done_frames(done: Done) -> list[bytes]:
        if req.read and not held:  # readings first: sent from framed() below
            held.append(done)
            return []
        frames = [bridge.sse(None, chunk({}, done.rows[0].finish_reason))]
        if (req.stream_options or {}).get("include_usage"):
            frames.append(bridge.sse(None, {**chunk({}), "choices": [], "usage": usage(done)}))
        return [*frames, bridge.sse(None, "[DONE]")]

    def error_frames(exc: HTTPException) -> list[bytes]:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return [bridge.sse(None, {"error": {"message": exc.detail, "type": kind, "code": exc.status_code}}),
                bridge.sse(None, "[DONE]")]

    frames = bridge.stream_events(
        job, channel, request, first=[bridge.sse(None, chunk({"role": "assistant", "content": ""}))],
        delta=lambda d: bridge.sse(None, chunk({"content": d.text})), done=done_frames, error=error_frames,
    )

    async def framed() -> Any:
        async for frame in frames:
            yield frame
        if held:  # a last chunk with no choices carries the readings, then the usual ending
            try:
                yield bridge.sse(None, {**chunk({}), "choices": [], **(await reading(held[0]))})
            except HTTPException as exc:
                for frame in error_frames(exc):
                    yield frame
                return
            for frame in done_frames(held[0]):
                yield frame

    return StreamingResponse(framed(), media_type="text/event-stream", headers=bridge.SSE_HEADERS)
