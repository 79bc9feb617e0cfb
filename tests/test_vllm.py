"""The vLLM engine: payload translation, agreement with the transformers engine, mixed batches.

Run in the vLLM environment (``bash scripts/install_vllm.sh`` makes it)::

    .venv-vllm/bin/python -m pytest tests/test_vllm.py -m vllm

The payload tests need neither vllm nor vllm-lens and also run in the main environment; the
engine tests skip there (``pytest.importorskip("vllm")``). The engine tests start one vLLM
engine on the embedded SmolLM2 (CPU, fp32, 1 GiB KV cache) and load the same model with
transformers beside it; about 2-4 minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from steerlab import GenerationOptions, Steer, SteeringVector
from steerlab.engines.vllm_engine import steering_extra_args, steering_vectors, vllm_xargs
from steerlab.errors import LayerError, SteeringError

pytestmark = pytest.mark.vllm
SKIP_REASON = "vLLM is an optional engine: `bash scripts/install_vllm.sh`, then run with .venv-vllm/bin/python"
PROMPTS = [
    "What should I cook for dinner tonight?",
    "Give me three tips for saving money.",
    "Describe a typical morning routine.",
]


def _vector(layers=(3, 5), hidden=8, *, strength=0.5, seed=0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    dirs = {layer: torch.nn.functional.normalize(torch.randn(hidden, generator=g), dim=0) for layer in layers}
    norms = {layer: 10.0 + layer for layer in layers}
    return SteeringVector(directions=dirs, norms=norms, model_id="m", name="v", default_strength=strength)


# ---- payload translation (no vllm needed) ----------------------------------------------------
def test_vectors_keep_layer_numbers_and_scale_is_strength_times_norm():
    vec = _vector()
    svs = steering_vectors([(vec, 0.7)], n_layers=8, hidden_size=8)
    assert [p["layer_indices"] for p in svs] == [[3], [5]]  # steerlab layer i == vllm-lens layer i
    deltas = vec.deltas(strength=0.7)
    for p in svs:
        (layer,) = p["layer_indices"]
        assert p["scale"] == pytest.approx(0.7 * vec.norms[layer])
        assert p["norm_match"] is False and p["position_indices"] is None  # absolute units, every position
        assert p["activations"].shape == (1, 8) and p["activations"].dtype == torch.float32
        # what vllm-lens adds (activations * scale) is bit for bit steerlab's delta
        assert torch.equal(p["activations"][0] * p["scale"], deltas[layer])
    assert list(steering_extra_args([(vec, 0.7)], n_layers=8, hidden_size=8)) == ["apply_steering_vectors"]
    assert steering_extra_args([], n_layers=8, hidden_size=8) == {}


def test_vectors_default_dose_absolute_scale_and_layer_choice():
    vec = _vector(strength=0.25)
    (p,) = steering_vectors([Steer(vec, layers=(-3,))], n_layers=8, hidden_size=8)  # -3 -> 5
    assert p["layer_indices"] == [5] and p["scale"] == pytest.approx(0.25 * 15.0)
    (p,) = steering_vectors([Steer(vec, scale=4.0, layers=(3,))], n_layers=8, hidden_size=8)
    assert p["scale"] == 4.0 and torch.equal(p["activations"][0], vec.directions[3])
    two = steering_vectors([vec, (_vector(seed=1), -1.0)], n_layers=8, hidden_size=8)
    assert len(two) == 4 and two[3]["scale"] == pytest.approx(-15.0)


class _Ctx:
    def __init__(self, layer: int) -> None:
        self.layer_idx = layer


def test_generated_positions_hook_steers_last_prompt_token_then_every_new_one():
    vec, other = _vector(layers=(3,)), _vector(layers=(3, 5), seed=1)
    extra = steering_extra_args([(vec, 0.5), other], n_layers=8, hidden_size=8, positions="generated", prompt_tokens=10)
    (hook,) = extra["apply_hooks"]
    assert hook["layer_indices"] == [3, 5] and hook["pre"] is False
    fn = pickle.loads(pickle.dumps(hook["fn"]))  # vllm-lens ships it to the workers pickled
    d3 = vec.deltas(strength=0.5)[3] + other.deltas()[3]
    h = torch.zeros(6, 8)
    # chunked prefill of 10 prompt tokens (6 + 4), then two decode steps, at layer 3
    assert fn(_Ctx(3), h) is None  # positions 0..5: prompt, untouched
    out = fn(_Ctx(3), torch.zeros(4, 8))  # positions 6..9: only 9 (the last prompt token)
    assert torch.equal(out[:3], torch.zeros(3, 8)) and torch.equal(out[3], d3)
    assert torch.equal(fn(_Ctx(3), torch.zeros(1, 8))[0], d3)  # position 10: generated
    assert fn(_Ctx(4), torch.zeros(10, 8)) is None  # a layer without steering
    out5 = fn(_Ctx(5), torch.ones(10, 8))  # layer 5 counts its own positions
    assert torch.equal(out5[9], 1 + other.deltas()[5]) and torch.equal(out5[:9], torch.ones(9, 8))
    with pytest.raises(SteeringError, match="prompt_tokens"):
        steering_extra_args([vec], n_layers=8, hidden_size=8, positions="generated")


def test_prompt_positions_hook_steers_the_prompt_only():
    vec = _vector(layers=(3,))
    extra = steering_extra_args([(vec, 0.5)], n_layers=8, hidden_size=8, positions="prompt", prompt_tokens=10)
    fn = pickle.loads(pickle.dumps(extra["apply_hooks"][0]["fn"]))
    d3 = vec.deltas(strength=0.5)[3]
    assert torch.equal(fn(_Ctx(3), torch.zeros(6, 8)), d3.expand(6, 8))  # positions 0..5 of a chunked prefill
    assert torch.equal(fn(_Ctx(3), torch.zeros(4, 8)), d3.expand(4, 8))  # 6..9, the rest of the prompt
    assert fn(_Ctx(3), torch.zeros(1, 8)) is None  # position 10: generated, untouched


def test_payload_errors():
    vec = _vector()
    with pytest.raises(SteeringError, match="hidden size"):
        steering_vectors([vec], n_layers=8, hidden_size=16)
    with pytest.raises(LayerError, match="out of range"):
        steering_vectors([vec], n_layers=4, hidden_size=8)  # layer 5 of a 4-layer model
    with pytest.raises(SteeringError, match="no direction"):
        steering_vectors([Steer(vec, layers=(4,))], n_layers=8, hidden_size=8)
    with pytest.raises(SteeringError, match="positions"):
        steering_extra_args([vec], n_layers=8, hidden_size=8, positions="prompt")  # type: ignore[arg-type]


def test_conditions_vllm_cannot_honour_are_refused_in_one_line():
    from steerlab.spec import When, resolve

    vec, other = _vector(), _vector(seed=1)
    with pytest.raises(SteeringError, match=r"^v: a condition on the text \(v, on=text\) .* use on=prompt"):
        steering_vectors([Steer(vec, when=When(other, 1.0, on="text"))], n_layers=8, hidden_size=8)
    with pytest.raises(SteeringError, match="not decided yet"):  # it would otherwise steer every row
        steering_extra_args([resolve(Steer(vec, when=When(other, 1.0)), 8)], n_layers=8, hidden_size=8)
    decided = resolve(Steer(vec, when=When(other, 1.0, value=1.7)), 8)  # fired: steers as plain 'add'
    assert len(steering_vectors([decided], n_layers=8, hidden_size=8)) == 2


def test_wire_form_round_trips_through_vllm_lens():
    extra = steering_extra_args([(_vector(), 0.5)], n_layers=8, hidden_size=8)
    xargs = vllm_xargs(extra)
    assert list(xargs) == ["apply_steering_vectors"] and isinstance(xargs["apply_steering_vectors"], str)
    assert vllm_xargs({}) == {}
    lens = pytest.importorskip("vllm_lens", reason=SKIP_REASON)
    for wire, original in zip(json.loads(xargs["apply_steering_vectors"]), extra["apply_steering_vectors"]):
        sv = lens.SteeringVector.model_validate(wire)
        assert torch.equal(sv.activations, original["activations"])
        assert sv.layer_indices == original["layer_indices"] and sv.scale == original["scale"]
        assert sv.norm_match is False and sv.position_indices is None
    hooks = vllm_xargs(steering_extra_args([_vector()], n_layers=8, hidden_size=8, positions="generated",
                                           prompt_tokens=4))
    (hook,) = [lens.Hook.model_validate(h) for h in json.loads(hooks["apply_hooks"])]
    assert hook.layer_indices == [3, 5] and hook.fn.first == 3


# ---- the engine (needs vllm) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines():
    pytest.importorskip("vllm", reason=SKIP_REASON)
    from steerlab.engines.vllm_engine import VLLMEngine
    from steerlab.models import load_model

    lm = load_model(device="cpu", dtype="float32")
    engine = VLLMEngine(dtype="float32", max_model_len=1024, kv_cache_gib=1)
    yield lm, engine
    engine.close()


@pytest.fixture(scope="module")
def cats(engines) -> SteeringVector:
    from steerlab.personas import build_persona, get_persona

    lm, _ = engines
    return build_persona(lm, get_persona("tabby_cats"), layers=[12], progress=False)


class _Ids:
    """A streamer that keeps the token ids steerlab's engine generates (row 0)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.prompt_seen = False

    def put(self, value) -> None:  # noqa: ANN001
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.append(int(value.reshape(-1)[-1]))

    def end(self) -> None:
        pass


