"""How often conditional steering fires (issue 13): "talk like The Weeknd only when the user asks about cats".

On the embedded model: weeknd steering (strength 0.4 at layer 12, no calibration needed) with a
tabby_cats condition, on 10 cat questions and 10 other questions written for this bench (not the
ones of tests/test_glass_real.py). Prompt condition: mean >= 1.0 and peak >= 3.0. Text condition
(re-read while the reply is written): mean >= 1.0 over the reply so far, 40 new tokens; reports
how many rows fired, and a never-firing condition's rows are compared with unsteered output.

    PYTHONPATH=src python bench/conditions.py [--tokens 40]
"""

from __future__ import annotations

import argparse

import torch

CATS = ["My tabby sheds everywhere. How do I brush her?", "What does it mean when a cat slow-blinks at you?",
        "Should I get one kitten or two?", "Why do cats bring dead mice home?",
        "How can I tell if my cat is overweight?", "What is the best way to introduce a cat to a dog?",
        "Why is my kitten biting my ankles?", "Do indoor cats need vaccinations?",
        "How do I trim my cat's claws safely?", "Which cat breeds are good with children?"]
OTHERS = ["How do I descale a kettle?", "What are the rules of chess castling?",
          "Write a short poem about autumn leaves.", "How much water should I drink a day?",
          "What causes thunder?", "Plan a three-day trip to Lisbon.", "How do I centre a div in CSS?",
          "Why is the sky blue?", "What is a good beginner houseplant?", "How do I make cold brew coffee?"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from steerlab import GenerationOptions, generate, load_model
    from steerlab.personas import build_persona, get_persona
    from steerlab.spec import Steer, When

    lm = load_model(device="cpu")
    weeknd = build_persona(lm, get_persona("weeknd"), layers=[12], progress=False)
    cats = build_persona(lm, get_persona("tabby_cats"), layers=[6, 8, 10, 12, 14], progress=False)
    prompts = CATS + OTHERS
    opts = GenerationOptions(max_new_tokens=args.tokens)
    base = generate(lm, prompts, None, options=opts)
    for label, when in (("prompt, mean >= 1.0", When(cats, 1.0, "mean")), ("prompt, peak >= 3.0", When(cats, 3.0, "peak")),
                        ("text, mean >= 1.0", When(cats, 1.0, "mean", on="text")),
                        ("text, peak >= 3.0", When(cats, 3.0, "peak", on="text"))):
        report: dict = {}
        out = generate(lm, prompts, [Steer(weeknd, strength=0.4, when=when)], options=opts, report=report)
        fired = [row[0]["fired"] for row in report["conditions"]]
        same = sum(o == b for o, b, f in zip(out, base, fired) if not f)
        extra = ""
        if when.on == "text":
            firsts = [row[0]["first_steered_token"] for row in report["conditions"] if row[0]["fired"]]
            extra = f"; first steered token (median) {sorted(firsts)[len(firsts) // 2] if firsts else '-'}"
        print(f"{label}: cat prompts {sum(fired[:10])}/10, other prompts {sum(fired[10:])}/10; "
              f"rows that did not fire identical to unsteered: {same}/{fired.count(False)}{extra}", flush=True)
        if when.on == "prompt" and when.stat == "mean":
            for p, f, o in list(zip(prompts, fired, out))[:2] + list(zip(prompts, fired, out))[10:11]:
                print(f"   [{'fired' if f else 'not fired'}] {p} -> {o[:140]!r}", flush=True)


if __name__ == "__main__":
    main()
