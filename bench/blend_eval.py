"""Do blended doses stay fluent? Pairs of built-in personas at equal doses, on held-out prompts.

For each pair and dose, one batched generation on the held-out neutral prompts (the last N of
the shipped list; calibration uses the first 4), scored with the sweep's components: fluency F
(persona independent) and each part's concept C. The *push* of a row is the sum over its parts of
``strength x layers / (max_strength x calibrated layers)``: 1.0 is one vector at dose 1. The
blend check in :func:`steerlab.spec.resolve_rows` warns above ``BLEND_LIMIT``; this bench is where
that limit comes from. Writes bench/blend_results.json.

    python bench/blend_eval.py                      # ~10 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from steerlab import load_model
from steerlab.calibrate import default_embedder
from steerlab.evaluate import neutral_prompts, reference_similarity, score_texts
from steerlab.generate import GenerationOptions, generate
from steerlab.personas import get_persona
from steerlab.spec import Steer, blend_push, resolve_rows
from steerlab.store import VectorStore

HERE = Path(__file__).parent
PAIRS = (("weeknd", "toronto"), ("tabby_cats", "toronto"), ("tabby_cats", "weeknd"))
DOSES = (0.35, 0.5, 0.7, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--penalty", type=float, default=1.2)
    ap.add_argument("--vectors", default=None, help="a vectors folder (default: a fresh temporary one)")
    ap.add_argument("--out", default=str(HERE / "blend_results.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model()
    emb = default_embedder()
    store = VectorStore(args.vectors or tempfile.mkdtemp(prefix="steerlab-blend-"), lm)
    store.ensure_builtins()
    prompts = neutral_prompts()[-args.prompts:]
    opts = GenerationOptions(max_new_tokens=args.new_tokens, repetition_penalty=args.penalty)
    settings: list[list[Steer]] = [[]]
    for a, b in PAIRS:
        settings += [[Steer(store.vectors[a], dose=d), Steer(store.vectors[b], dose=d)] for d in DOSES]
    rows = [s for s in settings for _ in prompts]
    texts: list[str] = []
    for i in range(0, len(rows), 48):
        texts += generate(lm, (prompts * len(settings))[i : i + 48], rows[i : i + 48], options=opts)
    k = len(prompts)
    results = []
    personas = {n: get_persona(n) for pair in PAIRS for n in pair}
    bases = {}
    for n, p in personas.items():
        ref = reference_similarity(emb, p.positive, p.description)
        kw = dict(description=p.description, keywords=p.keywords, reference=ref)
        bases[n] = (kw, score_texts(lm, emb, prompts, texts[:k], **kw))
    for j, setting in enumerate(settings[1:], start=1):
        chunk = texts[j * k : (j + 1) * k]
        (resolved,) = resolve_rows([setting], lm.n_layers)
        rec = {"parts": [st.vector.name for st in setting], "dose": setting[0].dose,
               "push": round(blend_push(resolved), 3), "C": {}, "example": chunk[0][:200]}
        for st in setting:
            kw, base = bases[st.vector.name]
            sc = score_texts(lm, emb, prompts, chunk, base=base, **kw)
            rec["C"][st.vector.name] = round(sum(s.concept for s in sc) / k, 3)
            rec["F"] = round(sum(s.fluency for s in sc) / k, 3)
        results.append(rec)
        print(json.dumps(rec)[:300], flush=True)
    Path(args.out).write_text(json.dumps({"prompts": k, "new_tokens": args.new_tokens, "penalty": args.penalty,
                                          "results": results}, indent=1))
    print("\n| parts | dose each | push | F | C per part |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {' + '.join(r['parts'])} | {r['dose']} | {r['push']} | {r['F']} | "
              f"{' / '.join(f'{v:.2f}' for v in r['C'].values())} |")


if __name__ == "__main__":
    main()