def _hf_ids(lm, prompt, row, opts) -> list[int]:  # noqa: ANN001
    from steerlab.generate import eos_ids, generate

    s = _Ids()
    generate(lm, [prompt], [row], options=opts, streamer=s)
    eos = set(eos_ids(lm.tokenizer))
    return [t for t in s.ids if t not in eos]


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _concept(text: str, keywords) -> bool:  # noqa: ANN001
    low = text.lower()
    return any(k in low for k in keywords)


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_greedy_outputs_agree_with_the_transformers_engine(engines, cats, positions):
    lm, engine = engines
    opts = GenerationOptions(max_new_tokens=24, positions=positions)
    report = []
    for row in ([], [(cats, 0.5)]):
        for prompt in PROMPTS:
            hf = _hf_ids(lm, prompt, row, opts)
            vl = engine.generate_ids([prompt], [row], options=opts)[0]
            report.append((bool(row), prompt, _first_divergence(hf, vl), len(hf), engine.decode(hf), engine.decode(vl)))
    print(f"\npositions={positions}: (steered, prompt, first divergence, tokens, hf, vllm)")
    for line in report:
        print(line)
    identical = sum(r[2] is None for r in report)
    # fp32 on both sides; kernels differ (vLLM's CPU attention / fused RMSNorm vs eager torch),
    # so a near-tie may flip late in a completion, but most rows must match token for token
    # and every row must agree on its first 8 tokens.
    assert identical >= len(report) - 2, report
    assert all(r[2] is None or r[2] >= 8 for r in report), report


