"""llama.cpp itself (llama-cpp-python) on the embedded SmolLM2 GGUF, steered by a steerlab export.

Slow and optional: needs ``pip install 'steerlab[llamacpp]'`` (builds llama.cpp from source).
llama-cpp-python exposes llama.cpp's core (``llama_set_adapter_cvec`` / older
``llama_apply_adapter_cvec``) but not the ``common`` helper that reads ``--control-vector``
files, so :func:`_cvec_buffer` mirrors ``common_control_vector_load_one`` (common/common.cpp):
``direction.N`` times the scale goes to buffer offset ``(N - 1) * n_embd``; the core then adds
buffer row ``il - 1`` to the output of block ``il`` (src/llama-adapter.cpp, build_cvec).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason="llama-cpp-python is not installed: pip install 'steerlab[llamacpp]' "
           "(builds llama.cpp from source; see docs/interop.md for the build time)",
)

from steerlab import Steer, SteeringVector  # noqa: E402
from steerlab.gguf_io import export_gguf  # noqa: E402
from steerlab.hooks import steer  # noqa: E402
from steerlab.models import embedded_gguf_path  # noqa: E402

pytestmark = pytest.mark.model

PROMPTS = ["The future of technology is", "Describe a typical morning routine.", "Give me three tips for saving money."]


def _cvec_buffer(path, scale: float, n_embd: int) -> np.ndarray:
    """What llama.cpp's loader builds from a control-vector file (read with the gguf library)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    rows = {int(t.name.split(".")[1]): np.asarray(t.data, np.float32) for t in reader.tensors}
    data = np.zeros(n_embd * max(rows), np.float32)
    for n, t in rows.items():
        data[(n - 1) * n_embd : n * n_embd] += t * scale  # layer 1 at [0]
    return data


class LlamaCpp:
    """Greedy decoding in llama.cpp on token ids given by the Hugging Face tokenizer (same prompt)."""

    def __init__(self) -> None:
        self.llm = llama_cpp.Llama(model_path=str(embedded_gguf_path()), n_ctx=512, n_threads=2, n_batch=512,
                                   logits_all=True, seed=0, verbose=False)
        self.n_embd = self.llm.n_embd()
        self.n_layer = llama_cpp.llama_model_n_layer(self.llm.model) if hasattr(llama_cpp, "llama_model_n_layer") \
            else llama_cpp.llama_n_layer(self.llm.model)

    def set_cvec(self, path=None, scale: float = 1.0) -> None:
        names = ("llama_set_adapter_cvec", "llama_apply_adapter_cvec", "llama_control_vector_apply")  # new -> old
        fn = next(getattr(llama_cpp, n) for n in names if hasattr(llama_cpp, n))
        if path is None:
            rc = fn(self.llm.ctx, None, 0, self.n_embd, -1, -1)
        else:
            data = _cvec_buffer(path, scale, self.n_embd)
            self._keep = data
            ptr = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rc = fn(self.llm.ctx, ptr, data.size, self.n_embd, 1, self.n_layer)
        assert rc == 0

    def last_logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64)

    def greedy(self, ids: list[int], n: int, eos: set[int]) -> list[int]:
        out: list[int] = []
        logits = self.last_logits(ids)
        for _ in range(n):
            t = int(np.argmax(logits))
            if t in eos:
                break
            out.append(t)
            self.llm.eval([t])
            logits = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64)
        return out


@pytest.fixture(scope="module")
def cpp():
    return LlamaCpp()


@pytest.fixture(scope="module")
def tabby(real_lm):
    from steerlab.personas import build_persona, get_persona

    return build_persona(real_lm, get_persona("tabby_cats"), layers=[12], progress=False)


def _ids(lm, prompt: str) -> list[int]:
    return lm.tokenizer(lm.format_prompt(prompt), add_special_tokens=False)["input_ids"]


def _hf_logits(lm, ids, steering=()):
    with torch.no_grad(), steer(lm, list(steering)):
        return lm.model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()


def _hits(text: str, keywords) -> int:
    low = text.lower()
    return sum(low.count(k) for k in keywords)


def test_same_model_same_logits_without_steering(real_lm, cpp):
    """Baseline: the dequantised transformers model and llama.cpp agree on the next token."""
    cpp.set_cvec(None)
    for prompt in PROMPTS:
        ids = _ids(real_lm, prompt)
        a, b = _hf_logits(real_lm, ids), cpp.last_logits(ids)
        assert int(np.argmax(a)) == int(np.argmax(b))
        assert np.corrcoef(a, b)[0, 1] > 0.99


