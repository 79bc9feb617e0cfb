"""What the OpenAPI schema says each route can answer: error statuses, their JSON shape, content types.

Owns the ``responses=`` declarations, so ``/openapi.json`` lists every status and content type
the server really sends (the fuzz tests check responses against it). Nothing here runs per request.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error outside /v1: a message, and details (a 422 lists the fields)."""

    error: str = Field(description="What went wrong and what to do.")
    detail: Any = Field(None, description="The message again, or a list of {loc, msg, type} for a 422.")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class OpenAIError(BaseModel):
    """Errors under /v1, in OpenAI's shape."""

    error: OpenAIErrorDetail


WHY = {
    400: "A request the model cannot serve: prompt over the token bounds or the model's context, a layer out of "
         "range, compare without steering, a chat template problem.",
    401: "The API key is set and this request has none or a wrong one.",
    403: "Refused: building on a non-loopback bind without a key, or a Host/Origin that is not this server.",
    404: "Unknown vector, build or plot.",
    409: "A vector or build of that name exists or is running.",
    413: "The request body is over the size cap.",
    422: "Malformed JSON or a field out of bounds (the message names the field).",
    503: "Busy (queue full), shutting down, or out of memory; Retry-After says when to retry.",
    504: "The request ran past its time limit.",
}


def errors(*codes: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these error statuses (401 is always possible: --api-key-all)."""
    model = OpenAIError if openai else ErrorBody
    return {code: {"model": model, "description": WHY[code]} for code in sorted({401, *codes})}


def json_or_sse(description: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is JSON, or server-sent events when the request says ``"stream": true``."""
    return {200: {"description": description, "content": {
        "application/json": {},
        "text/event-stream": {"schema": {"type": "string", "description": "server-sent events"}}}}}


GENERATION = (400, 404, 413, 422, 503, 504)
