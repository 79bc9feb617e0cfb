"""Shared by the peer scripts (run inside the peers' own venvs: no steerlab import)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib import metadata


def args():  # noqa: ANN201
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="HF folder of the model")
    ap.add_argument("--pairs", required=True, help="JSON {positive: [...], negative: [...]}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slow", action="store_true", help="also the slow cases (batch size 1)")
    ap.add_argument("--layer", type=int, default=12, help="steerlab numbering: output of block 12")
    return ap.parse_args()


def load(a):  # noqa: ANN001, ANN201
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(a.model)
    except ValueError:
        # transformers 4.x (steering-vectors' venv) cannot read the folder steerlab writes under
        # transformers 5 (tokenizer_class "TokenizersBackend"): load tokenizer.json directly.
        import os

        from transformers import PreTrainedTokenizerFast

        cfg = json.load(open(os.path.join(a.model, "tokenizer_config.json")))
        special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if isinstance(cfg.get(k), str)}
        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(a.model, "tokenizer.json"), **special)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    data = json.load(open(a.pairs))
    return model, tok, data["positive"], data["negative"]


def timed(fn, repeats: int) -> list[float]:  # noqa: ANN001
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def report(peer: str, cases: dict[str, list[float]], **extra) -> None:  # noqa: ANN003
    import numpy
    import torch
    import transformers

    print(json.dumps({"peer": peer, "version": metadata.version(peer), "torch": torch.__version__,
                      "transformers": transformers.__version__, "numpy": numpy.__version__,
                      "cases": cases, "median": {k: statistics.median(v) for k, v in cases.items()}, **extra}),
          flush=True)
