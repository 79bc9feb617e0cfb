"""What the steering operators and the coherence governor cost, timed where they run (issue 12/18:
at most 3 % of generation time at batch 1 and 8).

Wall-clock ratios of whole generations move +-15 % between rounds on the shared 2-core machine
(bench/costs.py), more than the few per cent to check. So this script times the added work itself,
inside real generations on the embedded model: every forward hook that ``steerlab.hooks.steer``
registers on a decoder layer (the operator's arithmetic, the per-row gain the governor sets, the
positions mask) and every call of the governor's logits processor. The share is that time over the
rest of the same generation. ``add`` is the classic activation addition; the other operators and
the governor are reported next to it.

    PYTHONPATH=src python bench/inplace_costs.py [--repeats 3] [--tokens 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

OPERATORS = ("add", "add_norm", "target", "cap", "rotate")
PROMPTS = ["Describe a typical morning routine.", "Give me three tips for saving money.",
           "Explain how to cook a simple tomato pasta sauce.", "What makes a good team meeting?"]


@contextmanager
def timed_steering(lm: Any, spent: list[float]) -> Iterator[None]:
    """Wrap every forward hook registered on a decoder layer, and the governor's ``__call__``, so
    their time adds up in ``spent[0]``."""
    from steerlab.governor import Governor

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t

        return wrapper

    originals = [(m, m.register_forward_hook) for m in lm.layers]
    for m, orig in originals:
        m.register_forward_hook = lambda hook, *a, _orig=orig, **k: _orig(timed(hook), *a, **k)
    call = Governor.__call__
    Governor.__call__ = timed(call)  # type: ignore[method-assign]
    try:
        yield
    finally:
        Governor.__call__ = call  # type: ignore[method-assign]
        for m, _ in originals:
            del m.register_forward_hook  # back to the class's method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from steerlab import GenerationOptions, Steer, generate, load_model
    from steerlab.calibrate import with_statistics, neutral_statistics
    from steerlab.evaluate import neutral_prompts
    from steerlab.personas import build_persona, get_persona

    lm = load_model(device="cpu")
    vec = build_persona(lm, get_persona("tabby_cats"), layers=[6, 8, 10, 12, 14], progress=False)
    vec = with_statistics(vec, *neutral_statistics(lm, vec, neutral_prompts(4)))  # target/cap read them
    opts = GenerationOptions(max_new_tokens=args.tokens)
    cases: list[tuple[str, Callable[[], Steer]]] = [
        (op, lambda op=op: Steer(vec, strength=0.06 if op != "rotate" else 0.05, operator=op, governor=False))
        for op in OPERATORS]
    cases.append(("add + governor", lambda: Steer(vec, strength=0.06, operator="add", governor=True)))
    generate(lm, PROMPTS[0], [cases[0][1]()], options=GenerationOptions(max_new_tokens=4))  # warm-up
    print(f"model {lm.model_id}, {args.threads} thread(s), {args.tokens} new tokens, tabby_cats at layers "
          f"{list(vec.active_layers)}, {args.repeats} repeats; share = time in the steering hooks (and the "
          "governor) / the rest of the generation")
    print("| case | batch 1 | batch 8 |\n| --- | ---: | ---: |")
    for name, make in cases:
        cells = []
        for batch in (1, 8):
            shares = []
            for i in range(args.repeats):
                prompts = [PROMPTS[(i + j) % len(PROMPTS)] for j in range(batch)]
                spent = [0.0]
                with timed_steering(lm, spent):
                    t = time.perf_counter()
                    generate(lm, prompts, [[make()] for _ in prompts], options=opts)
                    total = time.perf_counter() - t
                shares.append(spent[0] / (total - spent[0]))
            cells.append(f"{100 * statistics.median(shares):.2f} % ({100 * min(shares):.2f}-{100 * max(shares):.2f})")
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