@pytest.mark.parametrize("layer", [3, 12])
def test_layer_numbering_direction_n_is_steerlab_layer_n(real_lm, cpp, layer, tmp_path):
    """direction.N in llama.cpp matches steerlab steering at layer N, not N - 1 or N + 1."""
    g = torch.Generator().manual_seed(layer)
    d = torch.randn(real_lm.hidden_size, generator=g)
    d = d / d.norm()
    near = [layer - 1, layer, layer + 1]
    vec = SteeringVector(directions={k: d for k in near}, norms={k: 150.0 for k in near}, model_id=real_lm.model_id)
    cpp.set_cvec(export_gguf(vec, tmp_path / "one.gguf", layers=[layer], strength=1.0), 1.0)
    try:
        for prompt in PROMPTS[:2]:
            ids = _ids(real_lm, prompt)
            got = cpp.last_logits(ids)
            dist = {k: float(np.abs(_hf_logits(real_lm, ids, [Steer(vec, strength=1.0, layers=(k,))]) - got).mean())
                    for k in near}
            print(f"\nlayer {layer}, {prompt!r}: mean |logit difference| vs steerlab at layers {dist}")
            assert min(dist, key=dist.get) == layer, dist
            assert dist[layer] < 0.5 * min(dist[layer - 1], dist[layer + 1]), dist
    finally:
        cpp.set_cvec(None)


def test_exported_vector_steers_llamacpp_toward_the_concept(real_lm, cpp, tabby, tmp_path):
    """Greedy llama.cpp output, no control vector vs the exported tabby_cats vector at strength 0.4."""
    path = export_gguf(tabby, tmp_path / "tabby_cats.gguf")  # strength 1 baked in: scale == strength
    eos = {real_lm.tokenizer.convert_tokens_to_ids("<|im_end|>"), real_lm.tokenizer.eos_token_id}
    texts = {}
    for label, scale in (("base", None), ("steered", 0.4)):
        cpp.set_cvec(None if scale is None else path, scale or 1.0)
        texts[label] = [real_lm.tokenizer.decode(cpp.greedy(_ids(real_lm, p), 48, eos)) for p in PROMPTS]
    cpp.set_cvec(None)
    base = sum(_hits(t, tabby.keywords) for t in texts["base"])
    steered = sum(_hits(t, tabby.keywords) for t in texts["steered"])
    print("\nllama.cpp base:", texts["base"], "\nllama.cpp steered:", texts["steered"])
    assert steered >= base + 3, (base, steered, texts)
    assert sum(_hits(t, tabby.keywords) > 0 for t in texts["steered"]) >= 2


def test_steerlab_and_llamacpp_greedy_agree_at_the_same_strength(real_lm, cpp, tabby, tmp_path):
    """Same prompt ids, same strength, greedy without repetition penalty: compare the two engines.

    Greedy streams part at the first near-tie, so closeness is also measured teacher-forced:
    along steerlab's continuation, how often llama.cpp's top token is steerlab's. Gaps are
    arithmetic, not convention: llama.cpp runs the Q4_1 weights with activations quantised to
    8 bits inside its dot products, transformers the dequantised weights in fp32; both add the
    vector at the same place (block 12's output, every position, prompt included).
    """
    path = export_gguf(tabby, tmp_path / "tabby_cats.gguf")
    eos = {real_lm.tokenizer.convert_tokens_to_ids("<|im_end|>"), real_lm.tokenizer.eos_token_id}
    prefix, forced = [], []
    cpp.set_cvec(path, 0.4)
    try:
        for prompt in PROMPTS:
            ids = _ids(real_lm, prompt)
            with torch.no_grad(), steer(real_lm, [(tabby, 0.4)]):
                out = real_lm.model.generate(
                    torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=40,
                    do_sample=False, temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
                    eos_token_id=sorted(eos), pad_token_id=real_lm.tokenizer.pad_token_id)
            ours = [t for t in out[0, len(ids):].tolist() if t not in eos]
            theirs = cpp.greedy(ids, 40, eos)
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            cpp.last_logits(ids + ours)  # teacher-forced: llama.cpp's prediction at each of our positions
            rows = np.asarray(cpp.llm.scores[len(ids) - 1 : len(ids) + len(ours) - 1])
            top = float(np.mean(rows.argmax(-1) == np.array(ours)))
            prefix.append(same)
            forced.append(top)
            print(f"\n{prompt!r}: first {same}/{len(ours)} greedy tokens identical, teacher-forced top-1 "
                  f"agreement {top:.0%}\n  steerlab:  {real_lm.tokenizer.decode(ours)!r}"
                  f"\n  llama.cpp: {real_lm.tokenizer.decode(theirs)!r}")
    finally:
        cpp.set_cvec(None)
    assert max(prefix) >= 10, prefix
    assert min(forced) >= 0.8, forced
