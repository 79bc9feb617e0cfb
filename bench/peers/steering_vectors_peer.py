"""steering-vectors' train_steering_vector on the bench pairs; prints one JSON line.

Run with the peer's own venv: .venv-bench-sv/bin/python bench/peers/steering_vectors_peer.py --model DIR --pairs F
"""

from __future__ import annotations

import torch
from _common import args, load, report, timed
from steering_vectors import train_steering_vector


def main() -> None:
    a = args()
    model, tok, pos, neg = load(a)
    samples = list(zip(pos, neg))
    n_layers = model.config.num_hidden_layers

    def run(layers, batch):  # noqa: ANN001, ANN202
        def fn() -> None:
            with torch.no_grad():
                # steering-vectors' layer i = output of decoder block i (same numbering as steerlab)
                train_steering_vector(model, tok, samples, layers=layers, batch_size=batch, show_progress=False)
        return fn

    cases = {
        f"layer {a.layer}, batch 32": timed(run([a.layer], 32), a.repeats),
        f"all {n_layers} layers, batch 32": timed(run(list(range(n_layers)), 32), a.repeats),
    }
    if a.slow:
        cases[f"layer {a.layer}, default batch 1"] = timed(run([a.layer], 1), 1)
    report("steering-vectors", cases, note="read_token_index=-1 (its default: last token)")


if __name__ == "__main__":
    main()
