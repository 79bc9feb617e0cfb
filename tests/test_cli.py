"""The command line, driven in-process on a tiny local model folder."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from steerlab.cli import main

PERSONA = """
name = "kittens"
description = "cats"
keywords = ["cat"]
default_layers = [2]
default_strength = 2.0
[[pairs]]
positive = "the cat sat on the mat and purred"
negative = "the man sat on the mat and talked"
[[pairs]]
positive = "a cat in the warm sun"
negative = "a car in the warm sun"
"""


@pytest.fixture
def persona_file(tmp_path):
    path = tmp_path / "kittens.toml"
    path.write_text(PERSONA)
    return path


def run(*args, **kw):
    result = CliRunner().invoke(main, [str(a) for a in args], **kw)
    return result


def test_build_generate_compare_list(tiny_dir, persona_file, tmp_path):
    out = tmp_path / "vecs"
    r = run("build", persona_file, "--out", out, "--model", tiny_dir, "--prompt", "the cat")
    assert r.exit_code == 0, r.output
    assert f"vectors folder: {out}" in r.output
    assert "shape [64] x 4 layers, default layers [2]" in r.output and "direction norm 1.0000" in r.output
    assert "base:" in r.output and "steered:" in r.output
    assert (out / "kittens.safetensors").exists()
    assert "building kittens (1/1) from 2 pairs..." in r.output and f"saved:   {out / 'kittens.safetensors'}" in r.output
    r = run("build", persona_file, "--out", out, "--model", tiny_dir, "--prompt", "the cat")
    assert "exists already" in r.output and "kept:" in r.output and "saved:" not in r.output  # nothing was written

    r = run("generate", "the cat", "--steer", "kittens:3", "--vectors", out, "--model", tiny_dir,
            "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    assert "kittens (add, strength 3, layers 2" in r.output

    r = run("compare", "the cat", "--steer", "kittens", "--layer", "1,3", "--vectors", out, "--model", tiny_dir,
            "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output
    assert "=== base ===" in r.output and "kittens (add, dose 0.7 = strength" in r.output
    assert "layers 1,3" in r.output and "rescaled for 2 layer(s)" in r.output

    r = run("list", "--vectors", out)
    assert r.exit_code == 0 and "kittens" in r.output and "model=" in r.output

    r = run("calibrate", "kittens", "--positions", "prompt", "--vectors", out, "--model", tiny_dir)
    assert r.exit_code == 0, r.output
    r = run("generate", "the cat", "--steer", "kittens", "--vectors", out, "--model", tiny_dir, "--max-new-tokens", "3")
    assert r.exit_code == 0 and "positions prompt" in r.output and "measured steering positions" not in r.output, r.output
    r = run("calibrate", "kittens", "--positions", "middle", "--vectors", out, "--model", tiny_dir)
    assert r.exit_code != 0 and "use all, prompt, generated or from:N" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["build", "no_such_persona"], "unknown persona 'no_such_persona'"),
        (["generate", "hi", "--steer", "nothing"], "unknown vector 'nothing'"),
        (["generate", "hi", "--steer", "x", "--layer", "99"], "layer 99 is out of range"),
        (["build", "missing.toml"], "no such persona file"),
    ],
)
def test_user_errors_are_one_line(tiny_dir, args, message):
    r = run(*args, "--model", tiny_dir)
    assert r.exit_code == 1
    assert message in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 2


def test_mismatched_vector_is_skipped_with_a_note(tiny_dir, tmp_path):
    import torch

    from steerlab import SteeringVector

    out = tmp_path / "vecs"
    SteeringVector(directions={1: torch.ones(576)}, norms={1: 1.0}, model_id="other").save(out / "big.safetensors")
    r = run("generate", "hi", "--steer", "big", "--vectors", out, "--model", tiny_dir)
    assert r.exit_code == 1
    assert "skipping big.safetensors" in r.output and "unknown vector 'big'" in r.output


def test_bad_model_path_is_one_line(tmp_path):
    r = run("generate", "hi", "--model", tmp_path / "nope")
    assert r.exit_code == 1 and "could not load model" in r.output and "Traceback" not in r.output


def test_debug_shows_traceback(tiny_dir):
    r = run("--debug", "build", "no_such_persona", "--model", tiny_dir)
    assert r.exit_code != 0 and r.exception is not None


def test_store_rebuilds_a_builtin_built_from_older_texts(tiny_lm, tmp_path):
    from dataclasses import replace

    from steerlab.personas import build_persona, builtin_names, get_persona
    from steerlab.store import VectorStore

    store = VectorStore(tmp_path / "v", tiny_lm)
    name = builtin_names()[0]
    fresh = build_persona(tiny_lm, get_persona(name), layers=[1], progress=False)
    store.add(replace(fresh, contrast_hash="0" * 16), overwrite=True)  # as if built from other texts
    for other in builtin_names()[1:]:
        store.add(build_persona(tiny_lm, get_persona(other), layers=[1], progress=False), overwrite=True)
    assert store.ensure_builtins() == [name]
    assert store.vectors[name].contrast_hash == fresh.contrast_hash
    assert VectorStore(tmp_path / "v", tiny_lm).ensure_builtins() == []


def test_help_does_not_import_torch_or_transformers():
    """`steerlab --help` answers at once: the package and the CLI load torch/transformers only when needed."""
    import subprocess
    import sys

    code = ("import sys; from steerlab.cli import main; import steerlab\n"
            "try:\n    main(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert steerlab.SteeringVector.__name__ == 'SteeringVector'  # lazy, still there\n"
            "assert 'torch' in sys.modules\n"
            "import steerlab.generate\n"
            "from steerlab import generate\n"
            "assert callable(generate) and steerlab.generate is generate  # the function, not the submodule")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_the_vectors_folder_keeps_models_apart(tmp_path, monkeypatch):
    """A vector carries its model; by default each model other than the embedded one gets a subfolder."""
    from steerlab.models import DEFAULT_MODEL, GEMMA_MODEL
    from steerlab.options import model_vectors_dir

    monkeypatch.setenv("STEERLAB_VECTORS", str(tmp_path))
    assert model_vectors_dir(DEFAULT_MODEL) == tmp_path
    assert model_vectors_dir(GEMMA_MODEL) == tmp_path / "google_gemma-3-270m"
    assert model_vectors_dir("/models/my llama/") == tmp_path / "models_my_llama"
