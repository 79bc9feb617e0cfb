"""Generation throughput: unsteered vs steered, side by side in one run.

    python bench/throughput.py                  # embedded model, CPU (or CUDA if present)
    python bench/throughput.py --random-weights DIR   # same architecture, random weights
                                                # (DIR holds config.json + tokenizer; used on
                                                # GPU machines where the weights cannot travel)

Cases (greedy, fixed number of new tokens, EOS ignored so every row runs to the end):
  plain            no hooks at all
  one vector       1 vector at 1 layer
  three vectors    3 vectors at 3 different layers
  per-row (8)      every row steered differently (batch 8 only)
Each case is timed `--repeats` times, interleaved with the others so drift hits all alike;
the median new tokens/s and its ratio to `plain` are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from steerlab import SteeringVector, Steer  # noqa: E402
from steerlab.generate import encode_prompts  # noqa: E402
from steerlab.cpu_matmul import decode_matmuls  # noqa: E402
from steerlab.hooks import steer  # noqa: E402
from steerlab.models import LoadedModel, load_model, pick_device, pick_dtype  # noqa: E402

PROMPTS = [
    "Give me three tips for saving money.", "Describe a typical morning routine.",
    "What should I cook for dinner tonight?", "Explain how a computer works.",
    "Write a haiku about the sea.", "How do I learn a new language?",
    "What is the best way to start running?", "Summarise the plot of a mystery novel.",
]


def load(args) -> LoadedModel:  # noqa: ANN001
    if not args.random_weights:
        return load_model(args.model, device=args.device, dtype=args.dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(args.device)
    cfg = AutoConfig.from_pretrained(args.random_weights)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device=dev, dtype=pick_dtype(args.dtype, dev))
    tok = AutoTokenizer.from_pretrained(args.random_weights)
    return LoadedModel(model=model, tokenizer=tok, model_id=f"random:{cfg.model_type}")


def random_vector(lm: LoadedModel, layers: list[int], seed: int) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    dirs = {layer: torch.nn.functional.normalize(torch.randn(lm.hidden_size, generator=g), dim=0) for layer in layers}
    return SteeringVector(directions=dirs, norms={layer: 100.0 for layer in layers}, model_id=lm.model_id,
                          name=f"v{seed}", default_strength=0.3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def timed_generate(lm: LoadedModel, enc: dict, rows, new_tokens: int, cpu_matmul: bool = True) -> float:  # noqa: ANN001
    """Seconds for one generate call of exactly ``new_tokens`` tokens per row.

    As steerlab's generate() runs it (decode_matmuls included); ``cpu_matmul=False``: transformers'
    own ``F.linear`` everywhere (the reference for what steerlab's CPU matmul choice gains).
    """
    sync(lm.device)
    t = time.perf_counter()
    with steer(lm, rows), (decode_matmuls(lm) if cpu_matmul else contextlib.nullcontext()):
        lm.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=None)
    sync(lm.device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-weights", default=None, metavar="DIR")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    args = ap.parse_args()

    lm = load(args)
    mid = lm.n_layers // 2
    one = random_vector(lm, [mid], 1)
    three = [random_vector(lm, [layer], 10 + i) for i, layer in enumerate((mid - 4, mid, mid + 4))]
    per_row = [random_vector(lm, [mid - 2 + (i % 5)], 100 + i) for i in range(8)]
    print(f"# model {lm.model_id} on {lm.device} ({lm.dtype}); torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}; {torch.get_num_threads()} threads", flush=True)
    if lm.device.type == "cuda":
        print(f"# GPU: {torch.cuda.get_device_name()}", flush=True)
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        enc = encode_prompts(lm, (PROMPTS * 2)[:batch], None)
        cases = {
            "plain": [],
            "one vector": [Steer(one)],
            "three vectors, three layers": [Steer(v) for v in three],
        }
        if batch > 1:
            cases[f"per-row ({batch} different)"] = [[Steer(per_row[i % 8], strength=0.1 * (i + 1))] for i in range(batch)]
        timed_generate(lm, enc, [], 8)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, rows in cases.items():
                times[name].append(timed_generate(lm, enc, rows, args.new_tokens))
        base = statistics.median(times["plain"])
        print(f"\n## batch {batch}, {args.new_tokens} new tokens, median of {args.repeats}\n")
        print("| case | new tokens/s | ratio vs plain |\n| --- | ---: | ---: |")
        for name, ts in times.items():
            med = statistics.median(ts)
            tps = batch * args.new_tokens / med
            results[f"b{batch}/{name}"] = {"seconds": ts, "tokens_per_s": tps, "ratio": base / med}
            print(f"| {name} | {tps:.1f} | {base / med:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
