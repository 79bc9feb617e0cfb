"""Every `steerlab generate/compare` example in the README, `--help` and docs/dose.md, run on the real
model at the settings it states, must read fluently and on concept (the sweep's own scores).

The commands are extracted from the files, so an example edited into a setting that breaks the text
fails here. All examples run as one batch (base and steered rows), greedy, 48 new tokens.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from steerlab.cli import main
from steerlab.steer_syntax import steering_from_options
from steerlab.evaluate import reference_similarity, score_texts
from steerlab.generate import GenerationOptions, generate
from steerlab.personas import get_persona

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", ROOT / "docs" / "dose.md"]
pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_torch_thread")]
MIN_FLUENCY = 0.5
MIN_CONCEPT = 0.15


def documented_commands() -> list[list[str]]:
    texts = [p.read_text(encoding="utf-8") for p in SOURCES] + [main.help or ""]
    out = []
    for text in texts:
        for line in text.splitlines():
            m = re.match(r"\s*(steerlab (?:generate|compare) .*?)(?:\s+#.*)?$", line)
            if m and "--steer" in m.group(1):
                out.append(shlex.split(m.group(1))[1:])
    return list({tuple(c): c for c in out}.values())


def test_the_docs_have_examples():
    cmds = documented_commands()
    assert len(cmds) >= 4 and any("--dose" in " ".join(c) or "dose=" in " ".join(c) for c in cmds)


class _Store:
    def __init__(self, vectors: dict) -> None:
        self.vectors = vectors

    def get(self, name: str):  # noqa: ANN201
        return self.vectors[name]


def _parse(cmd: list[str]) -> tuple[str, dict]:
    """(prompt, the generation_options keywords) of ``steerlab generate|compare PROMPT ...``."""
    ctx = main.commands[cmd[0]].make_context(cmd[0], cmd[1:], resilient_parsing=False)
    kw = dict(ctx.params)
    return kw.pop("prompt"), kw


def test_documented_examples_read_fluently_and_on_concept(real_lm, real_vectors):
    from steerlab.embed import load_embedder

    emb = load_embedder()
    store = _Store(real_vectors)
    prompts, rows, names = [], [], []
    for cmd in documented_commands():
        prompt, kw = _parse(cmd)
        steering = steering_from_options(real_lm, store, kw)
        prompts += [prompt, prompt]
        rows += [[], steering]
        names.append((" ".join(cmd), [st.vector.name for st in steering]))
    texts = generate(real_lm, prompts, rows, options=GenerationOptions(max_new_tokens=48))
    failures = []
    for i, (cmd, vecs) in enumerate(names):
        base_text, steered = texts[2 * i], texts[2 * i + 1]
        scores = []
        for name in vecs:  # a blend must show every part
            p = get_persona(name)
            ref = reference_similarity(emb, p.positive, p.description)
            kw = dict(description=p.description, keywords=p.keywords, reference=ref)
            base = score_texts(real_lm, emb, [prompts[2 * i]], [base_text], **kw)
            scores.append(score_texts(real_lm, emb, [prompts[2 * i]], [steered], base=base, **kw)[0])
        fluency = scores[0].fluency
        on_concept = any(s.concept >= MIN_CONCEPT or s.hits > 0 for s in scores)
        if fluency < MIN_FLUENCY or not on_concept:
            failures.append(f"{cmd}: F={fluency:.2f}, C={[round(s.concept, 2) for s in scores]}, "
                            f"hits={[s.hits for s in scores]}: {steered[:200]!r}")
    assert not failures, "\n".join(failures)
