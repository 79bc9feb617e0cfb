"""/compare vs /generate on a real `steerlab serve`, with the machine as found and with a busy neighbour.

    python bench/compare_load.py                       # ~4 min on 2 cores
    python bench/compare_load.py --neighbours 2 --repeats 7 --threads 1

The issue-18 measurement through the HTTP API: the same prompt, greedy, ``max_length`` 64, steered by
toronto at strength 0.4; /generate steered, /generate plain and /compare (base + steered in one
batch), interleaved, median of ``--repeats`` (order reversed every other round). Done twice on the
same server: as the machine is found, then while ``--neighbours`` processes spin in pure Python (each
holds a core; as bench/threads.py). Tokens are reported per request, so a /compare whose base row
runs longer than the steered /generate shows as such: the fair reference for /compare is the longer
of its two rows generated alone, ``max(generate steered, generate plain)``.

The server is ``python -m steerlab serve`` on loopback (this checkout's code), ``--no-build`` with the
vectors folder given (default: the user's, which must hold toronto); ``--threads`` is passed through
(default: steerlab's own choice from the load at start, printed).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neighbours import spinning  # noqa: E402
from steerlab.paths import default_vectors_dir  # noqa: E402

BODY = {"prompt": "Give me three tips for saving money.", "temperature": 0, "max_length": 64,
        "steering": [{"vector": "toronto", "strength": 0.4}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(vectors: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    argv = [sys.executable, "-m", "steerlab", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-build",
            "--vectors", str(vectors), "--log-level", "warning"] + (["--threads", str(threads)] if threads else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 600:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(url + "/health", timeout=2).json().get("status") == "ok":
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("server did not become ready in 600 s")


def measure(client: httpx.Client, url: str, repeats: int) -> dict[str, tuple[list[float], object]]:
    cases = [("/generate", "generate steered", BODY), ("/generate", "generate plain", {**BODY, "steering": []}),
             ("/compare", "compare", BODY)]
    for path, _, body in cases:  # warm-up
        client.post(url + path, json=body).raise_for_status()
    out: dict[str, tuple[list[float], object]] = {name: ([], None) for _, name, _ in cases}
    for r in range(repeats):
        for path, name, body in (cases if r % 2 == 0 else cases[::-1]):
            t = time.perf_counter()
            resp = client.post(url + path, json=body)
            resp.raise_for_status()
            out[name][0].append(time.perf_counter() - t)
            out[name] = (out[name][0], resp.json().get("tokens"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neighbours", type=int, default=1, help="spinning processes in the busy phase")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="passed to steerlab serve (default: its choice)")
    ap.add_argument("--vectors", type=Path, default=default_vectors_dir())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    proc, url = start_server(args.vectors, args.threads)
    results = {}
    try:
        client = httpx.Client(timeout=600)
        for label, n in (("as found", 0), (f"{args.neighbours} spinning neighbour(s)", args.neighbours)):
            with spinning(n, settle_s=3):
                load0 = os.getloadavg()[0]
                res = measure(client, url, args.repeats)
                load1 = os.getloadavg()[0]
            med = {k: statistics.median(v[0]) for k, v in res.items()}
            ref = max(med["generate steered"], med["generate plain"])
            results[label] = {"load": [load0, load1], "median_s": med, "all_s": {k: v[0] for k, v in res.items()},
                              "tokens": {k: v[1] for k, v in res.items()},
                              "compare_over_generate": med["compare"] / med["generate steered"],
                              "compare_over_longer_row": med["compare"] / ref}
            print(f"\n### {label}: load average {load0:.2f} -> {load1:.2f}\n")
            print("| request | median s | tokens | all repeats (s) |\n| --- | ---: | --- | --- |")
            for k, (ts, toks) in res.items():
                print(f"| {k} | {med[k]:.2f} | {toks} | {', '.join(f'{t:.2f}' for t in ts)} |")
            print(f"\n/compare / /generate steered: **{results[label]['compare_over_generate']:.2f}x**; "
                  f"/compare / the longer row alone: **{results[label]['compare_over_longer_row']:.2f}x**", flush=True)
        health = client.get(url + "/health").json()
        print(f"\nserver: {health.get('engine', health)}")
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        threads_line = [line for line in (out or "").splitlines() if line.startswith("torch threads")]
        print(f"server said: {threads_line[0] if threads_line else '(no threads line)'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
