"""steerlab benchmark suite (issue 5): one command, results in bench/results.md.

    .venv/bin/python bench/run.py                       # everything (make bench)
    .venv/bin/python bench/run.py --only gen,build      # some sections: gen, build, server, cold, profile
    .venv/bin/python bench/run.py --new-tokens 32 --repeats 3

Sections (each measured side by side, interleaved, medians, ratios):
  gen      generation throughput, batch 1 and 8: plain / one vector / three vectors / 8 rows differently
  build    vector building from 64 contrast pairs: steerlab (layer 12, all layers), a plain full forward
           pass, and the peers steering-vectors and repeng (each in its own venv, bench/peers/*.py)
  server   a real `steerlab serve` on loopback: /compare vs /generate latency; N concurrent clients
           (N = 1, 4, 8) with different steering vs the same requests one at a time
  cold     seconds from `steerlab serve` to the first answered request (fresh cache = conversion,
           then cached), and the server's peak resident memory (VmHWM)
  profile  cProfile of a steered generation: share of time in the steering hook vs the rest

Only the part of bench/results.md between the `bench:run.py` markers is rewritten; other sections
(e.g. the load test's) are kept.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import cProfile
import json
import os
import platform
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402
import transformers  # noqa: E402

START = "<!-- bench:run.py start -->"
END = "<!-- bench:run.py end -->"
COMMANDS: list[str] = []
MODEL_DIR = Path.home() / ".cache" / "steerlab" / "models" / "SmolLM2-135M-Instruct"

GPU_TABLE = """\
### Reference: NVIDIA H200 (not this machine)

Run 2026-11-27 11:12 UTC on a lent GPU machine (the device tool gave an H200 for an H100 request):
`python3 bench/throughput.py --random-weights .devcarry/smollm2 --dtype bfloat16 --repeats 15` (the same
timing code as the table above; random weights with SmolLM2-135M's architecture, since the 98 MB GGUF
cannot travel there), torch 2.11.0+cu130, transformers 5.17.0, 64 new tokens, median of 15 round-robin
repeats; `bench/cuda_check.py` in the same call: 7/7 mechanics checks passed in bf16. Single repeats ranged
from 1.05 s to 3.36 s for the same case (a first run in the morning, median of 3, had shown 0.954 for three
vectors: that was this noise).

| batch | case | new tokens/s | ratio vs plain |
| --- | --- | ---: | ---: |
| 1 | plain | 55.9 | 1.000 |
| 1 | one vector | 55.8 | 0.998 |
| 1 | three vectors, three layers | 55.8 | 0.998 |
| 8 | plain | 395.0 | 1.000 |
| 8 | one vector | 394.8 | 0.999 |
| 8 | three vectors, three layers | 391.2 | 0.991 |
| 8 | per-row (8 different) | 395.6 | 1.002 |
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cmd(c: str) -> None:
    COMMANDS.append(c)
    log(f"$ {c}")


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_list(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


# ---- machine ------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem = f"; {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"- CPU: {cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}{mem}{gpu}\n"
            f"- Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"{platform.platform()}\n"
            f"- load average at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min); the machine is "
            f"shared, so absolute numbers are noisy; compare the ratios")


# ---- 1. generation throughput -------------------------------------------------------------------
REF = "plain, transformers' F.linear (reference)"


