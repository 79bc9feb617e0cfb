"""Pre-computed examples: base vs steered outputs per persona, for the page to show offline.

Owns the content of ``steerlab/data/precomputed.json`` (the seed's ``examples/`` folder) and
how it is made: greedy decoding, every row (each prompt's base and each persona's steered
version) in ONE batched generation, so the base text is shared by all personas.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from ..generate import GenerationOptions, generate
from ..hooks import Steer
from ..store import VectorStore


def default_output() -> Path:
    """The shipped file (inside the package; the source tree under an editable install)."""
    return Path(str(resources.files("steerlab").joinpath("data", "precomputed.json")))


def example_prompts(n: int) -> list[str]:
    data = json.loads(resources.files("steerlab").joinpath("data", "examples.json").read_text(encoding="utf-8"))
    return [e["prompt"] for e in data[:n]]


def precompute(lm, store: VectorStore, strengths: dict[str, float | None], prompts: list[str], *,
               max_new_tokens: int = 48) -> dict[str, Any]:  # noqa: ANN001
    """Greedy base and steered completions of ``prompts`` for each vector named in ``strengths``
    (at that strength; None: the vector's default, a dose once its window is measured)."""
    vectors = {name: store.get(name) for name in strengths}  # builds a missing built-in persona first
    rows_prompts = list(prompts)
    rows_steering: list[list[Steer]] = [[] for _ in prompts]
    for name, vec in vectors.items():
        rows_prompts += prompts
        rows_steering += [[Steer(vec, strength=strengths[name])] for _ in prompts]
    report: dict = {}
    texts = generate(lm, rows_prompts, rows_steering, options=GenerationOptions(max_new_tokens=max_new_tokens),
                     report=report)
    base, steered = texts[: len(prompts)], texts[len(prompts):]
    personas = {}
    for i, (name, vec) in enumerate(vectors.items()):
        outs = steered[i * len(prompts): (i + 1) * len(prompts)]
        applied = report["steering"][len(prompts) * (i + 1)][0]
        personas[name] = {
            **{k: applied[k] for k in ("dose", "strength", "scale", "operator", "governor") if k in applied},
            "layers": applied["layers"],
            "description": vec.description,
            "examples": [{"prompt": p, "base": b, "steered": s} for p, b, s in zip(prompts, base, outs, strict=True)],
        }
    return {
        "model": lm.model_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "decoding": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "repetition_penalty": 1.2},
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
