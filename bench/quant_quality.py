"""Do bfloat16, int8 and int4 weights change what the model writes? Greedy replies and the sweep's scores.

    python bench/quant_quality.py                      # 8 neutral prompts, toronto; ~3 min on 2 busy cores
    python bench/quant_quality.py --prompts 24 --vectors toronto,tabby_cats --json /tmp/q.json

For each weight format (float32, bfloat16, ``--quantize int8``, ``--quantize int4``), the embedded model
writes greedy replies (steerlab's defaults: 40 new tokens, repetition penalty) to the first ``--prompts``
shipped neutral prompts, plain and steered by one vector at its defaults. Every reply is then scored
by the same judge, the float32 model (perplexity) and the sentence embedder (concept), exactly as a
sweep scores a cell (steerlab.evaluate.score_texts): a format's steered replies against its own plain
ones. Reported per format and vector: how many replies equal float32's word for word, the plain
replies' perplexity, the steered cell's concept C, fluency F and score S, and S minus float32's S
paired by prompt, with its standard error (a difference within about two standard errors is noise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from steerlab import Steer  # noqa: E402
from steerlab import evaluate as ev  # noqa: E402
from steerlab.embed import load_embedder  # noqa: E402
from steerlab.generate import GenerationOptions, generate  # noqa: E402
from steerlab.models import load_model  # noqa: E402
from steerlab.paths import default_vectors_dir  # noqa: E402
from steerlab.store import VectorStore  # noqa: E402

FORMATS = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
           "int8": dict(dtype="float32", quantize="int8"), "int4": dict(dtype="float32", quantize="int4")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--vectors", default="toronto", help="comma list of stored vectors")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"# load average at start {os.getloadavg()[0]:.2f}", flush=True)
    judge = load_model(dtype="float32")
    store = VectorStore(default_vectors_dir(), judge)
    vectors = [store.get(name) for name in args.vectors.split(",")]
    embedder = load_embedder()
    prompts = ev.neutral_prompts(args.prompts)
    opts = GenerationOptions(max_new_tokens=args.max_new_tokens)
    texts: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    scored: dict[tuple[str, str], tuple[list[ev.Scored], list[ev.Scored]]] = {}
    for name in args.formats.split(","):
        lm = judge if name == "float32" else load_model(**FORMATS[name])
        plain = generate(lm, prompts, None, options=opts)
        for vec in vectors:
            kw = dict(description=vec.description, keywords=vec.keywords)
            steered = generate(lm, prompts, [[Steer(vec)] for _ in prompts], options=opts)
            base = ev.score_texts(judge, embedder, prompts, plain, **kw)
            cell = ev.score_texts(judge, embedder, prompts, steered, base=base, **kw)
            texts[name, vec.name], scored[name, vec.name] = (plain, steered), (base, cell)
        print(f"# {name} done (load {os.getloadavg()[0]:.2f})", flush=True)
        del lm
    print(f"\n{len(prompts)} neutral prompts, greedy, {args.max_new_tokens} new tokens; steered at each vector's "
          f"defaults; every reply scored by the float32 model and the embedder\n")
    print("| weights | vector | plain = float32 | steered = float32 | plain ppl | steered C | steered F | steered S | "
          "S - float32's S (paired) |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    out = {}
    for (name, vname), (base, cell) in scored.items():
        ref_texts, ref_cell = texts["float32", vname], scored["float32", vname][1]
        same = [sum(a == b for a, b in zip(texts[name, vname][k], ref_texts[k])) for k in (0, 1)]
        diffs = [a.score - b.score for a, b in zip(cell, ref_cell)]
        d = statistics.mean(diffs)
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        ppl = math.exp(mean([math.log(s.ppl) for s in base]))
        row = {"same_plain": same[0], "same_steered": same[1], "plain_ppl": ppl, "C": mean([s.concept for s in cell]),
               "F": mean([s.fluency for s in cell]), "S": mean([s.score for s in cell]), "dS": d, "dS_se": se,
               "plain": texts[name, vname][0], "steered": texts[name, vname][1]}
        out[f"{name}/{vname}"] = row
        print(f"| {name} | {vname} | {same[0]}/{len(prompts)} | {same[1]}/{len(prompts)} | {ppl:.2f} | {row['C']:.3f} | "
              f"{row['F']:.3f} | {row['S']:.3f} | {d:+.3f} +- {se:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