def bench_gen(args) -> str:  # noqa: ANN001
    from throughput import PROMPTS, random_vector, timed_generate

    from steerlab import Steer
    from steerlab.generate import encode_prompts
    from steerlab.models import load_model

    cmd(f"(in-process) throughput.timed_generate, batches 1,8, {args.new_tokens} new tokens, {args.repeats} repeats")
    lm = load_model(None)
    mid = lm.n_layers // 2
    one = random_vector(lm, [mid], 1)
    three = [random_vector(lm, [layer], 10 + i) for i, layer in enumerate((mid - 4, mid, mid + 4))]
    per_row = [random_vector(lm, [mid - 2 + (i % 5)], 100 + i) for i in range(8)]
    out = [f"Model {lm.model_id} on {lm.device} ({lm.dtype}), greedy, {args.new_tokens} new tokens (EOS ignored), "
           f"median of {args.repeats} interleaved repeats (ratio: median over repeats of plain time / case time, "
           f"each repeat's cases run back to back); vectors at layer {mid} / layers {mid - 4},{mid},{mid + 4}.\n",
           "| batch | case | new tokens/s | ratio vs plain | target >= 0.97 | seconds (all repeats) |",
           "| --- | --- | ---: | ---: | --- | --- |"]
    for batch in (1, 8):
        enc = encode_prompts(lm, (PROMPTS * 2)[:batch], None)
        cases = {"plain": [], "one vector": [Steer(one)], "three vectors, three layers": [Steer(v) for v in three]}
        if batch > 1:
            cases["per-row (8 different)"] = [[Steer(per_row[i % 8], strength=0.1 * (i + 1))] for i in range(batch)]
        cases[REF] = []  # plain through transformers' own F.linear: what steerlab's CPU matmul choice gains
        timed_generate(lm, enc, [], 8)
        times: dict[str, list[float]] = {n: [] for n in cases}
        for r in range(args.repeats):
            names = list(cases) if r % 2 == 0 else list(reversed(cases))
            for name in names:
                times[name].append(timed_generate(lm, enc, cases[name], args.new_tokens, cpu_matmul=name != REF))
            log(f"gen batch {batch} repeat {r + 1}/{args.repeats}")
        for name, ts in times.items():
            # Each repeat's plain run is its time neighbour: the median of per-repeat ratios cancels the
            # machine's drift (single runs vary 10-35 % here), which a ratio of medians does not.
            ratio = med([p / t for p, t in zip(times["plain"], ts)])
            ok = "" if name in ("plain", REF) else ("met" if ratio >= 0.97 else "**missed**")
            out.append(f"| {batch} | {name} | {batch * args.new_tokens / med(ts):.1f} | {ratio:.3f} | {ok} | {fmt_list(ts)} |")
    del lm
    return "\n".join(out) + "\n\n" + GPU_TABLE


# ---- 2. vector building -------------------------------------------------------------------------
def contrast_pairs(n: int = 64) -> tuple[list[str], list[str]]:
    """n pairs from the built-in persona files (all their pairs, cycled if needed)."""
    from steerlab.personas import builtin_names, get_persona

    pos, neg = [], []
    for name in builtin_names():
        p = get_persona(name)
        pos += list(p.positive)
        neg += list(p.negative)
    k = len(pos)
    return [pos[i % k] for i in range(n)], [neg[i % k] for i in range(n)], k


def run_peer(venv: str, script: str, extra: list[str], timeout: int) -> dict:
    py = ROOT / venv / "bin" / "python"
    if not py.exists():
        return {"error": f"{venv} missing (see bench/README.md for the install commands)"}
    argv = [str(py), str(BENCH / "peers" / script), *extra]
    cmd(" ".join(str(a) for a in argv).replace(str(ROOT) + "/", ""))
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"error": f"exit {p.returncode}: {(p.stderr or p.stdout).strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


