"""Roofline: this CPU's memory bandwidth, and decode tokens/s at batch 1 against it, per weight format.

    python bench/roofline.py                       # ~3 min on 2 busy cores
    python bench/roofline.py --threads 1 --repeats 5 --json /tmp/roofline.json
    python bench/roofline.py --threads 1 --formats float32,float32-compiled --batch 4

1. Bandwidth: torch copies a 256 MiB float32 tensor (bytes read + written) and sums it (bytes read),
   best of 10, with 1 and with 2 threads (numpy's copy as a cross-check).
2. Decode: the embedded model as float32 (steerlab's default path, cpu_matmul included), float32 with
   ``--compile`` (float32-compiled: the decode step as one torch.compile graph over a static KV cache;
   the first generation, which compiles it, is reported), bfloat16, ``--quantize int8`` and
   ``--quantize int4``, all loaded in this one process and timed interleaved: greedy, batch 1
   (``--batch``: more prompts), seconds for 1 + N new tokens minus seconds for 1 (so prefill drops out), / N.
   Bytes per token: every weight a decode step reads once: all linear layers (with their scales),
   norms, one embedding row, and the output head in full (SmolLM2 ties it to the embedding: in
   float32/bfloat16 the embedding matrix *is* the head; quantised, the head is its own int8 copy and
   the embedding is only looked up). The KV cache is left out (~46 KB per position in float32).
3. Share of bandwidth: bytes per token x tokens/s / the read bandwidth at the same thread count.

Prints markdown; ``--json`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from steerlab.compiled import generate_settings  # noqa: E402
from steerlab.cpu_matmul import decode_matmuls  # noqa: E402
from steerlab.generate import encode_prompts  # noqa: E402
from steerlab.models import LoadedModel, load_model  # noqa: E402

FORMATS = {"float32": dict(dtype="float32"), "float32-compiled": dict(dtype="float32", compile=True),
           "bfloat16": dict(dtype="bfloat16"),
           "int8": dict(dtype="float32", quantize="int8"), "int4": dict(dtype="float32", quantize="int4")}
PROMPTS = ["Give me three tips for saving money.", "Write a haiku about the sea.", "What is a good name for a dog?",
           "Explain rain to a child.", "Describe your ideal weekend.", "How do I boil an egg?",
           "Tell me about your favourite city.", "What should I cook tonight?"]


def _best(fn, reps: int = 10) -> float:  # noqa: ANN001
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bandwidth(threads: int, mib: int = 256) -> dict[str, float]:
    """GB/s: torch copy (read + write), torch sum (read), numpy copy (read + write)."""
    torch.set_num_threads(threads)
    a = torch.randn(mib * 2**20 // 4)
    b = torch.empty_like(a)
    out = {"copy": 2 * a.nbytes / _best(lambda: b.copy_(a)) / 1e9,
           "read": a.nbytes / _best(lambda: a.sum()) / 1e9}
    na, nb = a.numpy(), b.numpy()
    out["numpy copy"] = 2 * na.nbytes / _best(lambda: np.copyto(nb, na)) / 1e9
    return out


def bytes_per_token(lm: LoadedModel) -> int:
    """Weight bytes one decode step reads (see the module docstring)."""
    model = lm.model
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    w = emb.weight
    total = w.shape[1] * w.element_size()  # the input embedding: one row looked up
    seen = {id(w)}
    for name, mod in model.named_modules():
        if "rotary" in name:  # rope frequency tables are not weights read per token
            continue
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    if head is not None and getattr(head, "weight", None) is w:
        total += w.numel() * w.element_size()  # tied: the head reads the embedding matrix in full
    return total


@torch.no_grad()
def timed(lm: LoadedModel, enc: dict, n: int) -> float:
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
              eos_token_id=None)
    kw.update(generate_settings(lm, kw, enc["input_ids"].shape[1]))  # float32-compiled: the static cache, compiled
    t = time.perf_counter()
    with decode_matmuls(lm):
        lm.model.generate(**enc, **kw)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="thread counts to measure (comma list)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--batch", type=int, default=1, choices=range(1, len(PROMPTS) + 1), metavar="1-8",
                    help="rows per step (the roofline is batch 1; more rows read the same weights once per step)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    thread_counts = [int(x) for x in args.threads.split(",")]
    names = args.formats.split(",")
    print(f"# load average at start {os.getloadavg()[0]:.2f}; torch {torch.__version__}; {os.cpu_count()} cores",
          flush=True)
    bw = {n: bandwidth(n) for n in thread_counts}
    print("\n| threads | torch copy GB/s (r+w) | torch sum GB/s (read) | numpy copy GB/s (r+w) |\n| ---: | ---: | ---: | ---: |")
    for n, r in bw.items():
        print(f"| {n} | {r['copy']:.1f} | {r['read']:.1f} | {r['numpy copy']:.1f} |", flush=True)

    models = {name: load_model(**FORMATS[name]) for name in names}
    encs = {name: encode_prompts(lm, PROMPTS[: args.batch], None) for name, lm in models.items()}
    nbytes = {name: bytes_per_token(lm) for name, lm in models.items()}
    res: dict = {"bandwidth": bw, "bytes_per_token": nbytes, "decode": {}}
    for n in thread_counts:
        torch.set_num_threads(n)
        for name, lm in models.items():
            t = time.perf_counter()
            timed(lm, encs[name], 4)  # warm-up (cpu_matmul's path choice; float32-compiled: the compilation)
            if lm.slots is not None:
                res.setdefault("compile_s", {})[f"{n}/{name}"] = time.perf_counter() - t
                print(f"\n{name}: first generation (compiles the decode step) {time.perf_counter() - t:.1f} s",
                      flush=True)
        one: dict[str, list[float]] = {k: [] for k in models}
        full: dict[str, list[float]] = {k: [] for k in models}
        load0 = os.getloadavg()[0]
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                one[name].append(timed(models[name], encs[name], 1))
                full[name].append(timed(models[name], encs[name], 1 + args.new_tokens))
        load1 = os.getloadavg()[0]
        per = "" if args.batch == 1 else f" (tokens/s: steps per second; each step makes {args.batch} tokens)"
        print(f"\n## {n} thread(s): decode at batch {args.batch}{per}, {args.new_tokens} new tokens after the first, median of "
              f"{args.repeats} interleaved; load average {load0:.2f} -> {load1:.2f}\n")
        print("| weights | MB read per token | tokens/s | ms per token | GB/s streamed | share of read bandwidth | "
              "vs float32 |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        base = None
        for name in names:
            sec = (statistics.median(full[name]) - statistics.median(one[name])) / args.new_tokens
            tps = 1 / sec
            base = base or tps
            gbs = nbytes[name] * tps / 1e9
            res["decode"][f"{n}/{name}"] = {"tokens_per_s": tps, "gb_s": gbs, "share": gbs / bw[n]["read"],
                                            "one": one[name], "full": full[name], "load": [load0, load1]}
            print(f"| {name} | {nbytes[name] / 1e6:.0f} | {tps:.1f} | {sec * 1e3:.1f} | {gbs:.1f} | "
                  f"{100 * gbs / bw[n]['read']:.0f} % | {tps / base:.2f}x |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
