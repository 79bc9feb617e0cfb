"""Reliability: bad vector files at start-up, atomic writes under SIGKILL, port in use, OOM
mapping, steering that never leaks (concurrently too), and a small bounded load test."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from helpers import free_port, random_vector, wait_healthy

from steerlab import SteeringVector
from steerlab.models import load_model
from steerlab.server import ServerSettings, create_app
from helpers import serve_in_thread
from steerlab.store import VectorStore

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("steerlab") or os.path.join(os.path.dirname(sys.executable), "steerlab")


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    torch.set_num_threads(1)
    return load_model(str(tiny_dir), device="cpu")


# ---- vector files at start-up ------------------------------------------------------------------
def _bad_folder(lm, folder: Path) -> dict[str, str]:
    """Two good vectors and one bad file of each kind; returns {file name: words its warning must hold}."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(["good_a", "good_b"]):
        random_vector(lm, range(lm.n_layers), seed=i, name=name).save(folder / f"{name}.safetensors")
    good = (folder / "good_a.safetensors").read_bytes()
    (folder / "corrupt.safetensors").write_bytes(b"\x00garbage, not safetensors" * 10)
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    other = dataclasses.replace(random_vector(lm, range(lm.n_layers), name="wrong_model"), model_id="someone/else-7b")
    other.save(folder / "wrong_model.safetensors")
    small = SteeringVector(directions={0: torch.ones(8) / 8**0.5}, norms={0: 1.0}, model_id=lm.model_id, name="x")
    small.save(folder / "wrong_size.safetensors")
    (folder / "evil.pkl").write_bytes(b"\x80\x04\x95not really a pickle")
    (folder / ".good_a.safetensors.abc123.tmp").write_bytes(good[:40])  # a writer's leftover temp file
    return {"corrupt.safetensors": "not a readable safetensors file",
            "truncated.safetensors": "not a readable safetensors file",
            "wrong_model.safetensors": "built for someone/else-7b",
            "wrong_size.safetensors": "hidden size 8",
            "evil.pkl": "refusing to load a pickle-based file (loading pickle can run arbitrary code)"}


def test_bad_vector_files_are_skipped_with_one_line_each(tiny_model, tmp_path):
    reasons = _bad_folder(tiny_model, tmp_path / "v")
    warnings: list[str] = []
    store = VectorStore(tmp_path / "v", tiny_model, warn=warnings.append)
    assert store.names() == ["good_a", "good_b"]
    assert len(warnings) == len(reasons)
    for fname, why in reasons.items():
        [line] = [w for w in warnings if w.startswith(f"skipping {fname}:")]
        assert why in line and "\n" not in line