@torch.no_grad()
def bench_build(args) -> str:  # noqa: ANN001
    from steerlab import build_vector
    from steerlab.models import load_model

    pos, neg, k = contrast_pairs(64)
    pairs_file = Path(tempfile.mkdtemp(prefix="steerlab-bench-")) / "pairs.json"
    pairs_file.write_text(json.dumps({"positive": pos, "negative": neg}))
    lm = load_model(None)
    n_layers = lm.n_layers
    layers_all = list(range(n_layers))
    tok = lm.tokenizer
    cmd(f"(in-process) steerlab.build_vector on 64 pairs (the first 64 of the {k} pairs of the built-in persona files, in file order), layer 12 / all "
        f"{lm.n_layers} layers, batch_size 32; plain full forward pass at batch 32; {args.repeats} repeats")

    def plain() -> None:
        for texts in (pos, neg):
            for i in range(0, 64, 32):
                enc = tok(texts[i:i + 32], return_tensors="pt", padding=True)
                lm.model(**enc)

    def sl_one() -> None:
        build_vector(lm, pos, neg, layers=[12], batch_size=32, progress=False)

    def sl_all() -> None:
        build_vector(lm, pos, neg, layers=layers_all, batch_size=32, progress=False)

    def sl_one_b16() -> None:
        build_vector(lm, pos, neg, layers=[12], batch_size=16, progress=False)

    cases = {"plain full-model forward pass (batch 32, no hooks)": plain,
             "steerlab build_vector, layer 12 (batch 32)": sl_one,
             "steerlab build_vector, layer 12 (default batch 16)": sl_one_b16,
             f"steerlab build_vector, all {n_layers} layers (batch 32)": sl_all}
    sl_one()
    times: dict[str, list[float]] = {n: [] for n in cases}
    for r in range(args.repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        log(f"build repeat {r + 1}/{args.repeats}")
    lm = None  # free the model (the closures above are done with it)
    # Peers, each in its own venv (subprocess; they print one JSON line with their timings).
    peer_args = ["--model", str(MODEL_DIR), "--pairs", str(pairs_file), "--repeats", str(args.repeats)]
    peer_args += ["--slow"] if args.slow else []
    peers = {
        "steering-vectors": run_peer(".venv-bench-sv", "steering_vectors_peer.py", peer_args, 1200),
        "repeng": run_peer(".venv-bench-repeng", "repeng_peer.py", peer_args, 1200),
    }
    rows = {n: ts for n, ts in times.items()}
    notes = []
    for peer, res in peers.items():
        if "error" in res:
            notes.append(f"- {peer}: not measured: {res['error']}")
            continue
        notes.append(f"- {peer} {res.get('version', '?')}: torch {res.get('torch')}, transformers "
                     f"{res.get('transformers')}, numpy {res.get('numpy')}")
        for name, ts in res["cases"].items():
            rows[f"{peer}: {name}"] = ts
    base = med(times["plain full-model forward pass (batch 32, no hooks)"])
    out = ["64 contrast pairs (128 texts) on the embedded SmolLM2-135M-Instruct, CPU fp32; median of "
           f"{args.repeats}; the peers run in their own venvs on the same HF folder (`{MODEL_DIR}`), same texts.\n",
           "| case | seconds (median) | vs plain pass | all repeats |", "| --- | ---: | ---: | --- |"]
    for name, ts in rows.items():
        out.append(f"| {name} | {med(ts):.2f} | {med(ts) / base:.2f}x | {fmt_list(ts)} |")
    out.append("")
    out += notes
    one = med(times["steerlab build_vector, layer 12 (batch 32)"])
    alln = med(times[f"steerlab build_vector, all {n_layers} layers (batch 32)"])
    # Like for like: our one-layer build against the peers' one-layer cases, all layers against all layers.
    peer_one = {n: med(ts) for n, ts in rows.items() if n.split(":")[0] in peers and "layer 12, batch 32" in n}
    peer_all = {n: med(ts) for n, ts in rows.items() if n.split(":")[0] in peers and ": all " in n}
    if peer_one:
        fastest = min(peer_one, key=peer_one.get)
        out.append(f"\nTarget, one layer: {one:.2f} s vs half the fastest peer ({fastest}: {peer_one[fastest]:.2f} s "
                   f"-> {peer_one[fastest] / 2:.2f} s): **{'met' if one <= peer_one[fastest] / 2 else 'missed'}**.")
    if peer_all:
        fastest = min(peer_all, key=peer_all.get)
        out.append(f"Target, all layers: {alln:.2f} s vs the fastest peer ({fastest}: {peer_all[fastest]:.2f} s): "
                   f"**{'met' if alln <= peer_all[fastest] else 'missed'}**.")
    if not peer_one and not peer_all:
        out.append(f"\nNo peer timing; against the plain pass: one layer {one / base:.2f}x, all layers {alln / base:.2f}x.")
    return "\n".join(out) + "\n"


# ---- server helpers ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, env_extra: dict, vectors: Path, extra: list[str] = (), venv: str = ".venv") -> None:  # noqa: B006
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **env_extra, "HOST": "127.0.0.1", "PORT": str(self.port)}
        argv = [str(ROOT / venv / "bin" / "steerlab"), "serve", "--vectors", str(vectors), "--log-level", "warning",
                *extra]
        shown = " ".join(f"{k}={v}" for k, v in env_extra.items())
        cmd(f"{shown} HOST=127.0.0.1 PORT={self.port} {venv}/bin/steerlab serve --vectors {vectors} --log-level warning "
            + " ".join(extra))
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_first_answer(self, timeout: float = 600) -> tuple[float, float]:
        """(seconds to /health ok, seconds to the first answered /generate) since the process start."""
        import httpx

        health = None
        while time.perf_counter() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    health = time.perf_counter() - self.t0
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        if health is None:
            raise RuntimeError("server did not start")
        r = httpx.post(self.url + "/generate", json={"prompt": "Hello", "max_length": 1, "temperature": 0}, timeout=120)
        r.raise_for_status()
        return health, time.perf_counter() - self.t0

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


