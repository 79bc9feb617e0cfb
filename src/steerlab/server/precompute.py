"""Pre-computed examples: base vs steered outputs per persona, for the page to show offline.

Owns the content of ``steerlab/data/precomputed.json`` (the seed's ``examples/`` folder) and
how it is made: greedy decoding, every row (each prompt's base and each persona's steered
version) in one batched generation per mode (chat template or raw completion, as each example
prompt says), so the base text is shared by all personas.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, UTC
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..defaults import REPETITION_PENALTY
from ..generate import GenerationOptions, generate
from ..hooks import Steer
from ..store import VectorStore

if TYPE_CHECKING:
    from ..models import LoadedModel


def default_output() -> Path:
    """The shipped file (inside the package; the source tree under an editable install)."""
    return Path(str(resources.files("steerlab").joinpath("data", "precomputed.json")))


def example_prompts(n: int) -> list[tuple[str, bool]]:
    """The first ``n`` studio examples as (prompt, chat): each runs in the mode it was written for
    (``"mode": "chat"`` through the chat template, ``"raw"`` as a completion)."""
    data = json.loads(resources.files("steerlab").joinpath("data", "examples.json").read_text(encoding="utf-8"))
    return [(e["prompt"], e.get("mode", "chat") == "chat") for e in data[:n]]


def precompute(lm: LoadedModel, store: VectorStore, strengths: dict[str, float | None], prompts: list[tuple[str, bool]],
               *, max_new_tokens: int = 48) -> dict[str, Any]:
    """Greedy base and steered completions of ``prompts`` ((text, chat) pairs) for each vector
    named in ``strengths`` (at that strength; None: the vector's default, a dose once its window
    is measured). One batch per mode."""
    vectors = {name: store.get(name) for name in strengths}  # builds a missing built-in persona first
    texts: dict[tuple[int, str | None], str] = {}  # (prompt index, persona or None for base) -> text
    applied_by_name: dict[str, dict] = {}
    for chat in (True, False):
        chosen = [i for i, (_, c) in enumerate(prompts) if c == chat and (lm.has_chat_template or not c)]
        if not chosen:
            continue
        keys = [(i, None) for i in chosen] + [(i, name) for name in vectors for i in chosen]
        steering = [[] if name is None else [Steer(vectors[name], strength=strengths[name])] for _, name in keys]
        report: dict = {}
        outs = generate(lm, [prompts[i][0] for i, _ in keys], steering,
                        options=GenerationOptions(max_new_tokens=max_new_tokens, chat=chat), report=report)
        texts |= dict(zip(keys, outs, strict=True))
        for row, (_, name) in enumerate(keys):
            if name is not None:
                applied_by_name.setdefault(name, report["steering"][row][0])
    done = sorted({i for i, _ in texts})
    personas = {}
    for name, vec in vectors.items():
        applied = applied_by_name[name]
        personas[name] = {
            **{k: applied[k] for k in ("dose", "strength", "scale", "operator", "governor") if k in applied},
            "layers": applied["layers"],
            "description": vec.description,
            "examples": [{"prompt": prompts[i][0], "chat": prompts[i][1], "base": texts[(i, None)],
                          "steered": texts[(i, name)]} for i in done],
        }
    return {
        "model": lm.model_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "decoding": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "repetition_penalty": REPETITION_PENALTY},
        "personas": personas,
    }


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write atomically (temp file + rename), UTF-8, readable diffs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