def test_serve_starts_with_the_good_files(tiny_dir, tiny_model, tmp_path):
    reasons = _bad_folder(tiny_model, tmp_path / "v")
    port = free_port()
    proc = subprocess.Popen([EXE, "serve", "--model", str(tiny_dir), "--vectors", str(tmp_path / "v"), "--no-build",
                             "--threads", "1", "--log-level", "warning", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        assert httpx.get(f"{url}/health").json()["vectors"] == ["good_a", "good_b"]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    lines = out.splitlines()
    for fname, why in reasons.items():
        hits = [ln for ln in lines if f"skipping {fname}:" in ln]
        assert len(hits) == 1 and why in hits[0], (fname, out)
    assert "Traceback" not in out and ".tmp" not in out


# ---- atomic writes -----------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, torch
    from steerlab import SteeringVector
    path, hidden = sys.argv[1], int(sys.argv[2])
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        dirs = {l: torch.full((hidden,), float(i)) / hidden ** 0.5 for l in range(24)}
        SteeringVector(directions=dirs, norms={l: float(i) for l in range(24)}, model_id="big", name="big").save(path)
""")


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "big.safetensors"
    hidden = 65536  # 24 layers x 64k floats: ~6 MB per save, so kills land mid-write
    dirs = {layer: torch.full((hidden,), 0.5) for layer in range(24)}
    SteeringVector(directions=dirs, norms={layer: 1.0 for layer in range(24)}, model_id="big", name="big").save(path)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    delays = [0.05, 0.17, 0.31, 0.45, 0.62]
    for delay in delays:
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(hidden)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        vec = SteeringVector.load(path, model_id="big", hidden_size=hidden)  # intact: the old or a whole new one
        k = vec.norms[0]
        assert all(torch.allclose(d, torch.full((hidden,), d[0].item())) for d in vec.directions.values())
        assert k == 1.0 or vec.directions[0][0].item() == pytest.approx(k / hidden**0.5)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    from steerlab.store import load_vectors

    warned: list[str] = []
    loaded = load_vectors(tmp_path, model_id="big", hidden_size=hidden, on_error=lambda p, e: warned.append(p.name))
    assert list(loaded) == ["big"] and not warned, (leftovers, warned)  # temp junk ('.'-prefixed) is ignored


# ---- the command: port in use, --debug ---------------------------------------------------------
def test_busy_port_is_one_line_naming_the_port(tiny_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for argv in (["serve"], ["--debug", "serve"]):
            r = subprocess.run([EXE, *argv, "--model", str(tiny_dir), "--vectors", str(tmp_path), "--port", str(port),
                                "--no-build"], capture_output=True, text=True, timeout=120)
            assert r.returncode != 0
            err = r.stderr.strip()
            assert "Traceback" not in err and len(err.splitlines()) == 1, err
            assert f"port {port}" in err and "--port" in err and "PORT=" in err


def test_api_key_all_without_key_is_a_user_error(tiny_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "STEERLAB_API_KEY"}
    r = subprocess.run([EXE, "serve", "--api-key-all", "--model", str(tiny_dir), "--vectors", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "STEERLAB_API_KEY" in r.stderr and "Traceback" not in r.stderr


# ---- generation out of memory -------------------------------------------------------------------
def test_generation_oom_is_a_clear_503(tiny_model, tmp_path, monkeypatch):
    from steerlab.server import runner as runner_mod

    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner_mod.slices, "run", boom)
    store = VectorStore(tmp_path / "v", tiny_model)
    app = create_app(tiny_model, store, ServerSettings(batch_wait_s=0.01))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/generate", json={"prompt": "x", "max_length": 4})
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert "out of memory" in r.json()["error"] and "max_length" in r.json()["error"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
        assert r.status_code == 503 and "--max-batch" in r.json()["error"]["message"]

        def cpu_boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 17179869184 bytes. Error code 12 (Cannot allocate memory)")

        monkeypatch.setattr(runner_mod.slices, "run", cpu_boom)  # torch's CPU allocator: a RuntimeError
        r = c.post("/generate", json={"prompt": "x", "max_length": 4})
        assert r.status_code == 503 and "Retry-After" in r.headers and "out of memory" in r.json()["error"]
        monkeypatch.undo()
        assert c.post("/generate", json={"prompt": "x", "max_length": 2}).status_code == 200


# ---- steering never leaks; bounded load ----------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    store = VectorStore(tmp_path_factory.mktemp("rel-vectors"), tiny_model)
    for i, name in enumerate(["weeknd", "toronto"]):
        store.add(random_vector(tiny_model, range(tiny_model.n_layers), seed=i, name=name, strength=4.0)
                  .with_defaults(layers=[2]), overwrite=True)
    app = create_app(tiny_model, store, ServerSettings(batch_wait_s=0.02))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield SimpleNamespace(url=url, client=client, app=app)


def _body(prompt: str, steering=None, stream=False) -> dict:  # noqa: ANN001
    return {"prompt": prompt, "steering": steering, "max_length": 8, "temperature": 0, "chat": False,
            "stream": stream}


def test_steering_never_leaks_concurrently(server):
    prompts = ["the cat sat", "toronto has a tall", "money saved today"]
    base = {p: server.client.post("/generate", json=_body(p)).json()["generated"] for p in prompts}
    steered = {p: server.client.post("/generate", json=_body(p, "weeknd")).json()["generated"] for p in prompts}
    assert any(base[p] != steered[p] for p in prompts)
    jobs = [(p, s) for _ in range(3) for p in prompts for s in (None, "weeknd", [{"vector": "toronto", "strength": 8}])]

    def call(job):  # noqa: ANN001, ANN202
        p, s = job
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return p, s, c.post("/generate", json=_body(p, s)).json()

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, jobs))
    for p, s, data in results:
        if s is None:
            assert data["generated"] == base[p] and data["applied"] == []
        elif s == "weeknd":
            assert data["generated"] == steered[p]
    # and a base request right after all that steering is still the base output, exactly
    assert server.client.post("/generate", json=_body(prompts[0])).json()["generated"] == base[prompts[0]]
    assert server.client.post("/compare", json=_body(prompts[1], "weeknd")).json()["base"] == base[prompts[1]]


def test_small_load_every_request_answered_and_matched(server):
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "bench" / "load_test.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    figures = mod.run_load(server.url, n=20, clients=4, max_tokens=4, timeout=60)
    assert figures["answered"] == 20 and figures["lost"] == 0 and figures["mixed_up"] == 0, figures
    assert figures["streaming"] == 10 and figures["compare"] > 0
