"""What the doctor adds to a build, before and after it reused the build's activations (issue 13).

`steerlab build` grades each vector it builds. It used to re-read the contrast texts for the doctor
(two passes at the vector's active layers: the pooled one and the held-out signal's); it now hands
the doctor the pooled activations the build already made (``build_vector(on_pooled=...)``) and no
text is read again. Side by side in one run, interleaved, on the embedded model, one persona at every
layer (what `steerlab build` builds), each repeat one build, then each doctor in turn on it (the
order alternates between repeats):

* ``before``: the doctor re-reading the texts twice at the active layers (what the build ran before
  this change: ``checkup`` without activations, plus the separate held-out signal pass it made then);
* ``re-read``: ``checkup`` re-reading the texts once (today's doctor without activations);
* ``reuse``: ``checkup`` on the build's own activations (what `steerlab build` runs now).

    PYTHONPATH=src python bench/build_doctor.py [--persona tabby_cats] [--repeats 3] [--threads 1]

Prints medians, the ratios to ``build`` and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persona", default="tabby_cats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from steerlab import load_model
    from steerlab.doctor import as_built, checkup
    from steerlab.evaluate import layer_signal
    from steerlab.personas import build_persona, get_persona

    lm = load_model(device="cpu")
    persona = get_persona(args.persona)
    load_before = os.getloadavg()

    def build(keep: list | None = None):  # noqa: ANN202
        cb = None if keep is None else (lambda pos, neg: keep.append((pos, neg)))
        return build_persona(lm, persona, progress=False, on_pooled=cb)

    def before(vec, keep: list) -> dict:  # noqa: ANN001
        report = checkup(lm, as_built(persona, vec), vec.active_layers)
        layer_signal(lm, persona.positive, persona.negative, vec.active_layers)  # the second pass it made then
        return report

    def reread(vec, keep: list) -> dict:  # noqa: ANN001
        return checkup(lm, as_built(persona, vec), vec.active_layers)

    def reuse(vec, keep: list) -> dict:  # noqa: ANN001
        return checkup(lm, as_built(persona, vec), vec.active_layers, pooled=keep[-1])

    doctors = {"before": before, "re-read": reread, "reuse": reuse}
    build()  # warm-up
    builds: list[float] = []
    times: dict[str, list[float]] = {k: [] for k in doctors}
    reports: dict[str, dict] = {}
    for i in range(args.repeats):
        keep: list = []
        t = time.perf_counter()
        vec = build(keep)
        builds.append(time.perf_counter() - t)
        order = list(doctors) if i % 2 == 0 else list(reversed(doctors))
        for name in order:  # each doctor after the same build, interleaved
            t = time.perf_counter()
            reports[name] = doctors[name](vec, keep)
            times[name].append(time.perf_counter() - t)
    load_after = os.getloadavg()
    b = statistics.median(builds)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {lm.model_id}, persona {persona.name} ({len(persona.positive)} pairs, all {lm.n_layers} layers), "
          f"torch threads {args.threads}, {args.repeats} repeats")
    print(f"load average before {load_before[0]:.2f} / {load_before[1]:.2f}, after {load_after[0]:.2f} / "
          f"{load_after[1]:.2f} (1 / 5 min)")
    print(f"  build      median {b:6.2f} s  runs {', '.join(f'{t:.2f}' for t in builds)}")
    for k in doctors:
        print(f"  {k:<8}   doctor median {med[k]:6.2f} s  (build + doctor x{(b + med[k]) / b:.3f} of the build)"
              f"  runs {', '.join(f'{t:.2f}' for t in times[k])}")
    print(f"build + doctor, reuse / before: x{(b + med['reuse']) / (b + med['before']):.3f}; "
          f"doctor alone, reuse / before: x{med['reuse'] / med['before']:.3f}, reuse / re-read: "
          f"x{med['reuse'] / med['re-read']:.3f}")
    print("grades: " + json.dumps({k: {x: r.get(x) for x in ("grade", "score", "advice")} for k, r in reports.items()
                                   if r}))


if __name__ == "__main__":
    main()