PERSONAS = ["tabby_cats", "toronto", "weeknd"]
SERVER_PROMPTS = ["Give me three tips for saving money.", "Describe a typical morning routine.",
                  "What should I cook for dinner tonight?", "Explain how a computer works.",
                  "Write a short note to a friend.", "How do I learn a new language?",
                  "What is the best way to start running?", "Tell me about your weekend."]


def request_body(i: int, tokens: int) -> dict:
    return {"prompt": SERVER_PROMPTS[i % len(SERVER_PROMPTS)], "temperature": 0, "max_length": tokens,
            "steering": [{"vector": PERSONAS[i % 3], "strength": round(0.15 + 0.05 * (i % 5), 2)}]}


VLLM_SERVE = ["--engine", "vllm", "--dtype", "float32", "--kv-cache-gib", "1", "--max-model-len", "1024"]


def bench_server(args, vectors: Path, cache: Path, engine: str = "transformers") -> str:  # noqa: ANN001
    import httpx

    if engine == "vllm":
        if not (ROOT / ".venv-vllm" / "bin" / "steerlab").exists():
            return "Not measured: `.venv-vllm` missing (`make vllm-install`).\n"
        srv = Server({"STEERLAB_CACHE_DIR": str(cache)}, vectors, VLLM_SERVE, venv=".venv-vllm")
    else:
        srv = Server({"STEERLAB_CACHE_DIR": str(cache)}, vectors)
    out = []
    try:
        health, first = srv.wait_first_answer(timeout=900)
        out.append(f"Engine: **{engine}**; server up (/health) {health:.0f} s after spawn, first answer at {first:.0f} s.\n")
        client = httpx.Client(timeout=300)

        def post(path: str, body: dict) -> tuple[float, dict]:
            t = time.perf_counter()
            r = client.post(srv.url + path, json=body)
            r.raise_for_status()
            return time.perf_counter() - t, r.json()

        # 3. /compare vs /generate, same prompt, same length, greedy; min_tokens not available, so EOS
        # may end a row early: the token counts are reported.
        def post_stream(path: str, body: dict) -> tuple[float, dict]:
            """The same request with "stream": true, read to its last event (the done payload)."""
            t = time.perf_counter()
            last = None
            with client.stream("POST", srv.url + path, json={**body, "stream": True}) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        last = line[6:]
            return time.perf_counter() - t, json.loads(last)

        n = args.server_tokens
        body = {"prompt": "Give me three tips for saving money.", "temperature": 0, "max_length": n,
                "steering": [{"vector": "toronto", "strength": 0.4}]}
        gen, streamed, both = "generate (steered)", "generate (steered), streamed (SSE)", "compare (base + steered, one batch)"
        order = [(post, "/generate", gen), (post_stream, "/generate", streamed), (post, "/compare", both)]
        for fn, path, _ in order:
            fn(path, body)
        lat: dict[str, list[float]] = {name: [] for _, _, name in order}
        toks: dict[str, object] = {}
        for r in range(args.repeats + 2):
            for fn, path, name in (order if r % 2 == 0 else order[::-1]):
                s, js = fn(path, body)
                lat[name].append(s)
                toks[name] = js.get("tokens")
        cmd(f"POST /generate, /generate with stream=true, /compare; greedy, max_length {n}, "
            f"{args.repeats + 2} interleaved repeats")
        ratio = med(lat[both]) / med(lat[gen])
        out += [f"### /compare vs /generate latency\n\nGreedy, `max_length` {n}, steering toronto 0.4, median of "
                f"{args.repeats + 2} interleaved repeats, one client, loopback.\n",
                "| request | latency s (median) | tokens | all repeats |", "| --- | ---: | --- | --- |"]
        for name, ts in lat.items():
            out.append(f"| {name} | {med(ts):.2f} | {toks[name]} | {fmt_list(ts)} |")
        out.append(f"\nRatio /compare / /generate: **{ratio:.2f}x** (target <= 1.3x: "
                   f"**{'met' if ratio <= 1.3 else 'missed'}**). Streamed / not streamed: "
                   f"**{med(lat[streamed]) / med(lat[gen]):.2f}x**.\n")

        # 4. throughput: N concurrent clients, each request with different steering, vs one at a time.
        total = args.server_requests
        bodies = [request_body(i, n) for i in range(total)]

        def run_set(conc: int) -> tuple[float, int, list[int]]:
            t = time.perf_counter()
            if conc == 0:  # one at a time
                res = [post("/generate", b)[1] for b in bodies]
            else:
                with cf.ThreadPoolExecutor(conc) as ex:
                    res = [f.result()[1] for f in [ex.submit(post, "/generate", b) for b in bodies]]
            el = time.perf_counter() - t
            return el, sum(int(js["tokens"]) for js in res), [js["batch"]["jobs"] for js in res]

        modes = {"one at a time": 0, "N = 1": 1, "N = 4": 4, "N = 8": 8}
        res: dict[str, list[tuple[float, int, list[int]]]] = {m: [] for m in modes}
        for r in range(args.server_rounds):
            for m, c in (modes.items() if r % 2 == 0 else reversed(modes.items())):
                res[m].append(run_set(c))
            log(f"server throughput round {r + 1}/{args.server_rounds}")
        cmd(f"{total} POST /generate (greedy, max_length {n}, request i steered by {{tabby_cats,toronto,weeknd}}[i%3] "
            f"at strength 0.15..0.35) per set; sets: one at a time, N = 1, 4, 8 concurrent clients (httpx threads); "
            f"{args.server_rounds} interleaved rounds")
        base_rps = total / med([e for e, _, _ in res["one at a time"]])
        out += [f"### Server throughput\n\n{total} requests per set, greedy, `max_length` {n}, each request with its own "
                f"steering (3 personas x 5 strengths); median over {args.server_rounds} interleaved rounds; "
                + ("vLLM's continuous batching (\"jobs per batch\": requests in flight when each started).\n"
                   if engine == "vllm" else "`--max-batch 16` (default).\n"),
                "| clients | requests/s | tokens/s | vs one at a time | mean jobs per batch | set seconds (all rounds) |",
                "| --- | ---: | ---: | ---: | ---: | --- |"]
        for m, rr in res.items():
            el = med([e for e, _, _ in rr])
            tk = med([t / e for e, t, _ in rr])
            jobs = statistics.mean(j for _, _, js in rr for j in js)
            out.append(f"| {m} | {total / el:.2f} | {tk:.1f} | {total / el / base_rps:.2f}x | {jobs:.1f} | "
                       f"{fmt_list([e for e, _, _ in rr])} |")
        r8 = (total / med([e for e, _, _ in res["N = 8"]])) / base_rps
        out.append(f"\nN = 8 vs one at a time: **{r8:.2f}x** (target >= 2.5x: **{'met' if r8 >= 2.5 else 'missed'}**).")
        rss = srv.peak_rss_mib()
        note = " (vLLM's engine core and workers are child processes, not included)" if engine == "vllm" else ""
        out.append(f"\nPeak resident memory of this server after the run (VmHWM): {rss:.0f} MiB{note}.\n")
    finally:
        srv.stop()
    return "\n".join(out)


