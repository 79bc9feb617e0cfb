"""Shared fixtures: a tiny random llama (fast unit tests) and the real embedded model.

An autouse fixture points every user folder (vectors, personas, config) at a temp dir, so
no test touches the real home. The converted-model cache is shared on purpose: converting
the embedded GGUF once per test run would cost ~25 s each time.
"""

from __future__ import annotations

import os

import pytest
import torch

# Commands choose torch's thread count from the machine's load (steerlab.threads). Tests keep the
# count the run started with, so greedy outputs compared across calls use the same matmul reductions.
os.environ.setdefault("STEERLAB_THREADS", str(torch.get_num_threads()))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the cat sat on the mat and purred in the warm sun",
    "toronto has a tall tower by the lake and cold winters",
    "money saved today is money you can spend on travel tomorrow",
    "a computer runs programs that people write in many languages",
    "the future of technology is bright and full of surprises",
] * 4


def make_tokenizer():
    """A small byte-level BPE tokenizer trained in memory, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny(model_type: str = "llama", *, seed: int = 0, layers: int = 4):
    """A randomly initialised tiny causal LM of the given architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tokenizer()
    common = dict(vocab_size=len(tok), num_hidden_layers=layers, num_attention_heads=4, hidden_size=64,
                  intermediate_size=128, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    extra = {
        "llama": dict(num_key_value_heads=2),
        "mistral": dict(num_key_value_heads=2, sliding_window=None),
        "qwen2": dict(num_key_value_heads=2),
        "gemma": dict(num_key_value_heads=2, head_dim=16),
        "phi": dict(),
        "gpt2": dict(n_embd=64, n_layer=layers, n_head=4, n_positions=256),
        "gpt_neox": dict(),
        "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    }[model_type]
    cfg = AutoConfig.for_model(model_type, **common, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model, tok


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("STEERLAB_VECTORS", str(tmp_path / "vectors"))
    monkeypatch.setenv("STEERLAB_PERSONAS", str(tmp_path / "personas"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: on a CPU shared with other jobs, spin-waiting
    threads made small forward passes 30-100x slower. Restores the previous count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_lm():
    from steerlab.models import LoadedModel

    model, tok = make_tiny("llama")
    return LoadedModel(model=model, tokenizer=tok, model_id="tiny-llama")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny llama saved as a local model folder (for CLI and server tests)."""
    path = tmp_path_factory.mktemp("tiny-model")
    model, tok = make_tiny("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def real_lm():
    """The embedded SmolLM2-135M-Instruct (converted once, then cached)."""
    from steerlab import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def real_vectors(real_lm):
    """Built-in persona vectors on the real model with their dose windows, built once per session
    (as `steerlab build` and the server make them)."""
    from steerlab.calibrate import calibrated
    from steerlab.personas import build_persona, builtin_names, get_persona

    return {name: calibrated(real_lm, build_persona(real_lm, get_persona(name), progress=False))[0]
            for name in builtin_names()}


@pytest.fixture(scope="module")
def real_server(real_lm, real_vectors, tmp_path_factory):
    """The studio app on the real model and the built-in vectors, served on loopback; yields its URL."""
    from steerlab.server import create_app
    from helpers import serve_in_thread
    from steerlab.store import VectorStore

    store = VectorStore(tmp_path_factory.mktemp("real-vectors"), real_lm)
    for vec in real_vectors.values():
        store.add(vec)
    with serve_in_thread(create_app(real_lm, store)) as url:
        yield url


@pytest.fixture(scope="module")
def slow_lm(tiny_dir, one_torch_thread):
    """The tiny model with every forward pass slowed to ``SLOW_STEP_S``, so scheduling shows in time."""
    import time

    from helpers import SLOW_STEP_S

    from steerlab.models import load_model

    lm = load_model(str(tiny_dir), device="cpu")
    handle = lm.model.register_forward_pre_hook(lambda module, args: time.sleep(SLOW_STEP_S))
    yield lm
    handle.remove()


@pytest.fixture(scope="module")
def tiny_studio(tiny_dir, tmp_path_factory):
    """The studio on loopback over the tiny model and a few random vectors (one per test module)."""
    from types import SimpleNamespace

    import httpx
    from helpers import serve_in_thread
    from test_server import make_store

    from steerlab.models import load_model
    from steerlab.server import ServerSettings, create_app

    lm = load_model(str(tiny_dir), device="cpu")
    store = make_store(lm, tmp_path_factory.mktemp("studio-vectors"))
    app = create_app(lm, store, ServerSettings(batch_wait_s=0.02))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield SimpleNamespace(app=app, client=client, lm=lm)
