"""repeng's ControlVector.train on the bench pairs; prints one JSON line.

Run with the peer's own venv: .venv-bench-repeng/bin/python bench/peers/repeng_peer.py --model DIR --pairs F
"""

from __future__ import annotations

from _common import args, load, report, timed
from repeng import ControlVector, DatasetEntry


def main() -> None:
    a = args()
    model, tok, pos, neg = load(a)
    dataset = [DatasetEntry(positive=p, negative=n) for p, n in zip(pos, neg)]
    n_layers = model.config.num_hidden_layers

    def run(hidden_layers, batch):  # noqa: ANN001, ANN202
        def fn() -> None:
            # repeng reads hidden_states[layer + 1] for layer >= 0: the output of block `layer`, as in steerlab.
            ControlVector.train(model, tok, dataset, hidden_layers=hidden_layers, batch_size=batch)
        return fn

    cases = {
        f"layer {a.layer}, batch 32": timed(run([a.layer], 32), a.repeats),
        f"all {n_layers} layers, batch 32": timed(run(list(range(n_layers)), 32), a.repeats),
    }
    report("repeng", cases, note="method pca_diff (its default), last-token hidden states, full forward pass")


if __name__ == "__main__":
    main()
