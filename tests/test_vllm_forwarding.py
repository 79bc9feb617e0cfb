"""steerlab's server in front of vLLM never forwards a client's vllm-lens fields.

vllm-lens unpickles hooks sent in a request's ``vllm_xargs`` (remote code execution for anyone
who reaches a plain ``vllm serve``; docs/vllm.md). steerlab's ``--engine vllm`` builds every
vLLM request itself from a prompt, its own steering objects and known sampling options; this
pins that no request field a client sends (``vllm_xargs``, ``extra_args``, hooks, a cache salt)
reaches the engine. A fake engine records what the runner hands it, so no vLLM is needed.
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from helpers import random_vector

from steerlab.generate import GenerationOptions
from steerlab.spec import Resolved
from steerlab.models import load_model
from steerlab.server import ServerSettings, create_app
from helpers import serve_in_thread
from steerlab.server.vllm_runner import VLLMRunner
from steerlab.store import VectorStore

PAYLOAD = "cos\nsystem\n(S'touch /tmp/pwned'\ntR."  # a pickle that would run a command


class RecordingEngine:
    """What VLLMRunner needs of an engine: prepare, stream, a tokenizer; it records every request."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer
        self.device, self.dtype = "fake", "float32"
        self.prepared: list[tuple] = []

    def prepare(self, prompt, row, options):  # noqa: ANN001, ANN201
        self.prepared.append((prompt, list(row), options))
        return ({"prompt": prompt, "prompt_token_ids": self.tokenizer.encode(prompt)}, options)

    async def stream(self, prepared, request_id):  # noqa: ANN001, ANN201
        yield self.tokenizer.encode("ok", add_special_tokens=False), "stop"

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory, one_torch_thread):
    lm = load_model(str(tiny_dir), device="cpu")
    store = VectorStore(tmp_path_factory.mktemp("fwd-vectors"), lm)
    store.add(random_vector(lm, range(lm.n_layers), name="weeknd").with_defaults(layers=[1]), overwrite=True)
    engine = RecordingEngine(lm.tokenizer)
    app = create_app(lm, store, ServerSettings(), runner=VLLMRunner(lambda: engine))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client, engine


SMUGGLED = {"vllm_xargs": {"apply_hooks": PAYLOAD, "steer": PAYLOAD}, "extra_args": {"hooks": PAYLOAD},
            "apply_hooks": PAYLOAD, "hooks": [PAYLOAD], "cache_salt": PAYLOAD, "extra_body": {"vllm_xargs": PAYLOAD}}


def test_generate_refuses_unknown_fields(served):
    client, engine = served
    for key, value in SMUGGLED.items():
        r = client.post("/generate", json={"prompt": "hi", "max_length": 2, key: value})
        assert r.status_code == 422 and key in r.json()["error"], r.text
    assert engine.prepared == []


def test_chat_ignores_them_and_the_engine_never_sees_them(served):
    client, engine = served
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                  "steering": "weeknd", **SMUGGLED})
    assert r.status_code == 200, r.text
    [(prompt, row, options)] = engine.prepared[-1:]
    assert prompt == "hi" and PAYLOAD not in prompt
    assert all(isinstance(s, Resolved) for s in row) and [s.steer.vector.name for s in row] == ["weeknd"]
    assert isinstance(options, GenerationOptions)
    assert {f.name for f in dataclasses.fields(options)} == {f.name for f in dataclasses.fields(GenerationOptions)}
    assert PAYLOAD not in repr(engine.prepared)


def test_a_condition_on_the_text_is_refused_before_generating(served):
    """vLLM adds a fixed vector per request: it cannot switch an entry on and off as the reply goes.
    A text condition is a 400 with the reason, and the engine never sees the request; a prompt
    condition is decided before (it did not fire here: the row goes out unsteered)."""
    client, engine = served
    before = len(engine.prepared)
    entry = {"vector": "weeknd", "when": {"vector": "weeknd", "threshold": 1.0, "on": "text"}}
    r = client.post("/generate", json={"prompt": "hi", "max_length": 2, "steering": [entry]})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == ("weeknd: a condition on the text (weeknd, on=text) re-checks the reply at every "
                                 "step; vllm-lens only adds a fixed vector: use on=prompt on the vLLM engine, or "
                                 "the transformers engine")
    assert len(engine.prepared) == before
    entry["when"] = {"vector": "weeknd", "threshold": 50.0, "on": "prompt"}
    r = client.post("/generate", json={"prompt": "hi", "max_length": 2, "steering": [entry]})
    assert r.status_code == 200, r.text
    assert r.json()["applied"][0]["fired"] is False and engine.prepared[-1][1] == []
