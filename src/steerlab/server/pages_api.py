"""The page, health and example routes (no model run)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse, Response

from .limits import MAX_NEW_TOKENS
from .openapi import errors
from .state import StudioDep

router = APIRouter()


def data_file(name: str) -> str:
    """A file shipped in ``steerlab/data``."""
    return resources.files("steerlab").joinpath("data", name).read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    html = resources.files(__package__).joinpath("static", "index.html").read_text(encoding="utf-8")
    return HTMLResponse(html)


@router.get("/health", summary="Liveness, model facts and queue state")
def health(s: StudioDep) -> dict[str, Any]:
    lm, settings = s.lm, s.settings
    return {"status": "ok", "model": lm.model_id, **s.runner.engine_info(),
            "n_layers": lm.n_layers, "hidden_size": lm.hidden_size, "chat_template": lm.has_chat_template,
            "vectors": s.store.names(), "strength_override": settings.strength, "max_new_tokens": MAX_NEW_TOKENS,
            "max_prompt_tokens": settings.max_prompt_tokens, "context": s.budget.context,
            "runner": s.runner.stats(), "builds": [b.as_dict() for b in s.builds.active()]}


@router.get("/examples", summary="Example prompts (the seed's list of strings; ?detail=true adds hints)",
            responses=errors(422))
def get_examples(s: StudioDep, detail: bool = False) -> list[Any]:
    return s.examples if detail else [e["prompt"] for e in s.examples]


@router.get("/examples/precomputed", summary="Pre-computed base vs steered outputs (no model run)",
            responses=errors(404))
def precomputed() -> Response:
    try:
        return Response(data_file("precomputed.json"), media_type="application/json")
    except FileNotFoundError:
        raise HTTPException(404, "no pre-computed examples: run `steerlab examples`") from None