def bench_cold(args, vectors: Path) -> str:  # noqa: ANN001
    fresh = Path(tempfile.mkdtemp(prefix="steerlab-bench-cache-"))
    rows = []
    runs = [("first run: fresh STEERLAB_CACHE_DIR (GGUF -> safetensors conversion)", fresh)]
    runs += [(f"cached run {i + 1}", fresh) for i in range(args.cold_cached)]
    for name, cache in runs:
        srv = Server({"STEERLAB_CACHE_DIR": str(cache)}, vectors)
        try:
            health, first = srv.wait_first_answer()
            rows.append((name, health, first, srv.peak_rss_mib()))
        finally:
            srv.stop()
        log(f"cold: {name}: {first:.1f} s")
    shutil.rmtree(fresh, ignore_errors=True)
    out = ["`steerlab serve` as a subprocess (vectors already built, so no persona build at start); "
           "the clock starts at process spawn; the first request is POST /generate of 1 token.\n",
           "| run | s to /health ok | s to first answered /generate | peak RSS (VmHWM) MiB |",
           "| --- | ---: | ---: | ---: |"]
    out += [f"| {n} | {h:.1f} | {f:.1f} | {m:.0f} |" for n, h, f, m in rows]
    return "\n".join(out) + "\n"


# ---- profile -----------------------------------------------------------------------------------
def bench_profile(args) -> str:  # noqa: ANN001
    from throughput import PROMPTS, random_vector, timed_generate

    from steerlab import Steer
    from steerlab.generate import encode_prompts
    from steerlab.models import load_model

    lm = load_model(None)
    mid = lm.n_layers // 2
    three = [random_vector(lm, [layer], 10 + i) for i, layer in enumerate((mid - 4, mid, mid + 4))]
    out = []
    for batch in (1, 8):
        enc = encode_prompts(lm, PROMPTS[:batch], None)
        timed_generate(lm, enc, [Steer(v) for v in three], 4)
        prof = cProfile.Profile()
        prof.enable()
        total = timed_generate(lm, enc, [Steer(v) for v in three], args.new_tokens)
        prof.disable()
        st = pstats.Stats(prof)
        hook_cum = hook_calls = 0.0
        fwd = 0.0
        for (file, _line, func), (_cc, nc, _tt, ct, _callers) in st.stats.items():
            if file.endswith("steerlab/hooks.py") and func == "add":
                hook_cum += ct
                hook_calls += nc
            if file.endswith("modeling_llama.py") and func == "forward":
                fwd = max(fwd, ct)
        # Torch-level view: profiler of the same generation.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
            timed_generate(lm, enc, [Steer(v) for v in three], args.new_tokens)
        ev = tp.key_averages()
        tot_us = sum(e.self_cpu_time_total for e in ev)
        top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:6]
        top_s = ", ".join(f"{e.key} {100 * e.self_cpu_time_total / tot_us:.0f}%" for e in top)
        out.append(f"| {batch} | {total:.2f} | {hook_calls:.0f} | {1e3 * hook_cum:.1f} ms | "
                   f"{100 * hook_cum / total:.2f}% | {1e6 * hook_cum / max(hook_calls, 1):.0f} us | {top_s} |")
    cmd(f"(in-process) cProfile + torch.profiler of one generate, three vectors at layers {mid - 4},{mid},{mid + 4}, "
        f"{args.new_tokens} new tokens, batch 1 and 8")
    head = ("Three vectors at three layers, greedy, "
            f"{args.new_tokens} new tokens. Hook time = cumulative time inside steerlab's hook function "
            "(`hooks._make_steer_hook.<locals>.add`, the add of the delta included) measured by cProfile; "
            "cProfile inflates Python-call-heavy code, so the share is an upper bound. Top ops: torch.profiler "
            "self CPU time of the same generation.\n\n"
            "| batch | generate s (under cProfile) | hook calls | time in hook | share | per call | top torch ops (self CPU) |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    return head + "\n" + "\n".join(out) + "\n"


# ---- main ----------------------------------------------------------------------------------------
ORDER = ["machine", "notes", "gen", "build", "server", "server-vllm", "cold", "profile", "commands"]


def sub(key: str) -> tuple[str, str]:
    return f"<!-- section:{key} -->", f"<!-- /section:{key} -->"


def write_results(path: Path, fresh: dict[str, str]) -> None:
    """Rewrite our block; inside it, replace only the sections run now (others are kept)."""
    old = path.read_text() if path.exists() else ""
    pre, ours, post = old, "", ""
    if START in old and END in old:
        pre, rest = old.split(START, 1)
        ours, post = rest.split(END, 1)
    kept = {}
    for key in ORDER:
        a, b = sub(key)
        if a in ours and b in ours:
            kept[key] = ours.split(a, 1)[1].split(b, 1)[0].strip("\n")
    kept.update({k: v.strip("\n") for k, v in fresh.items()})
    body = "# steerlab benchmarks\n\nWritten by `bench/run.py` (`make bench`); each section says when it was run.\n"
    for key in ORDER:
        if key in kept:
            a, b = sub(key)
            body += f"\n{a}\n{kept[key]}\n{b}\n"
    block = f"{START}\n{body}{END}\n"
    if not (START in old and END in old):
        new = block + ("\n" + old if old else "")
    else:
        new = pre + block + ("\n" + post.lstrip("\n") if post.strip() else "")
    path.write_text(new)


def read_sections(path: Path) -> dict[str, str]:
    text = path.read_text() if path.exists() else ""
    if START not in text or END not in text:
        return {}
    ours = text.split(START, 1)[1].split(END, 1)[0]
    out = {}
    for key in ORDER:
        a, b = sub(key)
        if a in ours and b in ours:
            out[key] = ours.split(a, 1)[1].split(b, 1)[0].strip("\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="gen,build,server,server-vllm,cold,profile")
    ap.add_argument("--new-tokens", type=int, default=32, help="generation benchmark (issue: 64; 32 on a loaded box)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-tokens", type=int, default=32)
    ap.add_argument("--server-requests", type=int, default=16)
    ap.add_argument("--server-rounds", type=int, default=2)
    ap.add_argument("--cold-cached", type=int, default=2)
    ap.add_argument("--slow", action="store_true", help="build: also steering-vectors at its default batch size 1")
    ap.add_argument("--out", default=str(BENCH / "results.md"))
    ap.add_argument("--merge", nargs="+", default=None, metavar="FILE",
                    help="run nothing: copy the sections of these results files (from runs with --out) into --out")
    args = ap.parse_args()
    if args.merge:
        fresh = {}
        for f in args.merge:
            fresh.update({k: v for k, v in read_sections(Path(f)).items() if k not in ("machine", "commands")
                          or k not in fresh})
        write_results(Path(args.out), fresh)
        log(f"merged {len(fresh)} sections into {args.out}")
        return
    only = args.only.split(",")
    mach = machine()
    cmd("python bench/run.py " + " ".join(sys.argv[1:]))
    fresh: dict[str, str] = {}

    def stamp() -> str:
        la = os.getloadavg()[0]
        return f"_Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {la:.1f}._\n\n"

    def cmds_since(n: int) -> str:
        return "\nCommands:\n\n```\n" + "\n".join(COMMANDS[n:]) + "\n```\n"

    def flush(key: str) -> None:
        fresh["machine"] = f"## Machine (latest run: sections {args.only})\n\n{mach}\n"
        fresh["commands"] = "## Last invocation\n\n```\n" + COMMANDS[0] + "\n```\n"
        write_results(Path(args.out), fresh)
        print(fresh[key], flush=True)

    work = Path(tempfile.mkdtemp(prefix="steerlab-bench-"))
    vectors = work / "vectors"
    cache = Path(os.environ.get("STEERLAB_CACHE_DIR") or Path.home() / ".cache" / "steerlab")
    if any(s in only for s in ("server", "server-vllm", "cold")):
        from steerlab.models import load_model
        from steerlab.store import VectorStore

        cmd(f"(in-process) VectorStore({vectors}).ensure_builtins()  # the server's vectors, built once up front")
        VectorStore(vectors, load_model(None)).ensure_builtins(progress=False)
    sections = [  # key, title, what writes the section's body
        ("gen", "Generation throughput", lambda: bench_gen(args)),
        ("build", "Vector building (64 contrast pairs)", lambda: bench_build(args)),
        ("server", "Server: latency and throughput", lambda: bench_server(args, vectors, cache)),
        ("server-vllm", "Server on the vLLM engine: latency and throughput",
         lambda: bench_server(args, vectors, cache, engine="vllm")),
        ("cold", "Cold start and memory", lambda: bench_cold(args, vectors)),
        ("profile", "Profile of a steered generation", lambda: bench_profile(args)),
    ]
    for key, title, body in sections:
        if key in only:
            st = stamp()
            n0 = len(COMMANDS)
            fresh[key] = f"## {title}\n\n{st}{body()}" + cmds_since(n0)
            flush(key)
    shutil.rmtree(work, ignore_errors=True)
    fresh["machine"] = f"## Machine (latest run: sections {args.only})\n\n{mach}\n"
    fresh["commands"] = "## Last invocation\n\n```\n" + COMMANDS[0] + "\n```\n"
    write_results(Path(args.out), fresh)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
