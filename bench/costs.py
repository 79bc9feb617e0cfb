"""What each steering feature costs, as a ratio to plain one-vector steering, measured side by side in one run.

    python bench/costs.py                          # ~12 min on 2 busy cores
    python bench/costs.py --batches 1 --tokens 16 --repeats 3 --skip-calibration

Generation cases (the embedded model, greedy, exactly ``--tokens`` new tokens per row, batch 1 and 8,
rows on the first shipped neutral prompts; each case timed ``--repeats`` times, cases interleaved
and the order reversed every other round, medians), all through steerlab's own generation path
(condition decision, governor and text gate, steering hooks, CPU matmul choice). The ratio is taken
on this process's CPU time (one torch thread): on a shared machine wall-clock ratios of a few
seconds' work swing by +-30 % with the neighbours' bursts; the wall-clock ratio is printed too.

  add                 toronto at its default dose, operator add, governor off (the reference: 1.00)
  add_norm ... rotate the same entry with another operator
  governor            the same entry with the coherence governor on
  condition (prompt)  the same entry with ``when`` a prompt condition on tabby_cats that always holds
                      (threshold -1e9): the reading pass over the prompt is the cost (with a Reader
                      made once, as the server keeps one; its making is timed apart)
  condition (text)    the same, re-read on the reply at every token
  readings            ``add``, then every reply read by a ready Reader (tabby_cats, toronto): what
                      a request with "read" adds after generating (streamed readings: bench/reading_cost.py)
  plain               no steering (add / plain is what steering itself costs)

One-off costs, seconds: the contrast-set doctor per built-in persona, and dose calibration
(steerlab.calibrate.calibrated: the dose window for operator add) per vector, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from steerlab import Steer  # noqa: E402
from steerlab.conditional import condition_vectors, decide  # noqa: E402
from steerlab.evaluate import neutral_prompts  # noqa: E402
from steerlab.generate import (GenerationOptions, encode_prompts, generation_kwargs, run_generate,  # noqa: E402
                               steering_session)
from steerlab.hooks import steering_rows  # noqa: E402
from steerlab.models import LoadedModel, load_model  # noqa: E402
from steerlab.paths import default_vectors_dir  # noqa: E402
from steerlab.spec import When, resolve_rows  # noqa: E402
from steerlab.store import VectorStore  # noqa: E402


@torch.no_grad()
def fixed_length(lm: LoadedModel, prompts: list[str], rows: list, tokens: int, reader: object = None) -> torch.Tensor:
    """steerlab.generate.generate's path, with every row held to exactly ``tokens`` new tokens.

    ``reader``: a Reader made once for the condition vectors, as the server keeps one (the library's
    generate() makes one per call: its neutral baseline is timed apart, as a one-off cost)."""
    opts = GenerationOptions(max_new_tokens=tokens)
    enc = encode_prompts(lm, prompts, None)
    kwargs = {**generation_kwargs(lm, opts), "min_new_tokens": tokens}
    resolved = resolve_rows(steering_rows(rows, len(prompts)), lm.n_layers)
    if condition_vectors(resolved):
        resolved, _ = decide(lm, prompts, resolved, reader=reader)  # type: ignore[arg-type]
    with steering_session(lm, resolved, len(prompts), kwargs, {}):
        out = run_generate(lm, **enc, **kwargs)
    return out[:, enc["input_ids"].shape[1]:]


def generation_costs(lm: LoadedModel, store: VectorStore, batch: int, tokens: int, repeats: int) -> dict:
    from steerlab.reading import Reader

    toronto, cats = store.get("toronto"), store.get("tabby_cats")
    add = Steer(toronto, operator="add", governor=False)
    always = -1e9
    cases = {"plain": None, "add": add}
    cases.update({op: replace(add, operator=op) for op in ("add_norm", "target", "cap", "rotate")})
    cases["governor"] = replace(add, governor=True)
    cases["condition (prompt)"] = replace(add, when=When(cats, threshold=always, on="prompt"))
    cases["condition (text)"] = replace(add, when=When(cats, threshold=always, on="text"))
    cases["readings"] = add
    reader = Reader(lm, [cats, toronto])
    t = time.perf_counter()
    cond_reader = Reader(lm, [cats])  # what decide() builds per call without one: the neutral baseline pass
    reader_s = time.perf_counter() - t
    prompts = neutral_prompts(batch)

    def run(name: str) -> tuple[float, float]:
        entry = cases[name]
        rows = [[entry] if entry is not None else [] for _ in prompts]
        t, c = time.perf_counter(), time.process_time()
        out = fixed_length(lm, prompts, rows, tokens, cond_reader)
        if name == "readings":
            reader.read_replies(prompts, [lm.tokenizer.decode(r, skip_special_tokens=True) for r in out])
        return time.perf_counter() - t, time.process_time() - c

    names = list(cases)
    for name in names:
        run(name)  # warm-up: matmul path, the conditions' baselines
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    load0 = os.getloadavg()[0]
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            w, c = run(name)
            wall[name].append(w)
            cpu[name].append(c)
    load1 = os.getloadavg()[0]
    med = {n: statistics.median(ts) for n, ts in cpu.items()}
    low = {n: min(ts) for n, ts in cpu.items()}
    med_wall = {n: statistics.median(ts) for n, ts in wall.items()}
    return {"load": [load0, load1], "cpu_seconds": cpu, "wall_seconds": wall, "median": med, "median_wall": med_wall,
            "ratio": {n: med[n] / med["add"] for n in names}, "ratio_min": {n: low[n] / low["add"] for n in names},
            "ratio_wall": {n: med_wall[n] / med_wall["add"] for n in names}, "condition_reader_s": reader_s}


def one_off_costs(lm: LoadedModel, store: VectorStore, calibrate: list[str]) -> dict:
    from steerlab.calibrate import calibrated
    from steerlab.doctor import doctor_persona
    from steerlab.personas import builtin_names, get_persona

    out: dict = {"doctor": {}, "calibration": {}}
    for name in builtin_names():
        load = os.getloadavg()[0]
        t = time.perf_counter()
        doctor_persona(lm, get_persona(name))
        out["doctor"][name] = (time.perf_counter() - t, load)
        print(f"# doctor {name}: {out['doctor'][name][0]:.1f} s (load {load:.2f})", flush=True)
    for name in calibrate:
        load = os.getloadavg()[0]
        t = time.perf_counter()
        calibrated(lm, store.get(name), operators=["add"])
        out["calibration"][name] = (time.perf_counter() - t, load)
        print(f"# calibration {name}: {out['calibration'][name][0]:.1f} s (load {load:.2f})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibrate", default="tabby_cats", help="vectors to calibrate (comma list)")
    ap.add_argument("--skip-calibration", action="store_true", help="no doctor and no calibration timings")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(device="cpu")
    store = VectorStore(default_vectors_dir(), lm)
    print(f"# {torch.get_num_threads()} torch thread(s); load average at start {os.getloadavg()[0]:.2f}", flush=True)
    res: dict = {"generation": {}}
    for batch in [int(b) for b in args.batches.split(",")]:
        res["generation"][batch] = generation_costs(lm, store, batch, args.tokens, args.repeats)
    if not args.skip_calibration:
        res.update(one_off_costs(lm, store, args.calibrate.split(",")))
    print(f"\n{args.tokens} new tokens per row, greedy, {args.repeats} interleaved rounds; ratio to `add` by this "
          "process's CPU time (what the work costs; a neighbour's bursts do not count): of the medians, of the "
          "minima (noise only adds time), and the wall-clock medians'\n")
    batches = list(res["generation"])
    print("| case | " + " | ".join(f"b{b} CPU s | b{b} ratio (median) | b{b} ratio (min) | b{b} wall ratio"
                                   for b in batches) + " |")
    print("| --- |" + " ---: | ---: | ---: | ---: |" * len(batches))
    g = res["generation"]
    for name in g[batches[0]]["median"]:
        cells = [f"{g[b]['median'][name]:.2f} | {g[b]['ratio'][name]:.3f} | {g[b]['ratio_min'][name]:.3f} | "
                 f"{g[b]['ratio_wall'][name]:.3f}" for b in batches]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for b in batches:
        print(f"\nbatch {b}: a condition's Reader (neutral baseline, made once per server; per call by the "
              f"library's generate()): {g[b]['condition_reader_s']:.2f} s")
    for b in batches:
        lo, hi = res["generation"][b]["load"]
        print(f"\nbatch {b}: load average {lo:.2f} -> {hi:.2f}")
    for kind in ("doctor", "calibration"):
        for name, (sec, load) in res.get(kind, {}).items():
            print(f"{kind} {name}: {sec:.1f} s at load {load:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