def test_mixed_batch_steers_only_the_steered_rows(engines, cats):
    _, engine = engines
    opts = GenerationOptions(max_new_tokens=32)
    prompts = PROMPTS + PROMPTS[:1]
    rows = [[(cats, 0.6)], [], [Steer(cats, strength=0.6)], []]  # rows 0 and 3: same prompt
    plain = engine.generate_ids(prompts, None, options=opts)
    mixed = engine.generate_ids(prompts, rows, options=opts)
    after = engine.generate_ids(prompts, None, options=opts)  # steering leaves nothing behind
    texts = [engine.decode(ids) for ids in mixed]
    print("\n" + "\n".join(f"{bool(r)}: {t!r}" for r, t in zip(rows, texts)))
    for i, row in enumerate(rows):
        if row:
            assert _concept(texts[i], cats.keywords), texts[i]
            assert mixed[i] != plain[i]
        else:
            assert mixed[i] == plain[i], (engine.decode(mixed[i]), engine.decode(plain[i]))
    assert after == plain
    assert not any(_concept(engine.decode(ids), cats.keywords) for ids in plain[1:2] + plain[3:])


def test_shared_row_strength_zero_and_norm_preserve(engines, cats):
    _, engine = engines
    opts = GenerationOptions(max_new_tokens=12)
    plain = engine.generate_ids(PROMPTS[:2], None, options=opts)
    assert engine.generate_ids(PROMPTS[:2], [(cats, 0.0)], options=opts) == plain  # strength 0 == none
    shared = engine.generate_ids(PROMPTS[:2], [(cats, 0.6)], options=opts)  # a flat list: every row
    assert shared == engine.generate_ids(PROMPTS[:2], [[(cats, 0.6)], [(cats, 0.6)]], options=opts)
    with pytest.raises(SteeringError, match="norm_preserve"):
        engine.generate(PROMPTS[:1], [cats], options=GenerationOptions(norm_preserve=True))


