"""The HTTP front (create_app) against a fake engine client whose output follows a trivial rule, so each test
can compute the exact expected tokens itself: the k-th output token is the prompt's token k mod len(prompt)
(the prompt is echoed cyclically), ending on EOS / a stop token (unless ignore_eos) or max_new_tokens.

Covers every 400 case, 401, 503, SSE formats, finish reasons, stop strings, aborts (explicit and on client
disconnect), /metrics, info routes. The last tests run the real engine on a tiny checkpoint against HF.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pd.engine.client import EngineFullError
from pd.engine.io import EngineStats, GenerateRequest, TokenOutput
from pd.server.app import create_app
from pd.server_args import ServerArgs
from tests.server_process import free_port
from tests.tiny_checkpoints import write_tokenizer

MODEL = "fake-model"
CONTEXT = 64
KV_PAGES, PAGE = 32, 16


class FakeEngineClient:
    """Stands in for pd.engine.client.EngineClient; records requests and aborts for the tests."""

    def __init__(self, vocab_size: int, eos_id: int, tokens_per_message: int = 1, token_delay: float = 0.0) -> None:
        self.model_config = {"vocab_size": vocab_size, "model_type": "fake", "architectures": ["FakeForCausalLM"]}
        self.max_context_length = CONTEXT
        self.eos_id = eos_id
        self.tokens_per_message = tokens_per_message
        self.token_delay = token_delay
        self.is_alive = True
        self.full = False
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.active: set[str] = set()
        self._abort_flags: set[str] = set()
        self.fail_with: tuple[int, str] | None = None  # (status, message): end every request with an engine error

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenOutput]:
        if self.full:
            raise EngineFullError("fake queue is full")
        self.requests.append(req)
        if self.fail_with is not None:
            yield TokenOutput(req.rid, [], len(req.input_ids), 0, "error", error=self.fail_with[1],
                              status=self.fail_with[0])  # fmt: skip
            return
        self.active.add(req.rid)
        sp, prompt, out = req.sampling, [int(t) for t in req.input_ids], []  # ints, as the engine's outputs are
        try:
            while True:
                await asyncio.sleep(self.token_delay)
                if req.rid in self._abort_flags:
                    yield TokenOutput(req.rid, [], len(prompt), len(out), "abort")
                    return
                new, finish, matched = [], None, None
                for _ in range(self.tokens_per_message):
                    tok = prompt[len(out) % len(prompt)]
                    out.append(tok)
                    new.append(tok)
                    if (tok == self.eos_id and not sp.ignore_eos) or tok in sp.stop_token_ids:
                        finish, matched = "stop", tok
                    elif len(out) == sp.max_new_tokens:
                        finish = "length"
                    if finish:
                        break
                yield TokenOutput(req.rid, new, len(prompt), len(out), finish, matched)
                if finish:
                    return
        finally:
            self.active.discard(req.rid)

    async def abort(self, rid: str) -> None:
        self.aborted.append(rid)
        if rid in self.active:
            self._abort_flags.add(rid)

    async def abort_all(self) -> None:
        for rid in list(self.active):
            await self.abort(rid)

    def stats(self) -> EngineStats:
        n = len(self.active)
        return EngineStats(0, n, KV_PAGES, KV_PAGES - n, PAGE, 0, 0)

    async def close(self) -> None:
        self.is_alive = False


def echo_rule(prompt: list[int], max_new: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """The fake's output, computed independently: cyclic echo cut at the first stop id or max_new."""
    out = [prompt[k % len(prompt)] for k in range(max_new)]
    cut = next((k for k, t in enumerate(out) if t in stop_ids), None)
    return out if cut is None else out[: cut + 1]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("tokenizer"))
    write_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def make_app(tokenizer: Any, api_key: str | None = None, **fake_kw: Any) -> tuple[FastAPI, FakeEngineClient]:
    fake = FakeEngineClient(len(tokenizer), tokenizer.eos_token_id, **fake_kw)
    args = ServerArgs(model_path="/models/fake-model", served_model_name=MODEL, device="cpu", api_key=api_key)
    return create_app(fake, tokenizer, args), fake


