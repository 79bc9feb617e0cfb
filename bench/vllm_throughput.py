"""Throughput of the two engines on this machine: transformers (steerlab) vs vLLM (vllm-lens).

    .venv-vllm/bin/python bench/vllm_throughput.py                       # 8 prompts x 32 tokens, 3 repeats
    .venv-vllm/bin/python bench/vllm_throughput.py --prompts 16 --max-new-tokens 64 --repeats 5

Needs the vLLM environment (``bash scripts/install_vllm.sh``). Both engines load the embedded
SmolLM2-135M-Instruct (or ``--model``) in the same dtype (fp32 on CPU, bf16 on CUDA). Cases, all
greedy with a fixed number of new tokens (EOS ignored on both engines, so every row runs to the
end and the token counts match):

  plain    no steering
  mixed    half the rows steered (a random unit vector at layer 12, strength 0.5; rows alternate
           steered / plain), the per-row steering both engines exist to serve

Each case runs ``--repeats`` times after one warm-up per engine, engines interleaved; the
median new tokens/s is printed as a markdown table (progress goes to stderr). transformers runs
on ``--threads`` torch threads (default 1: vLLM's CPU build keeps one core for its front end,
so on a 2-core machine both engines compute on one core). Nothing is written to disk.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import PROMPTS  # noqa: E402  (the same prompts as the transformers-only benchmark)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder or id (default: embedded SmolLM2)")
    p.add_argument("--prompts", type=int, default=8, help="batch size (prompts cycle through 8 texts)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layer", type=int, default=12, help="steered layer in the mixed case")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for transformers (vLLM's CPU build computes on all cores but one: 1 here)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from steerlab.engines.vllm_engine import VLLMEngine
    from steerlab.generate import GenerationOptions
    from steerlab.hooks import steer
    from steerlab.generate import encode_prompts
    from steerlab.cpu_matmul import decode_matmuls
    from steerlab.models import load_model
    from steerlab.vectors import SteeringVector

    torch.manual_seed(0)
    lm = load_model(args.model)
    dtype = str(lm.dtype).removeprefix("torch.")
    engine = VLLMEngine(args.model, dtype=dtype, max_model_len=1024)
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(lm.hidden_size, generator=g), dim=0)
    vec = SteeringVector(directions={args.layer: d}, norms={args.layer: 10.0}, model_id=lm.model_id, name="rand")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    rows = {"plain": [[] for _ in prompts], "mixed": [[(vec, 0.5)] if i % 2 == 0 else [] for i in range(len(prompts))]}
    opts = GenerationOptions(max_new_tokens=args.max_new_tokens)
    n_new = args.max_new_tokens * len(prompts)

    def run_hf(case: str) -> float:
        enc = encode_prompts(lm, prompts, None)
        t = time.perf_counter()
        with torch.no_grad(), steer(lm, rows[case]), decode_matmuls(lm):  # as steerlab's generate() runs it
            out = lm.model.generate(**enc, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                    do_sample=False, temperature=None, top_p=None, top_k=None,
                                    repetition_penalty=opts.repetition_penalty, pad_token_id=lm.tokenizer.pad_token_id)
        dt = time.perf_counter() - t
        assert out.shape[1] - enc["input_ids"].shape[1] == args.max_new_tokens
        return n_new / dt

    def run_vllm(case: str) -> float:
        vprompts, params = engine.requests(prompts, rows[case], opts)
        for sp in params:
            sp.ignore_eos = True
            sp.stop_token_ids = []
        t = time.perf_counter()
        outs = engine.llm.generate(vprompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        assert sum(len(o.outputs[0].token_ids) for o in outs) == n_new
        return n_new / dt

    runners = {"transformers": run_hf, "vLLM + vllm-lens": run_vllm}
    results: dict[tuple[str, str], list[float]] = {}
    for name, run in runners.items():  # warm-up ("mixed" also installs vllm-lens's hooks)
        print(f"warm-up {name}: {run('mixed'):.1f} tok/s", file=sys.stderr, flush=True)
    for rep in range(args.repeats):
        for case in rows:
            for name, run in runners.items():
                results.setdefault((name, case), []).append(run(case))
                print(f"repeat {rep + 1} {name} {case}: {results[(name, case)][-1]:.1f} tok/s", file=sys.stderr, flush=True)

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible "
          f"(transformers: {torch.get_num_threads()} torch threads), "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, {dtype}; "
          f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, median of {args.repeats}\n")
    print("| engine | plain tok/s | mixed tok/s | mixed / plain |")
    print("| --- | ---: | ---: | ---: |")
    for name in runners:
        plain = statistics.median(results[(name, "plain")])
        mixed = statistics.median(results[(name, "mixed")])
        print(f"| {name} | {plain:.1f} | {mixed:.1f} | {mixed / plain:.2f} |")
    engine.close()


if __name__ == "__main__":  # vLLM starts its engine in a child process
    main()
