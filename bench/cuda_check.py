"""Correctness of steering on an accelerator (CUDA/MPS), with the default model's architecture.

    python bench/cuda_check.py --random-weights DIR [--device cuda] [--dtype bfloat16]

Random weights because the embedded weights cannot always travel to a GPU machine; every
check here is about mechanics (device/dtype alignment, exact patching, clean removal, per-row
batches, extraction), which do not depend on the weight values. Prints one line per check
and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import load, random_vector  # noqa: E402

from steerlab import GenerationOptions, Steer, build_vector, generate, steer  # noqa: E402
from steerlab.hooks import capture, run_until_captured  # noqa: E402

TEXTS = ["The cat sat on the mat and purred.", "Toronto has a tall tower by the lake.",
         "Money saved today is money for tomorrow.", "A computer runs programs people write."]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-weights", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    lm = load(args)
    print(f"model {lm.model_id} on {lm.device} {lm.dtype}")
    failures = 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)

    mid = lm.n_layers // 2
    vec = random_vector(lm, [mid], 1)
    enc = lm.tokenizer(TEXTS[:2], return_tensors="pt", padding=True).to(lm.device)

    def block_out(layer: int) -> torch.Tensor:
        with capture(lm, [layer], stop_early=False) as st, torch.no_grad():
            run_until_captured(lm, **enc)
        return st[layer]

    before = block_out(mid)
    with steer(lm, [Steer(vec, strength=0.5)]):
        after = block_out(mid)
        prev = block_out(mid - 1)
    delta = vec.deltas(strength=0.5)[mid].to(lm.device, lm.dtype)
    check("patch exact at layer (same dtype add)", torch.equal(after, before + delta))
    check("layer before untouched", torch.equal(prev, block_out(mid - 1)))

    with torch.no_grad():
        ref = lm.model(**enc).logits
        with steer(lm, [Steer(vec, strength=0.5)]):
            steered = lm.model(**enc).logits
        again = lm.model(**enc).logits
    check("steering changes logits", not torch.equal(ref, steered))
    check("removal restores logits bit for bit", torch.equal(ref, again))

    opts = GenerationOptions(max_new_tokens=8, repetition_penalty=1.0)
    a, b = random_vector(lm, [mid - 2], 2), random_vector(lm, [mid + 2], 3)
    rows = [[Steer(a, strength=0.4)], [], [Steer(b, strength=0.3), Steer(a, strength=-0.2)]]
    prompts = ["Tell me a story.", "Tell me a joke.", "Tell me a fact."]
    batched = generate(lm, prompts, rows, options=opts)
    single = [generate(lm, [p], r, options=opts)[0] for p, r in zip(prompts, rows)]
    same = sum(x == y for x, y in zip(batched, single))
    check("per-row batch == individual rows (greedy)", same == 3, f"{same}/3 equal")
    base = generate(lm, prompts[1], options=opts)[0]
    check("unsteered row in a mixed batch == plain run", batched[1] == base)

    built = build_vector(lm, TEXTS[:2], TEXTS[2:], layers=[1, mid], progress=False)
    ok = all(d.device.type == "cpu" and d.dtype == torch.float32 and abs(float(d.norm()) - 1) < 1e-4
             for d in built.directions.values())
    check("extraction on device -> fp32 CPU unit directions", ok, f"norms {[round(v, 1) for v in built.norms.values()]}")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
