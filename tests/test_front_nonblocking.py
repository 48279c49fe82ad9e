"""The HTTP front never blocks on a large input: a body larger than the context could need is refused with 413
before it is parsed or tokenized, a prompt longer than the context is a 400, tokenization and large
detokenizations run on worker threads (and give what the Hugging Face tokenizer gives), and a real `pd serve`
answers GET /health within 100 ms while it tokenizes the longest prompt it accepts."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from pd.server.app import create_app
from pd.server.body_limit import BODY_OVERHEAD_BYTES, MAX_BODY_BYTES_PER_TOKEN
from pd.server.tokenization import TokenizerWorkers
from pd.server_args import ServerArgs
from tests.server_process import pd_serve
from tests.test_http_api import FakeEngineClient, echo_rule
from tests.test_http_api import tokenizer as tokenizer  # noqa: F401  (session fixture)
from tests.tiny_checkpoints import make_checkpoint, write_tokenizer

CONTEXT = 1024
HEALTH_BOUND_S = 0.1
HEALTH_ATTEMPTS = 3


def _limit(context: int) -> int:
    """The documented bound: MAX_BODY_BYTES_PER_TOKEN per token of the context plus BODY_OVERHEAD_BYTES."""
    return context * MAX_BODY_BYTES_PER_TOKEN + BODY_OVERHEAD_BYTES


class SpyTokenizer:
    """Wraps a Hugging Face tokenizer; records the threads its encode and decode calls ran on."""

    def __init__(self, inner: Any, fast: bool = True) -> None:
        self._inner = inner
        self.is_fast = fast and inner.is_fast
        self.encode_threads: list[str] = []
        self.decode_calls: list[tuple[int, str]] = []  # (number of ids, thread name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    @property
    def backend_tokenizer(self) -> None:
        """None: the detokenizer then calls `decode` (recorded) instead of the Rust backend directly."""
        return None

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self.encode_threads.append(threading.current_thread().name)
        return self._inner.encode(*args, **kwargs)

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.decode_calls.append((len(ids), threading.current_thread().name))
        return self._inner.decode(ids, **kwargs)


def _client(tok: Any, context: int = CONTEXT, **fake_kw: Any) -> tuple[TestClient, FakeEngineClient]:
    fake = FakeEngineClient(len(tok), tok.eos_token_id, **fake_kw)
    fake.max_context_length = context
    args = ServerArgs(model_path="/models/fake-model", served_model_name="fake-model", device="cpu")
    return TestClient(create_app(fake, tok, args)), fake


# ---------------------------------------------------------------- tokenization on workers equals HF
def _tokenizer_variants(tmp_path: Path) -> list[tuple[str, Any, Any]]:
    """(name, tokenizer under test, an independent copy as the oracle): the byte-level test tokenizer, one whose
    post-processor adds a BOS (so add_special_tokens matters), and one whose backend is set to truncate (which
    Hugging Face's encode ignores, so the workers must not take the backend's shortcut)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    write_tokenizer(str(tmp_path))
    out = []
    for name in ("plain", "bos", "truncating"):
        toks = [AutoTokenizer.from_pretrained(str(tmp_path)) for _ in range(2)]
        for t in toks:
            if name == "bos":
                bos = t.convert_tokens_to_ids("<|im_start|>")
                t.backend_tokenizer.post_processor = TemplateProcessing(
                    single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
                )
        if name == "truncating":
            toks[0].backend_tokenizer.enable_truncation(8)
        out.append((name, toks[0], toks[1]))
    return out


def test_worker_encode_equals_hugging_face_encode(tmp_path: Path) -> None:
    rng = random.Random()
    alphabet = "abc xyz,.\n\t" + "éß世界🙂" + "<|im_start|><|im_end|>"
    for name, tok, oracle in _tokenizer_variants(tmp_path):
        workers = TokenizerWorkers(tok)
        try:
            for _ in range(20):
                text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
                for special in (True, False):
                    got = asyncio.run(workers.encode(text, 10_000, add_special_tokens=special))
                    want = oracle.encode(text, add_special_tokens=special)
                    assert got == want, (name, text, special)
        finally:
            workers.close()


def test_worker_encode_refuses_a_prompt_longer_than_the_limit_naming_its_length(tokenizer: Any) -> None:
    workers = TokenizerWorkers(tokenizer)
    try:
        text = "ab" * 40
        n = len(tokenizer.encode(text))
        assert asyncio.run(workers.encode(text, n)) == tokenizer.encode(text)
        with pytest.raises(Exception, match=f"the prompt is {n} tokens, more than the context length \\({n - 1}\\)"):
            asyncio.run(workers.encode(text, n - 1))
    finally:
        workers.close()


