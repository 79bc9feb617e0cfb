"""Bounded load test of the studio API on loopback: N requests from C concurrent clients.

Mixed traffic: /generate and /compare, streaming (SSE) and not, each with its own steering
(none, one vector, two vectors, explicit strengths). Every response is checked to carry the
steering it asked for (``applied``: names and strengths), so a lost or mixed-up request is
counted. Prints requests sent / answered / lost / mixed-up / errors and latency p50/p95, and
stops by itself (fixed request count, per-request timeout).

    .venv/bin/python bench/load_test.py                      # tiny random model, 60 requests, 6 clients
    .venv/bin/python bench/load_test.py --model embedded     # the embedded SmolLM2-135M
    .venv/bin/python bench/load_test.py --url http://127.0.0.1:5050   # a running `steerlab serve`

Without --url it starts its own server in-process (uvicorn on 127.0.0.1, free port). The
steering mix uses the first two vectors the server lists (it builds/creates them otherwise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx


def plan(n: int, names: list[str], max_tokens: int) -> list[dict]:
    """A fixed, deterministic mix of n requests: (path, body, expected applied names/strengths)."""
    a, b = names[0], names[1 % len(names)]
    shapes = [
        (None, []),
        (a, [(a, None)]),
        ([{"vector": b, "strength": 1.5}], [(b, 1.5)]),
        ([{"vector": a, "strength": 2.0}, {"vector": b, "strength": -1.0}], [(a, 2.0), (b, -1.0)]),
        ([{"vector": a, "strength": 0.5}], [(a, 0.5)]),
    ]
    out = []
    for i in range(n):
        steering, want = shapes[i % len(shapes)]
        path = "/compare" if (want and i % 3 == 0) else "/generate"
        stream = i % 2 == 1
        body = {"prompt": f"request {i}: the cat sat", "steering": steering, "max_length": max_tokens,
                "temperature": 0, "chat": False, "stream": stream}
        out.append({"i": i, "path": path, "body": body, "want": want})
    return out


def _sse(resp: httpx.Response) -> list[tuple[str, dict]]:
    events, event = [], "message"
    for line in resp.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            events.append((event, json.loads(line[5:])))
            event = "message"
    return events


def one(client: httpx.Client, req: dict) -> dict:
    """Send one request; return {ok, latency_s, applied, status, error}."""
    t0 = time.perf_counter()
    res = {"i": req["i"], "path": req["path"], "stream": req["body"]["stream"]}
    try:
        if req["body"]["stream"]:
            with client.stream("POST", req["path"], json=req["body"]) as resp:
                res["status"] = resp.status_code
                if resp.status_code != 200:
                    resp.read()
                    res["error"] = resp.text[:200]
                else:
                    evs = _sse(resp)
                    start = [d for e, d in evs if e == "start"]
                    done = [d for e, d in evs if e == "done"]
                    if not start or not done:
                        res["error"] = f"stream without start/done: {[e for e, _ in evs][-3:]}"
                    else:
                        res["applied"] = done[0]["applied"]
                        res["start_applied"] = start[0]["applied"]
                        res["prompt"] = done[0]["prompt"]
        else:
            resp = client.post(req["path"], json=req["body"])
            res["status"] = resp.status_code
            if resp.status_code != 200:
                res["error"] = resp.text[:200]
            else:
                data = resp.json()
                res["applied"], res["prompt"] = data["applied"], data["prompt"]
    except httpx.HTTPError as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    res["latency_s"] = time.perf_counter() - t0
    return res


def matches(req: dict, res: dict, default_strength: dict[str, float]) -> bool:
    """The response is the one asked for: same prompt, same vectors at the same strengths."""
    if res.get("prompt") != req["body"]["prompt"]:
        return False
    got = [(a["vector"], round(float(a["strength"]), 4)) for a in res["applied"]]
    want = [(name, round(float(default_strength[name] if s is None else s), 4)) for name, s in req["want"]]
    if "start_applied" in res and res["start_applied"] != res["applied"]:
        return False
    return got == want


def run_load(url: str, *, n: int = 60, clients: int = 6, max_tokens: int = 8, timeout: float = 120.0) -> dict:
    """Fire the plan at ``url`` from ``clients`` threads; return the figures."""
    with httpx.Client(base_url=url, timeout=timeout) as c:
        vectors = c.get("/vectors").json()["vectors"]
    if not vectors:
        raise SystemExit("the server has no vectors: build one first (steerlab build NAME)")
    names = [v["name"] for v in vectors][:2]
    strengths = {v["name"]: v["default_strength"] for v in vectors}
    reqs = plan(n, names, max_tokens)
    local = threading.local()
    opened: list[httpx.Client] = []
    lock = threading.Lock()

    def client() -> httpx.Client:
        if not hasattr(local, "c"):
            local.c = httpx.Client(base_url=url, timeout=timeout)
            with lock:
                opened.append(local.c)
        return local.c

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(lambda r: one(client(), r), reqs))
    wall = time.perf_counter() - t0
    for c in opened:
        c.close()
    answered = [r for r in results if r.get("status") == 200 and "applied" in r]
    mixed = [r["i"] for r, q in zip(results, reqs, strict=True) if "applied" in r and not matches(q, r, strengths)]
    errors = [r for r in results if "error" in r]
    lat = sorted(r["latency_s"] for r in answered)

    def pct(p: float) -> float:
        if not lat:
            return float("nan")
        return lat[min(len(lat) - 1, max(0, round(p / 100 * len(lat)) - 1))]

    return {"sent": n, "answered": len(answered), "lost": n - len(answered), "mixed_up": len(mixed),
            "errors": len(errors), "error_samples": [e.get("error") for e in errors[:3]],
            "statuses": sorted({r.get("status") for r in results}, key=str), "clients": clients,
            "streaming": sum(r["stream"] for r in results), "compare": sum(r["path"] == "/compare" for r in results),
            "max_tokens": max_tokens, "wall_s": round(wall, 2), "p50_s": round(pct(50), 3),
            "p95_s": round(pct(95), 3), "mean_s": round(statistics.fmean(lat), 3) if lat else None,
            "slowest": [{"path": r["path"], "stream": r["stream"], "s": round(r["latency_s"], 2)}
                        for r in sorted(results, key=lambda r: -r["latency_s"])[:3]],
            "vectors": names}


@contextmanager
def local_server(model: str, threads: int, folder: Path):
    """Start the studio in this process on 127.0.0.1 (free port) with two vectors."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from steerlab.server import ServerSettings, create_app
    from helpers import serve_in_thread
    from steerlab.store import VectorStore

    if model == "tiny":
        from conftest import make_tiny
        from helpers import random_vector

        from steerlab.models import LoadedModel

        m, tok = make_tiny("llama")
        lm = LoadedModel(model=m, tokenizer=tok, model_id="tiny-llama")
        store = VectorStore(folder, lm)
        for i, name in enumerate(["weeknd", "toronto"]):
            store.add(random_vector(lm, range(lm.n_layers), seed=i, name=name, strength=4.0)
                      .with_defaults(layers=[2]), overwrite=True)
    else:
        from steerlab.models import load_model

        lm = load_model(None if model == "embedded" else model, device="cpu")
        store = VectorStore(folder, lm)
        for name in ["weeknd", "toronto"]:
            store.get(name)
    app = create_app(lm, store, ServerSettings(batch_wait_s=0.02))
    with serve_in_thread(app) as url:
        yield url, lm.model_id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (default: start one in-process)")
    ap.add_argument("--model", default="tiny", help="tiny (random, default), embedded, or a model id/folder")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for an in-process server")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    with ExitStack() as stack:
        if args.url:
            url, model = args.url, "(remote)"
        else:
            import tempfile

            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            url, model = stack.enter_context(local_server(args.model, args.threads, folder))
        figures = run_load(url, n=args.requests, clients=args.clients, max_tokens=args.max_tokens)
    figures["model"] = model
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"model {model}: {figures['sent']} requests from {figures['clients']} clients "
              f"({figures['streaming']} streaming, {figures['compare']} compare, {figures['max_tokens']} new tokens)")
        print(f"answered {figures['answered']}, lost {figures['lost']}, mixed up {figures['mixed_up']}, "
              f"errors {figures['errors']} {figures['error_samples'] or ''}")
        print(f"latency p50 {figures['p50_s']} s, p95 {figures['p95_s']} s; wall {figures['wall_s']} s")
    return 0 if figures["lost"] == 0 and figures["mixed_up"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
