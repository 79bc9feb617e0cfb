"""The reliability probe of issue 15, short: figures a hostile-but-realistic client mix gets.

Against a running ``steerlab serve`` (``--url``) or one started in-process on the embedded model:

1. **Short behind maximal**: a maximal request (a prompt near ``max_prompt_tokens``, 1024 new
   tokens, non-streaming) starts; 2 s later a short one (16 tokens) is sent. Reports how long
   the short one took, then hangs up the maximal one and reports how long the worker took to
   be free.
2. **Load with abandoning clients**: ``bench/load_test.py``'s mixed plan (generate/compare,
   streaming or not, different steering) from ``--clients`` clients, while ``--abandon``
   clients keep sending long non-streaming requests and hanging up after 1 s. Reports requests
   sent / answered / lost / mixed up and latency p50/p95 of the normal clients.

    .venv/bin/python bench/probe.py --threads 2 --json       # ~2 minutes on a 2-core CPU

Stops by itself (fixed request counts, per-request timeouts).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import local_server, run_load  # noqa: E402


def maximal_prompt(client: httpx.Client, limit: int) -> str:
    """A prompt close to ``limit`` tokens, sized with the server's own 400 ("prompt is N tokens")."""
    unit = "The quick brown fox jumps over the lazy dog near the river bank. "
    n = 4000 // len(unit)
    text = unit * n
    r = client.post("/generate", json={"prompt": text, "max_length": 1, "chat": False, "temperature": 0})
    if r.status_code == 400 and (m := re.search(r"is (\d+) tokens", r.text)):
        n = int(n * limit / int(m.group(1)) * 0.95)
        text = unit * n
    emoji = "\U0001F600"
    # characters cap prompts at 4000: emoji are several tokens each, so they reach the token bound
    for k in (1500, 1000, 700, 500, 400):
        r = client.post("/generate", json={"prompt": emoji * k, "max_length": 1, "chat": False, "temperature": 0})
        if r.status_code == 200:
            return emoji * k
    return text


def short_behind_maximal(url: str, *, new_tokens: int = 1024) -> dict:
    with httpx.Client(base_url=url, timeout=600) as c:
        health = c.get("/health").json()
        prompt = maximal_prompt(c, health.get("max_prompt_tokens", 2048))
        long_body = json.dumps({"prompt": prompt, "max_length": new_tokens, "chat": False, "temperature": 0}).encode()
        u = urlsplit(url)
        # a raw socket, so the hang-up is immediate (an httpx stream only notices between lines)
        sock = socket.create_connection((u.hostname, u.port))
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(long_body)).encode() + b"\r\n\r\n" + long_body)
        time.sleep(2.0)
        t0 = time.perf_counter()
        r = c.post("/generate", json={"prompt": "Name a colour.", "max_length": 16, "chat": False, "temperature": 0})
        short_s = time.perf_counter() - t0
        data = r.json()
        runner = c.get("/health").json()["runner"]
        sock.close()
        hung_up = time.perf_counter()
        while c.get("/health").json()["runner"]["busy"]:
            time.sleep(0.02)
        return {"maximal_prompt_chars": len(prompt), "maximal_new_tokens": new_tokens, "short_status": r.status_code,
                "short_request_s": round(short_s, 3), "short_queued_s": data.get("timing", {}).get("queued_s"),
                "yielded_batches": runner.get("yielded", 0), "step_s": runner.get("step_s"),
                "worker_free_after_hang_up_s": round(time.perf_counter() - hung_up, 3)}


def load_with_abandoners(url: str, *, n: int, clients: int, abandon: int, max_tokens: int) -> dict:
    stop = threading.Event()
    counts = {"abandoned": 0}

    def abandoner(i: int) -> None:
        while not stop.is_set():
            try:
                httpx.post(f"{url}/generate", json={"prompt": f"abandoned {i}: tell a long story", "max_length": 512,
                                                    "chat": False, "temperature": 0}, timeout=1.0)
            except httpx.HTTPError:
                counts["abandoned"] += 1

    threads = [threading.Thread(target=abandoner, args=(i,), daemon=True) for i in range(abandon)]
    for t in threads:
        t.start()
    try:
        figures = run_load(url, n=n, clients=clients, max_tokens=max_tokens, timeout=120)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    figures["abandoning_clients"] = abandon
    figures["abandoned_requests"] = counts["abandoned"]
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (default: start one in-process)")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--abandon", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with ExitStack() as stack:
        if args.url:
            url = args.url
        else:
            import tempfile

            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            url, _ = stack.enter_context(local_server(args.model, args.threads, folder))
        result = {"short_behind_maximal": short_behind_maximal(url),
                  "load": load_with_abandoners(url, n=args.requests, clients=args.clients, abandon=args.abandon,
                                               max_tokens=args.max_tokens)}
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if result["load"]["lost"] == 0 and result["load"]["mixed_up"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
