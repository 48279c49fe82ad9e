"""The official `openai` Python client against a real uvicorn server running create_app: with the fake engine
(output rule in tests/test_http_api.py) and, in the slow test, with the real engine against HF greedy."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from pd.server.app import create_app
from pd.server_args import ServerArgs
from tests.server_process import free_port
from tests.test_http_api import MODEL, echo_rule, make_app, serve_in_thread
from tests.test_http_api import tokenizer as tokenizer  # noqa: F401  (session fixture)

API_KEY = "sk-test"
ClientFake = tuple[openai.OpenAI, Any]


@pytest.fixture
def client_fake(tokenizer: Any) -> Iterator[tuple[openai.OpenAI, Any]]:
    app, fake = make_app(tokenizer, api_key=API_KEY)
    with serve_in_thread(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0), fake


def test_models_list(client_fake: ClientFake) -> None:
    client, _ = client_fake
    assert [m.id for m in client.models.list()] == [MODEL]


def test_completion_text_and_usage(client_fake: ClientFake, tokenizer: Any) -> None:
    client, _ = client_fake
    ids = tokenizer.encode("The quick brown fox")
    out = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=11, temperature=0)
    assert out.choices[0].text == tokenizer.decode(echo_rule(ids, 11))
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 11)


def test_completion_stop_string(client_fake: ClientFake, tokenizer: Any) -> None:
    client, fake = client_fake
    out = client.completions.create(model=MODEL, prompt="one two three ", max_tokens=40, stop=["thr", "xyz"])
    assert out.choices[0].text == "one two "
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len("one two thr")
    assert fake.aborted  # the engine request was cut short


def test_completion_stream_with_usage(client_fake: ClientFake, tokenizer: Any) -> None:
    client, _ = client_fake
    ids = tokenizer.encode("naïve café ")
    stream = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=13, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == tokenizer.decode(echo_rule(ids, 13))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 13
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_completion(client_fake: ClientFake, tokenizer: Any) -> None:
    client, fake = client_fake
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_completion_tokens=6, seed=3
    )
    templated = tokenizer.encode("<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n")
    assert fake.requests[-1].input_ids == templated and fake.requests[-1].sampling.seed == 3
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == tokenizer.decode(echo_rule(templated, 6), skip_special_tokens=True)
    assert out.usage.total_tokens == len(templated) + 6


def test_chat_completion_stream(client_fake: ClientFake, tokenizer: Any) -> None:
    client, _ = client_fake
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why?"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_client_errors_are_typed(client_fake: ClientFake) -> None:
    client, fake = client_fake
    with pytest.raises(openai.BadRequestError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    fake.full = True
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="x")
    assert e.value.status_code == 503


# ---------------------------------------------------------------- real engine
@contextlib.contextmanager
def serve_real_engine(path: str) -> Iterator[str]:
    """uvicorn + a real EngineClient on one event loop in a thread (the client is bound to its loop)."""
    import uvicorn
    from transformers import AutoTokenizer

    from pd.engine.client import EngineClient
    from pd.engine.spec import EngineSpec

    port = free_port()
    args = ServerArgs(model_path=path, device="cpu", port=port)
    holder: dict[str, Any] = {}

    async def main() -> None:
        engine = EngineClient(args, EngineSpec.from_server_args(args))
        await engine.start()
        app = create_app(engine, AutoTokenizer.from_pretrained(path), args, owns_engine=True)
        server = holder["server"] = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
        await server.serve()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while not (holder.get("server") and holder["server"].started):
        assert thread.is_alive() and time.monotonic() < deadline, "server with the real engine did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        holder["server"].should_exit = True
        thread.join(30)


@pytest.mark.slow
def test_chat_on_real_engine_matches_hf_greedy(tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from tests.tiny_checkpoints import load_hf, make_checkpoint

    path = make_checkpoint("qwen3_moe", str(tmp_path / "qwen3_moe"))
    tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "Tell me about MoE."}]
    prompt = tok.encode(
        "<|im_start|>user\nTell me about MoE.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    with torch.no_grad():
        hf = load_hf(path).generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :]
    with serve_real_engine(path) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(model="qwen3_moe", messages=messages, max_tokens=10, temperature=0)
        streamed = client.chat.completions.create(
            model="qwen3_moe", messages=messages, max_tokens=10, temperature=0, stream=True
        )
        streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    want = tok.decode(hf.tolist(), skip_special_tokens=True)
    assert out.choices[0].message.content == want == streamed_text
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == 10