# ---------------------------------------------------------------- 413 before parsing, 400 before materialising
@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_bound_is_413_naming_it_and_never_tokenized(tokenizer: Any, chunked: bool) -> None:
    spy = SpyTokenizer(tokenizer, fast=False)  # every encode goes through the spy
    client, fake = _client(spy)
    limit = _limit(CONTEXT)
    prefix, suffix = b'{"text": "', b'"}'
    for size, status in ((limit, 400), (limit + 1, 413)):
        body = prefix + b"a" * (size - len(prefix) - len(suffix)) + suffix
        assert len(body) == size
        content: Any = iter([body[: size // 2], body[size // 2 :]]) if chunked else body
        r = client.post("/generate", content=content)
        assert r.status_code == status, r.text
        if status == 413:
            assert str(limit) in r.json()["error"]["message"], r.text
    assert len(spy.encode_threads) == 1  # only the body within the bound was tokenized
    assert fake.requests == []


def test_text_longer_than_the_context_is_400_on_every_route(tokenizer: Any) -> None:
    client, fake = _client(tokenizer)
    text = "x" * (CONTEXT + 1)  # byte-level tokenizer: one token per ASCII character
    n_text = len(tokenizer.encode(text))
    messages = [{"role": "user", "content": text}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    n_chat = len(tokenizer.encode(chat, add_special_tokens=False))
    assert CONTEXT < n_text < n_chat
    for path, body, n in (
        ("/generate", {"text": text}, n_text),
        ("/generate", {"text": ["hi", text]}, n_text),
        ("/v1/completions", {"prompt": text}, n_text),
        ("/v1/chat/completions", {"messages": messages}, n_chat),
    ):
        r = client.post(path, json=body)
        assert r.status_code == 400, (path, r.text)
        message = r.json()["error"]["message"]
        assert f"{n} tokens" in message and f"context length ({CONTEXT})" in message, (path, r.text)
    assert fake.requests == []


def test_large_output_is_detokenized_on_a_worker_and_equals_hf_decode(tokenizer: Any) -> None:
    spy = SpyTokenizer(tokenizer)
    max_new = 300  # one engine message: more than the inline bound, so it goes to a worker
    client, _ = _client(spy, tokens_per_message=max_new)
    prompt = "".join(random.choice("abcdef ghij,.") for _ in range(20))
    ids = tokenizer.encode(prompt)
    r = client.post("/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": max_new}})
    assert r.status_code == 200, r.text
    want = echo_rule(ids, max_new)
    assert r.json()["output_ids"] == want
    assert r.json()["text"] == tokenizer.decode(want)
    big = [thread for n, thread in spy.decode_calls if n >= max_new]
    assert big and all(t.startswith("tokenizer") for t in big), spy.decode_calls


# ---------------------------------------------------------------- a real server stays responsive
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    from transformers import AutoTokenizer

    path = make_checkpoint("llama", str(tmp_path_factory.mktemp("front") / "llama"))
    with pd_serve(path) as url:
        yield url, AutoTokenizer.from_pretrained(path)


async def _health_while(url: str, request: Any) -> tuple[httpx.Response, list[float]]:
    """Runs `request` and polls GET /health until it answers; returns its response and every poll's latency."""
    async with httpx.AsyncClient(timeout=60) as client:
        task = asyncio.create_task(request(client))
        latencies = []
        while not task.done():
            start = time.perf_counter()
            r = await client.get(f"{url}/health")
            latencies.append(time.perf_counter() - start)
            assert r.status_code == 200
            await asyncio.sleep(0.01)
        return await task, latencies


def _slowest_health_poll(url: str, request: Any) -> tuple[httpx.Response, list[list[float]]]:
    """_health_while, up to HEALTH_ATTEMPTS times until every poll of one run is within HEALTH_BOUND_S.

    The machine running the tests may be shared: an idle server's /health has been seen taking 0.5 s when other
    processes starve it of CPU. A stalled event loop stalls every run (the slowest poll waits for the whole
    tokenization), while such noise hits one run by chance, so one clean run out of a few tells them apart.
    """
    runs = []
    for _ in range(HEALTH_ATTEMPTS):
        response, latencies = asyncio.run(_health_while(url, request))
        runs.append(latencies)
        if max(latencies) < HEALTH_BOUND_S:
            break
    return response, runs


def test_health_answers_within_100ms_while_the_longest_accepted_prompt_is_tokenized(server: tuple[str, Any]) -> None:
    url, tok = server
    context = httpx.get(f"{url}/get_model_info").json()["max_context_length"]
    # The most text a body within the bound holds: ASCII, one token per byte with this tokenizer.
    text = "".join(random.choice("abcdefgh ,.") for _ in range(_limit(context) - 100))
    n_tokens = len(tok.encode(text))

    async def post(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(f"{url}/generate", json={"text": text})

    response, runs = _slowest_health_poll(url, post)
    assert max(runs[-1]) < HEALTH_BOUND_S, [sorted(r)[-3:] for r in runs]
    assert len(runs[-1]) >= 3, f"the request ended before /health was polled during it: {runs[-1]}"
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert f"{n_tokens} tokens" in message and f"context length ({context})" in message, message


def test_a_5mb_prompt_is_413_at_once_and_health_stays_fast(server: tuple[str, Any]) -> None:
    url, _ = server
    context = httpx.get(f"{url}/get_model_info").json()["max_context_length"]

    async def post(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(f"{url}/v1/completions", json={"prompt": "a" * (5 << 20)})

    response, runs = _slowest_health_poll(url, post)
    assert max(runs[-1]) < HEALTH_BOUND_S, [sorted(r)[-3:] for r in runs]
    assert response.status_code == 413, response.text
    assert str(_limit(context)) in response.json()["error"]["message"]