AppFake = tuple[TestClient, FakeEngineClient]


@pytest.fixture
def app_fake(tokenizer: Any) -> tuple[TestClient, FakeEngineClient]:
    app, fake = make_app(tokenizer)
    return TestClient(app), fake


@contextlib.contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """A real uvicorn server for `app` on a free port (for real sockets: disconnects, the openai client)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def sse_events(body: str) -> list[Any]:
    """Parse an SSE body into JSON payloads, asserting the wire format (data lines, blank separators, [DONE])."""
    blocks = body.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]", body[-200:]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks[:-2])
    return [json.loads(b[len("data: ") :]) for b in blocks[:-2]]


def wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def random_prompt(rng: random.Random, tokenizer: Any, n: int) -> tuple[str, list[int]]:
    text = "".join(rng.choice("abcdefghij klmnop,.") for _ in range(n))
    return text, tokenizer.encode(text)


# ---------------------------------------------------------------- /generate
@pytest.mark.parametrize("seed", range(3))
def test_generate_text_returns_echo_rule_tokens_and_their_decoding(
    app_fake: AppFake, tokenizer: Any, seed: int
) -> None:
    client, fake = app_fake
    rng = random.Random(seed)
    text, ids = random_prompt(rng, tokenizer, rng.randint(3, 12))
    max_new = rng.randint(1, 20)
    r = client.post("/generate", json={"text": text, "rid": f"r{seed}", "sampling_params": {"max_new_tokens": max_new}})
    assert r.status_code == 200, r.text
    want = echo_rule(ids, max_new)
    body = r.json()
    assert body["output_ids"] == want
    assert body["text"] == tokenizer.decode(want)
    meta = body["meta_info"]
    assert (meta["id"], meta["prompt_tokens"], meta["completion_tokens"]) == (f"r{seed}", len(ids), max_new)
    assert meta["finish_reason"] == {"type": "length", "length": max_new}
    assert meta["e2e_latency"] > 0
    assert fake.requests[-1].input_ids == ids and fake.requests[-1].sampling.max_new_tokens == max_new


def test_generate_passes_sampling_and_bootstrap_fields_to_engine(app_fake: AppFake) -> None:
    client, fake = app_fake
    body = {
        "input_ids": [5, 6, 7],
        "sampling_params": {"max_new_tokens": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 7, "min_p": 0.1,
                            "seed": 42, "stop_token_ids": [9], "ignore_eos": True},
        "bootstrap_host": "10.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 2**62 + 5,
        # SGLang router fields: accepted and ignored.
        "model": None, "return_text_in_logprobs": False, "log_metrics": True, "return_hidden_states": False,
        "background": False, "no_logs": False, "return_bytes": False, "return_entropy": False,
        "return_logprob": False, "logprob_start_len": -1, "top_logprobs_num": 0, "lora_path": None,
        "custom_logit_processor": None, "some_future_field": 1,
    }  # fmt: skip
    assert client.post("/generate", json=body).status_code == 200
    req = fake.requests[-1]
    sp = req.sampling
    assert (sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.seed) == (3, 0.5, 0.9, 7, 0.1, 42)
    assert (sp.stop_token_ids, sp.ignore_eos) == ((9,), True)
    assert (req.bootstrap_host, req.bootstrap_port, req.bootstrap_room) == ("10.0.0.1", 8998, 2**62 + 5)


def test_generate_default_max_new_tokens_is_clamped_to_the_context(app_fake: AppFake) -> None:
    client, fake = app_fake
    r = client.post("/generate", json={"input_ids": list(range(3, 3 + CONTEXT - 10))})
    assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 10


def test_generate_batch_returns_one_result_per_prompt(app_fake: AppFake, tokenizer: Any) -> None:
    client, _ = app_fake
    texts = ["abc", "hello world", "xy"]
    r = client.post("/generate", json={"text": texts, "sampling_params": {"max_new_tokens": 5}})
    assert r.status_code == 200, r.text
    outs = r.json()
    assert [o["output_ids"] for o in outs] == [echo_rule(tokenizer.encode(t), 5) for t in texts]
    assert len({o["meta_info"]["id"] for o in outs}) == 3


def test_generate_eos_finishes_with_stop_and_is_trimmed_from_text(app_fake: AppFake, tokenizer: Any) -> None:
    client, _ = app_fake
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("hi ") + tokenizer.encode("there") + [eos]
    r = client.post("/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 30}}).json()
    assert r["output_ids"] == ids  # the EOS token is part of the output ids, as in SGLang
    assert r["text"] == "hi there"
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    # A non-special stop token is cut from the text too, unless no_stop_trim.
    stop_tok = tokenizer.encode("!")[0]
    ids = tokenizer.encode("ab!cd")
    for trim, text in ((False, "ab"), (True, "ab!")):
        sp = {"max_new_tokens": 30, "stop_token_ids": [stop_tok], "no_stop_trim": trim}
        r = client.post("/generate", json={"input_ids": ids, "sampling_params": sp}).json()
        assert (r["text"], r["output_ids"]) == (text, echo_rule(ids, 30, (stop_tok,)))


@pytest.mark.parametrize("tokens_per_message", [1, 3])
@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_stop_string_ends_request_and_aborts_engine(
    tokenizer: Any, tokens_per_message: int, no_stop_trim: bool
) -> None:
    app, fake = make_app(tokenizer, tokens_per_message=tokens_per_message)
    client = TestClient(app)
    text = "the cat sat on the mat; "
    ids = tokenizer.encode(text)
    sp = {"max_new_tokens": 60 - len(ids), "stop": ["on th", "zzz"], "no_stop_trim": no_stop_trim}
    r = client.post("/generate", json={"input_ids": ids, "rid": "s1", "sampling_params": sp}).json()
    full = tokenizer.decode(echo_rule(ids, sp["max_new_tokens"]))
    pos = full.index("on th")
    assert r["text"] == (full[: pos + 5] if no_stop_trim else full[:pos])
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": "on th"}
    # Output ends at the token that completed the stop string (byte tokens: one per character here).
    assert r["output_ids"] == ids[: pos + 5] and r["meta_info"]["completion_tokens"] == pos + 5
    assert fake.aborted == ["s1"]


def test_generate_stream_sends_cumulative_sglang_chunks_then_done(app_fake: AppFake, tokenizer: Any) -> None:
    client, _ = app_fake
    ids = tokenizer.encode("héllo, 世界")  # multi-byte characters span several tokens
    r = client.post("/generate", json={"input_ids": ids, "stream": True, "sampling_params": {"max_new_tokens": 12}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    want = echo_rule(ids, 12)
    assert [len(e["output_ids"]) for e in events] == list(range(1, 13))
    for e in events:
        assert want[: len(e["output_ids"])] == e["output_ids"]
        assert tokenizer.decode(e["output_ids"]).startswith(e["text"])
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert events[-1]["text"] == tokenizer.decode(want)


# Line breaks to str.splitlines (and so to httpx's aiter_lines, a common way to read SSE) that JSON leaves unescaped.
UNICODE_LINE_BREAKS = "\u2028\u2029\x85"


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_streamed_text_with_unicode_line_breaks_reaches_an_httpx_line_reader_whole(
    app_fake: AppFake, tokenizer: Any, route: str
) -> None:
    """Generated text holding U+2028, U+2029 or U+0085 (random tokens make them now and then): read with httpx's
    iter_lines, every data line of the stream is one whole JSON event, and the text they carry is the tokens' text
    (tokenizer.decode, the oracle). Before, such an event reached the client as two broken lines."""
    client, _ = app_fake
    rng = random.Random()
    # short: prompt and output fit the fake's 64-token context (a character is up to 3 byte tokens)
    text = "".join(rng.choice(["a", "é", " ", "世", *UNICODE_LINE_BREAKS]) for _ in range(rng.randint(1, 3)))
    text += rng.choice(UNICODE_LINE_BREAKS)
    ids = tokenizer.encode(text)
    body: dict[str, Any] = {"stream": True}
    if route == "/generate":  # the fake engine echoes the prompt: the output is the text again
        body.update(input_ids=ids, sampling_params={"max_new_tokens": len(ids)})
    elif route == "/v1/completions":
        body.update(prompt=ids, max_tokens=len(ids))
    else:  # the echo of the templated prompt: <|im_start|> (not shown), "user\n", the text
        body.update(messages=[{"role": "user", "content": text}], max_tokens=1 + len("user\n") + len(ids))
    with client.stream("POST", route, json=body) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]  # each line whole
    if route == "/generate":
        assert events[-1]["output_ids"] == ids and events[-1]["text"] == tokenizer.decode(ids) == text
        return
    key = "text" if route == "/v1/completions" else "content"
    got = "".join((e["choices"][0].get("delta") or e["choices"][0]).get(key) or "" for e in events if e["choices"])
    assert got == (text if route == "/v1/completions" else "user\n" + text)


@pytest.mark.parametrize("with_text", [True, False])
def test_generate_stream_events_encoded_incrementally_equal_the_whole_object(with_text: bool) -> None:
    """CumulativeEvents (which extends the JSON of the text and ids so far) against json.dumps of the whole
    response object, on random chunks of text with quotes, backslashes, control characters and non-ASCII, including
    a chunk that does not extend the previous one (encoded whole)."""
    from types import SimpleNamespace

    import torch

    from pd.server.generation import FinishReason, GenerationChunk
    from pd.server.native_api import CumulativeEvents, _output

    rng = random.Random(int(torch.randint(0, 2**62, ())))
    ctx = SimpleNamespace(tokenizer=object() if with_text else None)
    pool = 'ab "\\\n\t\x00\x1f\u00e9\u4e16\U0001f600/<>'
    encoder, text, ids = CumulativeEvents(with_text), "", []
    for k in range(40):
        delta = "".join(rng.choice(pool) for _ in range(rng.randint(0, 4)))
        new_ids = [rng.randrange(200000) for _ in range(rng.randint(0, 3))]
        if k in (20, 25):  # chunks whose text is not the previous text plus their delta
            text = "" if k == 20 else text[:-1]
        text, ids = text + delta, ids + new_ids
        finish = FinishReason("length", length=len(ids)) if k == 39 else None
        rid = f'r"{k // 10}\u00e9\\'  # a rid to escape, the same over several chunks (encoded once per rid)
        chunk = GenerationChunk(rid=rid, delta=delta, text=text, output_ids=list(ids), prompt_tokens=k,
                                finish=finish, e2e_latency=rng.random(), cached_tokens=k % 3)  # fmt: skip
        event = encoder.event(ctx, chunk)  # type: ignore[arg-type]
        assert event.startswith("data: ") and event.endswith("\n\n")
        assert json.loads(event[len("data: ") :]) == json.loads(json.dumps(_output(ctx, chunk)))  # type: ignore[arg-type]
        meta = event[event.index('"meta_info": ') + len('"meta_info": ') : -len("}\n\n")]
        assert meta == json.dumps(_output(ctx, chunk)["meta_info"], ensure_ascii=False)  # type: ignore[arg-type]


def test_stream_interval_reaches_the_engine_from_the_request_or_the_server_flag(tokenizer: Any) -> None:
    """sampling_params.stream_interval wins over --stream-interval; non-streaming requests ask for the end only;
    an out-of-range value is a 400 naming the field."""
    fake = FakeEngineClient(len(tokenizer), tokenizer.eos_token_id)
    args = ServerArgs(model_path="/models/fake-model", served_model_name=MODEL, device="cpu", stream_interval=4)
    client = TestClient(create_app(fake, tokenizer, args))
    body = {"input_ids": [5, 6], "stream": True, "sampling_params": {"max_new_tokens": 3}}
    assert client.post("/generate", json=body).status_code == 200
    assert fake.requests[-1].stream_interval == 4 and fake.requests[-1].every_token
    body["sampling_params"]["stream_interval"] = 2
    assert client.post("/generate", json=body).status_code == 200
    assert fake.requests[-1].stream_interval == 2
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 3, "stream": True}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert fake.requests[-1].stream_interval == 4
    assert client.post("/generate", json={**body, "stream": False}).status_code == 200
    assert not fake.requests[-1].every_token
    body["sampling_params"]["stream_interval"] = 0
    r = client.post("/generate", json=body)
    assert r.status_code == 400 and "stream_interval" in r.json()["error"]["message"]


# ---------------------------------------------------------------- errors
def _long(n: int) -> list[int]:
    return [3] * n


BAD_REQUESTS = [
    ("/generate", {}, "exactly one of text or input_ids"),
    ("/generate", {"text": "a", "input_ids": [1]}, "exactly one of text or input_ids"),
    ("/generate", {"text": 5}, "text must be a string or a list of strings"),
    ("/generate", {"input_ids": ["a"]}, "input_ids must be a list of token ids"),
    ("/generate", {"input_ids": [-1]}, "input_ids must be a list of token ids"),
    ("/generate", {"input_ids": [100000]}, "contains token id 100000, but the vocabulary has"),
    ("/generate", {"input_ids": []}, "input_ids is empty"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": -5}}, "max_new_tokens: must be >= 1, got -5"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 0}}, "max_new_tokens: must be >= 1"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": "9"}}, "max_new_tokens: Input should be a valid"),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 10**9}}, "larger than the context length (64)"),
    ("/generate", {"input_ids": _long(50), "sampling_params": {"max_new_tokens": 20}},
     "the prompt (50 tokens) plus sampling_params.max_new_tokens (20) is 70 tokens, more than the context length (64)"),
    ("/generate", {"input_ids": _long(64)}, "the prompt (64 tokens) leaves no room for output"),
    ("/generate", {"text": "a", "sampling_params": {"temperature": -0.5}}, "temperature: must be >= 0"),
    ("/generate", {"text": "a", "sampling_params": {"top_p": 0}}, "top_p: must be in (0, 1]"),
    ("/generate", {"text": "a", "sampling_params": {"top_p": 1.5}}, "top_p: must be in (0, 1]"),
    ("/generate", {"text": "a", "sampling_params": {"top_k": -2}}, "top_k: must be -1"),
    ("/generate", {"text": "a", "sampling_params": {"min_p": 2}}, "min_p: must be in [0, 1]"),
    ("/generate", {"text": "a", "sampling_params": {"stop": 5}}, "stop must be a string or a list of strings"),
    ("/generate", {"text": "a", "sampling_params": {"stop": [""]}}, "stop must not contain empty strings"),
    ("/generate", {"text": "a", "sampling_params": {"stop_token_ids": [-3]}}, "stop_token_ids[0]: must be"),
    ("/generate", {"text": "a", "sampling_params": {"frequency_penalty": 0.5}}, "frequency_penalty is not supported"),
    ("/generate", {"text": "a", "sampling_params": {"n": 2}}, "n > 1"),
    ("/generate", {"text": "a", "sampling_params": {"ignore_eos": "yes"}}, "ignore_eos: Input should be a valid"),
    ("/generate", {"text": "a", "sampling_params": "hot"}, "sampling_params"),
    ("/generate", {"text": "a", "stream": "yes"}, "stream: Input should be a valid boolean"),
    ("/generate", {"text": "a", "rid": ["x", "y"]}, "rid is a list, but the request has a single prompt"),
    ("/generate", {"text": ["a", "b"], "stream": True}, "not supported for a batch"),
    ("/generate", [1, 2], "request body"),
    ("/v1/completions", {}, "prompt: this field is required"),
    ("/v1/completions", {"prompt": "a", "n": 2}, "n > 1"),
    ("/v1/completions", {"prompt": "a", "echo": True}, "echo is not supported"),
    ("/v1/completions", {"prompt": "a", "logprobs": 2}, "logprobs is not supported"),
    ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, "model 'gpt-4' is not served here"),
    ("/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens: must be >= 1"),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, "temperature: must be >= 0"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "one prompt per request"),
    ("/v1/completions", {"prompt": _long(60), "max_tokens": 10}, "plus max_tokens (10) is 70 tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages: List should have at least 1 item"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "only text content parts"),
    ("/v1/chat/completions", {}, "messages: this field is required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools (function calling) is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens: must be >= 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 100},
     "max_completion_tokens (100) is larger than the context length"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "message"), BAD_REQUESTS)
def test_bad_request_answers_400_with_openai_error_saying_what_is_wrong(
    app_fake: AppFake, path: str, body: Any, message: str
) -> None:
    client, fake = app_fake
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == 400
    assert message in err["message"], err["message"]
    assert not fake.requests  # nothing reached the engine
    # The server keeps serving.
    assert client.post("/generate", json={"text": "ok", "sampling_params": {"max_new_tokens": 2}}).status_code == 200


@pytest.mark.parametrize(
    ("content", "message"),
    [(b'{"text": "a",', "not valid JSON"), (b"", "request body is missing"), (b"\xff\xfe", "not valid JSON")],
)
def test_malformed_body_answers_400(app_fake: AppFake, content: bytes, message: str) -> None:
    client, _ = app_fake
    r = client.post("/generate", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_json_body_is_accepted_whatever_the_content_type(app_fake: AppFake) -> None:
    client, _ = app_fake
    content = json.dumps({"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 3}})
    r = client.post("/generate", content=content, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["output_ids"] == [5, 6, 5]


def test_duplicate_in_flight_rid_answers_400(tokenizer: Any) -> None:
    app, fake = make_app(tokenizer, token_delay=0.05)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            body = {"input_ids": [5, 6], "rid": "dup", "sampling_params": {"max_new_tokens": 10}}
            first = asyncio.create_task(c.post("/generate", json=body))
            while "dup" not in fake.active:
                await asyncio.sleep(0.01)
            second = await c.post("/generate", json=body)
            return await first, second

    first, second = asyncio.run(scenario())
    assert first.status_code == 200 and first.json()["meta_info"]["completion_tokens"] == 10
    assert second.status_code == 400 and "already in flight" in second.json()["error"]["message"]


def test_token_ids_only_serving_without_tokenizer(tokenizer: Any) -> None:
    fake = FakeEngineClient(len(tokenizer), tokenizer.eos_token_id)
    args = ServerArgs(model_path="/m", device="cpu", skip_tokenizer_init=True)
    client = TestClient(create_app(fake, None, args))
    r = client.post("/generate", json={"input_ids": [7, 8, 9], "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 200 and r.json()["output_ids"] == [7, 8, 9, 7] and "text" not in r.json()
    for path, body in [
        ("/generate", {"text": "a"}),
        ("/generate", {"input_ids": [7], "sampling_params": {"stop": "x"}}),
        ("/v1/completions", {"prompt": "a"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"], r.text


def test_unknown_route_answers_404_json(app_fake: AppFake) -> None:
    client, _ = app_fake
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_engine_full_answers_503_then_serves_again(app_fake: AppFake) -> None:
    client, fake = app_fake
    fake.full = True
    for path, body in [
        ("/generate", {"text": "a"}),
        ("/generate", {"text": "a", "stream": True}),
        ("/v1/completions", {"prompt": "a"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "stream": True}),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
    fake.full = False
    assert client.post("/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 1}}).status_code == 200


def test_api_key_required_everywhere_but_health_and_metrics(tokenizer: Any) -> None:
    app, _ = make_app(tokenizer, api_key="sk-secret")
    client = TestClient(app)
    body = {"text": "a", "sampling_params": {"max_new_tokens": 1}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-secret"}):
        r = client.post("/generate", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
    for path in ("/v1/models", "/get_server_info", "/get_model_info", "/health_generate"):
        assert client.get(path).status_code == 401
    auth = {"Authorization": "Bearer sk-secret"}
    assert client.post("/generate", json=body, headers=auth).status_code == 200
    assert client.get("/v1/models", headers=auth).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert "sk-secret" not in client.get("/get_server_info", headers=auth).text


# ---------------------------------------------------------------- aborts
def test_abort_request_ends_generation_with_abort(tokenizer: Any) -> None:
    app, fake = make_app(tokenizer, token_delay=0.02)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
            body = {"input_ids": [5, 6], "rid": "victim", "sampling_params": {"max_new_tokens": 60}}
            gen = asyncio.create_task(c.post("/generate", json=body))
            while "victim" not in fake.active:
                await asyncio.sleep(0.01)
            abort = await c.post("/abort_request", json={"rid": "victim"})
            return await gen, abort

    gen, abort = asyncio.run(scenario())
    assert abort.status_code == 200
    meta = gen.json()["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 60


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_engine_request(tokenizer: Any, stream: bool) -> None:
    app, fake = make_app(tokenizer, token_delay=0.05)
    body = {"input_ids": [5, 6], "rid": "gone", "stream": stream, "sampling_params": {"max_new_tokens": 60}}
    with serve_in_thread(app) as url:
        if stream:
            with httpx.stream("POST", url + "/generate", json=body, timeout=10) as r:
                first = next(r.iter_lines())
                assert first.startswith("data: ")
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/generate", json=body, timeout=0.5)
        wait_until(lambda: "gone" in fake.aborted and not fake.active)


# ---------------------------------------------------------------- info, health, metrics
def test_info_routes_report_args_and_live_stats(app_fake: AppFake) -> None:
    client, _ = app_fake
    info = client.get("/get_server_info").json()
    assert client.get("/server_info").json()["port"] == info["port"] == 30000
    assert info["served_model_name"] == MODEL and info["max_context_length"] == CONTEXT
    assert (info["kv_pages_total"], info["kv_pages_free"], info["num_running"], info["num_waiting"]) == (
        KV_PAGES, KV_PAGES, 0, 0,
    )  # fmt: skip
    assert all(isinstance(info[k], int) for k in ("kv_pages_total", "kv_pages_free", "num_running", "num_waiting"))
    model = client.get("/get_model_info").json()
    assert client.get("/model_info").json() == model
    assert model["model_path"] == "/models/fake-model" and model["is_generation"] is True
    assert model["served_model_name"] == MODEL
    assert client.get("/health").status_code == 200
    assert client.get("/health_generate").status_code == 200


def test_health_fails_when_engine_is_gone(app_fake: AppFake) -> None:
    client, fake = app_fake
    fake.is_alive = False
    assert client.get("/health").status_code == 503


def _metric_values(text: str) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.labels or set(s.labels) == {"finish_reason"}:
                values[s.name + "".join(f"{{{v}}}" for v in s.labels.values())] = s.value
    return values


def test_metrics_count_tokens_and_latencies_per_app(tokenizer: Any) -> None:
    app, _ = make_app(tokenizer)
    other, _ = make_app(tokenizer)
    client = TestClient(app)
    rng = random.Random(0)
    prompts = [rng.randint(2, 9) for _ in range(3)]
    news = [rng.randint(1, 9) for _ in range(3)]
    for p, n in zip(prompts, news, strict=True):
        body = {"input_ids": list(range(5, 5 + p)), "sampling_params": {"max_new_tokens": n}}
        assert client.post("/generate", json=body).status_code == 200
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _metric_values(r.text)
    assert m["pd:prompt_tokens_total"] == sum(prompts)
    assert m["pd:generation_tokens_total"] == sum(news)
    assert m["pd:num_requests_total{length}"] == 3
    assert m["pd:time_to_first_token_seconds_count"] == 3
    assert m["pd:e2e_request_latency_seconds_count"] == 3
    assert m["pd:inter_token_latency_seconds_count"] == sum(news) - 3  # one per token after the first
    assert m["pd:gen_throughput"] > 0
    for gauge in ("pd:num_running_reqs", "pd:num_queue_reqs", "pd:kv_pages_used", "pd:kv_pages_free"):
        assert gauge in m
    assert (m["pd:kv_pages_free"], m["pd:kv_pages_used"]) == (KV_PAGES, 0)
    # Registries are per app: the other app counted nothing.
    assert _metric_values(TestClient(other).get("/metrics").text)["pd:generation_tokens_total"] == 0


# ---------------------------------------------------------------- OpenAI routes over raw HTTP
def test_v1_models_lists_the_served_model(app_fake: AppFake) -> None:
    client, _ = app_fake
    data = client.get("/v1/models").json()["data"]
    assert [d["id"] for d in data] == [MODEL] and data[0]["object"] == "model"
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/other").status_code == 404


@pytest.mark.parametrize("model", [MODEL, None, "/models/fake-model"])
def test_completions_accepts_served_name_or_null_model(app_fake: AppFake, tokenizer: Any, model: str | None) -> None:
    client, _ = app_fake
    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 7, "model": model})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = tokenizer.encode("hello")
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == tokenizer.decode(echo_rule(ids, 7))
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 7, "total_tokens": len(ids) + 7}


def test_completions_stream_deltas_concatenate_to_the_text_and_usage_comes_last(
    app_fake: AppFake, tokenizer: Any
) -> None:
    client, _ = app_fake
    body = {"prompt": "ça va, 世界", "max_tokens": 9, "stream": True, "stream_options": {"include_usage": True}}
    events = sse_events(client.post("/v1/completions", json=body).text)
    *chunks, usage = events
    ids = tokenizer.encode("ça va, 世界")
    assert "".join(c["choices"][0]["text"] for c in chunks) == tokenizer.decode(echo_rule(ids, 9))
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 9
    assert len({c["id"] for c in events}) == 1


def test_chat_applies_template_and_streams_role_first(app_fake: AppFake, tokenizer: Any) -> None:
    client, fake = app_fake
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    # The template, rendered by hand (ChatML).
    templated = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    want_ids = tokenizer.encode(templated, add_special_tokens=False)
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 5, "max_tokens": 50})
    assert r.status_code == 200, r.text
    assert fake.requests[-1].input_ids == want_ids
    body = r.json()
    assert body["object"] == "chat.completion"
    want_text = tokenizer.decode(echo_rule(want_ids, 5), skip_special_tokens=True)
    assert want_text == "syst"  # the leading <|im_start|> is a special token
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want_text}
    assert body["usage"]["completion_tokens"] == 5

    events = sse_events(
        client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5, "stream": True}).text
    )
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:])
    assert content == body["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------- real engine (tiny checkpoint vs HF greedy)
@pytest.mark.slow
def test_generate_on_real_engine_matches_hf_greedy(tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from tests.server_process import in_process_front
    from tests.tiny_checkpoints import load_hf, make_checkpoint

    path = make_checkpoint("mixtral", str(tmp_path / "mixtral"))
    tok = AutoTokenizer.from_pretrained(path)
    args = ServerArgs(model_path=path, device="cpu")
    prompt_ids = torch.randint(0, 256, (12,)).tolist()
    with torch.no_grad():
        hf = load_hf(path).generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False)[0, 12:].tolist()

    async def scenario() -> dict[str, Any]:
        async with in_process_front(args, tok) as c:
            body = {"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
            r = await c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            return r.json()

    out = asyncio.run(scenario())
    assert out["output_ids"] == hf
    assert out["text"] == tok.decode(hf)


@pytest.mark.parametrize("status", [400, 409, 500])
@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_refusal_answers_the_status_of_whose_fault_it_is(app_fake: AppFake, status: int, stream: bool):
    """The engine's own refusals of a request (too long for the KV pool: 400; its bootstrap room is taken: 409)
    are the client's errors, not 500s; a failure of the engine stays 500. On every generation route."""
    client, fake = app_fake
    fake.fail_with = (status, "the request needs 9999 tokens of KV cache; the pool holds 64")
    bodies = {"/generate": {"text": "hi", "stream": stream},
              "/v1/completions": {"model": MODEL, "prompt": "hi", "stream": stream},
              "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                       "stream": stream}}  # fmt: skip
    for route, body in bodies.items():
        r = client.post(route, json=body)
        assert r.status_code == status, (route, r.status_code, r.text)
        assert "the pool holds 64" in r.text, r.text
