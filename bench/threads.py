"""Threads on a busy machine: torch with 1 thread vs one per core, with and without a CPU-bound neighbour.

The neighbour is ``--neighbours`` processes spinning in pure Python (each holds one core), started
before the measurement and stopped after. Each cell: the embedded model, greedy, batch 1, a 16-token
reply and a 64-token one, median of ``--repeats``. Cells alternate, so a change in the machine's own
load hits both thread counts alike. Prints the load average seen, the seconds per cell and the ratio
(1 thread / N threads: below 1 means one thread is faster), and what steerlab.threads would choose.

    python bench/threads.py                   # ~4 min
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from neighbours import spinning

from steerlab import load_model, threads
from steerlab.generate import GenerationOptions, generate


def timed(lm, tokens: int, n_threads: int) -> float:  # noqa: ANN001
    torch.set_num_threads(n_threads)
    t = time.perf_counter()
    generate(lm, "Give me three tips for a rainy afternoon.", None, options=GenerationOptions(max_new_tokens=tokens))
    return time.perf_counter() - t


def cells(lm, cores: int, repeats: int) -> dict:  # noqa: ANN001
    out = {}
    for tokens in (16, 64):
        one, many = [], []
        for _ in range(repeats):
            one.append(timed(lm, tokens, 1))
            many.append(timed(lm, tokens, cores))
        out[tokens] = (statistics.median(one), statistics.median(many))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neighbours", type=int, default=None, help="busy processes (default: one per core)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cores = threads.usable_cores()
    lm = load_model()
    timed(lm, 4, cores)  # warm-up (and the CPU matmul path choice)
    for label, n in (("as found", 0), ("with neighbours", args.neighbours or cores)):
        with spinning(n):
            load = os.getloadavg()[0]
            res = cells(lm, cores, args.repeats)
            chosen = threads.free_cores(cores)  # what a start now would choose
        print(f"\n{label}: {n} spinning neighbours, load average {load:.2f} at start, {cores} cores; "
              f"steerlab.threads would choose {chosen}")
        print(f"| reply tokens | 1 thread (s) | {cores} threads (s) | 1 / {cores} |")
        print("|---|---|---|---|")
        for tokens, (one, many) in res.items():
            print(f"| {tokens} | {one:.2f} | {many:.2f} | {one / many:.2f} |")


if __name__ == "__main__":
    main()
