"""The OpenAI-compatible endpoint, driven by the real ``openai`` Python client.

Tiny model for the protocol (plain, streaming, errors, multi-turn); the real model (marked
``model``) for a steered chat that reads like one.
"""

from __future__ import annotations

import httpx
import pytest
from test_server import make_store

from steerlab.models import load_model
from steerlab.server import ServerSettings, create_app
from helpers import serve_in_thread
from steerlab.store import VectorStore

openai = pytest.importorskip("openai", reason="pip install openai (in the test extra)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # shared cores: see conftest


@pytest.fixture(scope="module")
def tiny_client(tiny_dir, tmp_path_factory):
    lm = load_model(str(tiny_dir), device="cpu")
    app = create_app(lm, make_store(lm, tmp_path_factory.mktemp("oa-vectors")), ServerSettings())
    with serve_in_thread(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=60), lm


def chat(client, content="the cat sat", **kw):
    kw = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0} | kw
    return client.chat.completions.create(**kw)


def test_plain_and_steered_completions(tiny_client):
    client, lm = tiny_client
    base = chat(client)
    assert base.object == "chat.completion" and base.model == "tiny"
    assert base.choices[0].message.role == "assistant" and base.choices[0].message.content
    assert base.choices[0].finish_reason in ("stop", "length") and 0 < base.usage.completion_tokens <= 8
    assert base.usage.total_tokens == base.usage.prompt_tokens + base.usage.completion_tokens
    steered = chat(client, extra_body={"steering": [{"vector": "weeknd", "strength": 4}]})
    assert steered.choices[0].message.content != base.choices[0].message.content
    assert chat(client).choices[0].message.content == base.choices[0].message.content  # nothing leaks
    assert [m.id for m in client.models.list()] == [lm.model_id]


def test_streaming_matches_plain(tiny_client):
    client, _ = tiny_client
    plain = chat(client, extra_body={"steering": "toronto"}).choices[0].message.content
    chunks = list(chat(client, stream=True, extra_body={"steering": "toronto"},
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"]) and chunks[-1].usage.completion_tokens > 0


def test_multi_turn_and_errors(tiny_client):
    client, _ = tiny_client
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "the cat"}]
    assert chat(client, messages=msgs).choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="available tabby_cats, toronto, weeknd"):
        chat(client, extra_body={"steering": "nope"})
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        chat(client, max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="last message"):
        chat(client, messages=msgs[:3])
    with pytest.raises(openai.UnprocessableEntityError, match="stop"):
        chat(client, stop=["\n"])


@pytest.mark.model
def test_real_model_steered_chat(real_lm, real_vectors, tmp_path):
    store = VectorStore(tmp_path / "vectors", real_lm)
    for vec in real_vectors.values():
        store.add(vec)
    with serve_in_thread(create_app(real_lm, store)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=0, timeout=120)
        ask = {"messages": [{"role": "user", "content": "Give me a tip for a weekend."}], "max_tokens": 40,
               "temperature": 0}
        base = client.chat.completions.create(model="smol", **ask).choices[0].message.content
        steered = client.chat.completions.create(model="smol", extra_body={"steering": [{"vector": "tabby_cats", "dose": 1.0}]}, **ask)
        text = steered.choices[0].message.content
        assert base and text and text != base
        assert any(k in text.lower() for k in ("cat", "purr", "kitten", "whisker", "feline", "paw")), text
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smol", stream=True, extra_body={"steering": [{"vector": "tabby_cats", "dose": 1.0}]}, **ask) if c.choices)
        assert streamed.strip() == text
        assert httpx.get(f"{url}/health").json()["model"] == real_lm.model_id
