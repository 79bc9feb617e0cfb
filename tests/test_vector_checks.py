"""One bad vector must not fail the others: checks at load (finite numbers, layers in range,
no symlinks), a finite STRENGTH, a bad row failing only its own request, plots that cannot
leave the folder, and build errors without server paths."""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time

import httpx
import pytest
import torch
from click.testing import CliRunner
from helpers import random_vector

from steerlab import GenerationOptions, Steer
from steerlab.cli import main
from steerlab.models import load_model
from steerlab.server import ServerSettings, create_app
from helpers import serve_in_thread
from steerlab.server.runner import Delta, Done, Failed, GenJob, Runner
from steerlab.store import VectorStore


@pytest.fixture(scope="module")
def tiny_model(tiny_dir, one_torch_thread):
    return load_model(str(tiny_dir), device="cpu")


def test_unusable_vectors_are_skipped_at_load(tiny_model, tmp_path):
    lm, folder = tiny_model, tmp_path / "v"
    folder.mkdir()
    good = random_vector(lm, range(lm.n_layers), name="good")
    good.save(folder / "good.safetensors")
    nan_dir = dataclasses.replace(good, name="nan_dir", directions={**good.directions, 1: torch.full((64,), float("nan"))})
    nan_dir.save(folder / "nan_dir.safetensors")
    dataclasses.replace(good, name="inf_norm", norms={**good.norms, 2: float("inf")}).save(folder / "inf_norm.safetensors")
    dataclasses.replace(good, name="nan_strength", default_strength=float("nan")).save(folder / "nan_strength.safetensors")
    random_vector(lm, [1, 9], name="deep").save(folder / "deep.safetensors")  # the tiny model has layers 0..3
    outside = tmp_path / "outside.safetensors"
    good.save(outside)
    os.symlink(outside, folder / "linked.safetensors")
    warnings: list[str] = []
    store = VectorStore(folder, lm, warn=warnings.append)
    assert store.names() == ["good"]
    expect = {"nan_dir": "NaN or infinite", "inf_norm": "norm at layer 2 is inf", "nan_strength": "default strength",
              "deep": "layers [9], but the model has layers 0..3", "linked": "symbolic link"}
    for name, why in expect.items():
        [line] = [w for w in warnings if w.startswith(f"skipping {name}.safetensors:")]
        assert why in line, line
    with pytest.raises(Exception, match="NaN or infinite"):
        store.add(nan_dir, overwrite=True)


def test_strength_must_be_a_finite_number(tiny_dir, tmp_path):
    for value in ("nan", "-nan", "NaN"):
        r = CliRunner().invoke(main, ["serve", "--model", str(tiny_dir), "--vectors", str(tmp_path), "--no-build",
                                      "--strength", value])
        assert r.exit_code != 0 and "not a number" in r.output, r.output
    r = CliRunner().invoke(main, ["serve", "--model", str(tiny_dir), "--vectors", str(tmp_path), "--no-build"],
                           env={"STRENGTH": "nan"})
    assert r.exit_code != 0 and "not a number" in r.output, r.output
    with pytest.raises(Exception, match="not a finite number"):
        create_app(load_model(str(tiny_dir), device="cpu"), VectorStore(tmp_path, load_model(str(tiny_dir))),
                   ServerSettings(strength=float("nan")))


def test_a_bad_row_fails_only_its_own_request(tiny_model):
    """A vector the model cannot use (here: a layer it lacks, slipped past the store) in a batch with
    good jobs: only its own job fails; the others get the text they get alone."""
    lm = tiny_model
    bad = random_vector(lm, [1, 9], name="bad")
    good = random_vector(lm, [1], name="good", strength=2.0)
    opts = GenerationOptions(max_new_tokens=4, chat=False)
    runner = Runner(lm, max_queue=8, batch_wait_s=0.0)
    runner.start()
    try:
        gate, running = threading.Event(), threading.Event()
        runner.call(lambda: (running.set(), gate.wait(30)))
        assert running.wait(10)
        jobs = []
        for prompt, steering in (("the cat sat", []), ("the cat sat", [Steer(bad)]), ("money saved", [Steer(good)])):
            q: queue.Queue = queue.Queue()
            runner.submit(GenJob(prompts=[prompt], steering=[steering], options=opts, emit=q.put))
            jobs.append(q)
        gate.set()

        def end(q: queue.Queue):  # noqa: ANN202
            while isinstance(ev := q.get(timeout=60), Delta):
                pass
            return ev

        base, broken, steered = (end(q) for q in jobs)
        assert isinstance(broken, Failed) and "layer" in str(broken.error)
        assert isinstance(base, Done) and isinstance(steered, Done)
        alone = []
        for prompt, steering in (("the cat sat", []), ("money saved", [Steer(good)])):
            q = queue.Queue()
            runner.submit(GenJob(prompts=[prompt], steering=[steering], options=opts, emit=q.put))
            alone.append(end(q).rows[0].text)
        assert [base.rows[0].text, steered.rows[0].text] == alone
    finally:
        runner.close()


def test_plots_and_build_errors_stay_inside_the_folder(tiny_model, tmp_path, monkeypatch):
    store = VectorStore(tmp_path / "v", tiny_model)
    store.add(random_vector(tiny_model, range(tiny_model.n_layers), name="toronto"), overwrite=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not yours")
    os.symlink(secret, store.folder / "toronto.sweep.png")
    from steerlab.server import builds

    def fail(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise PermissionError(f"[Errno 13] Permission denied: '{store.folder}/kittens.safetensors'")

    monkeypatch.setattr(builds, "build_persona", fail)
    app = create_app(tiny_model, store, ServerSettings())
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/vectors/toronto/plot").status_code == 404
        assert c.get("/vectors/toronto").json()["plot"] is None
        build = c.post("/vectors", json={"name": "kittens", "positive": ["a cat"], "negative": ["a car"]}).json()
        for _ in range(400):
            state = c.get(build["status_url"]).json()
            if state["state"] in ("done", "failed"):
                break
            time.sleep(0.05)
        assert state["state"] == "failed" and "Permission denied" in state["error"]
        assert str(tmp_path) not in state["error"] and "/" not in state["error"], state["error"]