def test_steered_prompts_do_not_leak_into_the_prefix_cache(engines, cats):
    """A steered prompt's KV blocks must not be reused by a later plain request (vllm-lens 1.3.0 leaks)."""
    _, engine = engines
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    story = "The lighthouse keeper wrote in his diary every night about the storms, the ships and the gulls. "
    prompt = story * (2 * block // 20 + 1) + "Summarise the diary."
    assert len(engine.encode(prompt)) > block  # at least one full, cacheable block
    opts = GenerationOptions(max_new_tokens=12)
    steered = engine.generate_ids([prompt], [[(cats, 0.8)]], options=opts)
    plain_after = engine.generate_ids([prompt], None, options=opts)
    vprompts, params = engine.requests([prompt], None, opts)
    params[0].skip_reading_prefix_cache = True
    fresh = [list(engine.llm.generate(vprompts, params, use_tqdm=False)[0].outputs[0].token_ids)]
    fresh = [[t for t in ids if t not in engine.eos_ids] for ids in fresh]
    assert steered != fresh
    assert plain_after == fresh


def test_http_server_takes_the_same_steering_in_vllm_xargs(engines, cats):
    """vLLM's OpenAI server on loopback: concurrent steered (both position modes) and plain requests."""
    import signal
    import subprocess
    import sys
    import threading

    import httpx

    from helpers import free_port, stop_group, wait_healthy

    from steerlab.engines.vllm_engine import steered_cache_salt

    _, engine = engines
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", engine.source, "--dtype", "float32",
         "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, base, timeout=900, poll=2)
        cases = [([(cats, 0.5)], "all"), ([], "all"), ([(cats, 0.5)], "generated"), ([], "all")]
        texts: list[str | None] = [None] * len(cases)

        def one(i: int) -> None:
            row, positions = cases[i]
            ids = engine.encode(PROMPTS[i % 2])
            extra = engine.extra_args(row, positions=positions, prompt_tokens=len(ids))
            body = {"model": engine.source, "prompt": ids, "max_tokens": 24, "temperature": 0,
                    "repetition_penalty": 1.2, "stop_token_ids": engine.eos_ids}
            if extra:
                body |= {"vllm_xargs": vllm_xargs(extra), "cache_salt": steered_cache_salt()}
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=600)
            r.raise_for_status()
            texts[i] = r.json()["choices"][0]["text"].strip()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (row, positions) in enumerate(cases):
            expected = engine.generate([PROMPTS[i % 2]], [row], options=GenerationOptions(max_new_tokens=24,
                                                                                         positions=positions))
            assert texts[i] == expected[0], (i, texts[i], expected[0])
        assert _concept(texts[0], cats.keywords) and not _concept(texts[1], cats.keywords)
    finally:
        stop_group(server, signal.SIGTERM)
