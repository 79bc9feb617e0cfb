"""Cost of token readings next to the generation they read (issue 13: at most 5 % of generation time).

Runs `compare` (base + steered, one batch) on the embedded model and then reads both replies with a
ready Reader (what the server does when a request has "read"); also times the one-off neutral
baseline (made once per set of vectors and kept). Paired, interleaved repeats; prints medians.
Then the streamed readings (server/live_read.py): the same `compare` generation with the watch hook
at the reading layers and each step's readings computed (what a streaming request with "read"
adds), timed side by side with the plain generation in the same run.

    PYTHONPATH=src python bench/reading_cost.py [--repeats 7] [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from steerlab import GenerationOptions, compare, load_model
    from steerlab.personas import build_persona, get_persona
    from steerlab.reading import Reader

    lm = load_model(device="cpu")
    vec = build_persona(lm, get_persona("tabby_cats"), layers=[6, 8, 10, 12, 14], progress=False)
    t = time.perf_counter()
    reader = Reader(lm, [vec])
    baseline_s = time.perf_counter() - t
    opts = GenerationOptions(max_new_tokens=args.tokens, repetition_penalty=1.2)
    prompts = ["Describe a typical morning routine.", "Give me three tips for saving money.",
               "Explain how to cook a simple tomato pasta sauce."]
    compare(lm, prompts[0], [vec], options=GenerationOptions(max_new_tokens=4))  # warm-up
    gen, read, ratios = [], [], []
    for i in range(args.repeats):
        prompt = prompts[i % len(prompts)]
        t = time.perf_counter()
        base, steered = compare(lm, prompt, [vec], options=opts)
        g = time.perf_counter() - t
        t = time.perf_counter()
        reader.read_replies([prompt, prompt], [base, steered])
        r = time.perf_counter() - t
        gen.append(g)
        read.append(r)
        ratios.append(r / g)
    print(f"model {lm.model_id}, CPU threads {args.threads}, {args.tokens} new tokens, {args.repeats} repeats")
    print(f"neutral baseline (once per vector set): {baseline_s:.3f} s")
    print(f"compare (2 rows): median {statistics.median(gen):.3f} s; reading both replies: median "
          f"{statistics.median(read):.3f} s; median ratio {100 * statistics.median(ratios):.2f} % "
          f"(min {100 * min(ratios):.2f} %, max {100 * max(ratios):.2f} %)")
    streamed(lm, vec, reader, prompts, opts, args.repeats)


def streamed(lm, vec, reader, prompts, opts, repeats: int) -> None:  # noqa: ANN001
    """Generation with per-token readings from the batch vs without, paired and interleaved.

    Wall-clock pairs are noisy on a shared CPU, so the added work is also timed where it runs:
    ``hooks.watch``'s own hooks (bracketed by a hook registered before them and one after, so the
    share also counts those two calls) and each step's ``LiveScores.scores``, as a share of the
    same generation's time.
    """
    from contextlib import contextmanager

    from transformers.generation.streamers import BaseStreamer

    from steerlab import generate
    from steerlab.conditional import LiveScores
    from steerlab.hooks import watch

    live = LiveScores(reader.vectors, reader.baselines)
    spent = [0.0]

    @contextmanager
    def timed_watch():  # hooks.watch itself, between a hook that starts a clock and one that stops it
        started: dict[int, float] = {}

        def start(layer: int):  # noqa: ANN202
            return lambda module, args, output: started.__setitem__(layer, time.perf_counter())

        def stop(layer: int):  # noqa: ANN202
            def hook(module, args, output):  # noqa: ANN001, ANN202
                spent[0] += time.perf_counter() - started[layer]

            return hook

        handles = [lm.layers[x].register_forward_hook(start(x)) for x in live.dirs]  # forward hooks run in order
        try:
            with watch(lm, live.dirs) as store:
                handles += [lm.layers[x].register_forward_hook(stop(x)) for x in live.dirs]
                yield store
        finally:
            for h in handles:
                h.remove()

    class Reads(BaseStreamer):
        def __init__(self, store: dict) -> None:
            self.store = store

        def put(self, value) -> None:  # noqa: ANN001
            if self.store:
                t = time.perf_counter()
                live.scores(self.store)
                spent[0] += time.perf_counter() - t

        def end(self) -> None:
            pass

    plain, withr, ratios, shares = [], [], [], []
    for i in range(repeats):
        prompt = prompts[i % len(prompts)]
        order = (False, True) if i % 2 == 0 else (True, False)
        times = {}
        for on in order:
            spent[0] = 0.0
            t = time.perf_counter()
            if on:
                with timed_watch() as store:
                    generate(lm, [prompt, prompt], [[], [vec]], options=opts, streamer=Reads(store))
            else:
                generate(lm, [prompt, prompt], [[], [vec]], options=opts)
            times[on] = time.perf_counter() - t
            if on:
                shares.append(spent[0] / (times[on] - spent[0]))
        plain.append(times[False])
        withr.append(times[True])
        ratios.append(times[True] / times[False] - 1)
    print(f"streamed readings: time in the watch hooks and per-step scoring: median {100 * statistics.median(shares):.2f} % "
          f"of the generation (min {100 * min(shares):.2f} %, max {100 * max(shares):.2f} %)")
    print(f"  wall clock, paired: {statistics.median(plain):.3f} s plain vs {statistics.median(withr):.3f} s with; "
          f"median difference {100 * statistics.median(ratios):+.2f} % (min {100 * min(ratios):+.2f} %, "
          f"max {100 * max(ratios):+.2f} %; noise on a shared CPU)")


if __name__ == "__main__":
    main()
