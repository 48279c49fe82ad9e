"""A stub serving endpoint for `pd bench` tests: a FastAPI app in a uvicorn thread that streams tokens with known
delays on SGLang's /generate and OpenAI's /v1/completions and /v1/chat/completions, streamed or whole.

The stub is the oracle: it records every request's body, when it arrived, when it sent each event and when it
finished (time.perf_counter, the clock the client reads too, since both run in the test's process), what it
answered, and how many requests were in flight at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.server_process import free_port

VOCAB = 500


@dataclass
class Seen:
    """One request as the stub saw it. sent: perf_counter just before each event was handed to the server
    (the last one is data: [DONE]; one entry for a whole response); done: when the response ended."""

    path: str
    body: dict[str, Any]
    arrived: float
    sent: list[float] = field(default_factory=list)
    done: float | None = None
    answer: str = ""


@dataclass
class StubState:
    ttft_s: float = 0.04
    itl_s: float = 0.01
    tokens_per_chunk: int = 1
    fail_every: int = 0  # every k-th request answers HTTP 500
    error_event_every: int = 0  # every k-th request (not failed) sends an error event mid-stream
    continuous_usage: bool = True  # honour stream_options.continuous_usage_stats
    eos_after: int = 0  # without ignore_eos, stop after this many tokens (0: never)
    healthy: bool = True
    report_vocab: bool = True
    count: int = 0
    active: int = 0
    peak: int = 0
    arrivals: list[float] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    profiler: bool = True  # has /start_profile and /stop_profile (else they answer 404)
    profile_as_lb: bool = False  # answer the profile routes as pd lb does, for two instances behind it
    profile_calls: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)  # (path, body, when)


def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


def make_stub(state: StubState) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.healthy else 503)

    @app.get("/model_info")
    async def model_info() -> dict[str, Any]:
        return {"vocab_size": VOCAB} if state.report_vocab else {}

    async def admit(request: Request) -> tuple[int, Seen]:
        body = await request.json()
        seen = Seen(request.url.path, body, time.perf_counter())
        state.seen.append(seen)
        state.arrivals.append(seen.arrived)
        state.auth.append(request.headers.get("authorization", ""))
        state.count += 1
        return state.count, seen

    def well_formed(body: dict[str, Any], params: dict[str, Any]) -> bool:
        """Greedy; stream and ignore_eos, when sent, are booleans and ignore_eos is true."""
        return (
            params.get("temperature") == 0 and isinstance(body.get("stream", False), bool)
            and params.get("ignore_eos", True) is True
        )  # fmt: skip

    def length(max_tokens: int, params: dict[str, Any]) -> int:
        stops_early = state.eos_after and not params.get("ignore_eos", False)
        return min(max_tokens, state.eos_after) if stops_early else max_tokens

    def answer_of(k: int, sent: int) -> str:
        """The text of the first `sent` tokens of request k: distinct per request, one word per token."""
        return "".join(f"r{k}t{i} " for i in range(sent))

    async def tokens(seen: Seen, n: int, event: Callable[[int], str], k: int) -> AsyncIterator[str]:
        """First token after ttft_s, then chunks of `tokens_per_chunk` tokens, each token itl_s apart."""
        state.active += 1
        state.peak = max(state.peak, state.active)
        done = False
        try:
            await asyncio.sleep(state.ttft_s)
            sent = 1
            seen.sent.append(time.perf_counter())
            yield event(sent)
            if state.error_event_every and k % state.error_event_every == 0:
                yield _sse({"error": {"message": "stub failure", "code": 500}})
                return
            while sent < n:
                m = min(state.tokens_per_chunk, n - sent)
                await asyncio.sleep(m * state.itl_s)
                sent += m
                seen.sent.append(time.perf_counter())
                yield event(sent)
            seen.answer = answer_of(k, n)
            # Out of flight before [DONE], so a client freeing its slot on [DONE] never overlaps this request.
            state.active -= 1
            done = True
            seen.sent.append(time.perf_counter())
            yield "data: [DONE]\n\n"
        finally:
            seen.done = time.perf_counter()
            if not done:
                state.active -= 1

    async def whole(seen: Seen, n: int, k: int, body_of: Callable[[str], dict[str, Any]]) -> Response:
        state.active += 1
        state.peak = max(state.peak, state.active)
        await asyncio.sleep(state.ttft_s + (n - 1) * state.itl_s)
        seen.answer = answer_of(k, n)
        state.active -= 1
        seen.sent.append(time.perf_counter())
        seen.done = seen.sent[-1]
        return JSONResponse(body_of(seen.answer))

    def refusal(k: int, ok: bool) -> Response | None:
        if not ok:
            return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
        if state.fail_every and k % state.fail_every == 0:
            return JSONResponse({"error": {"message": "stub overloaded"}}, status_code=500)
        return None

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        k, seen = await admit(request)
        body = seen.body
        sp, ids = body["sampling_params"], body.get("input_ids")
        ok = well_formed(body, sp) and (isinstance(body.get("text"), str) or all(0 <= i < VOCAB for i in ids))
        if (refused := refusal(k, ok)) is not None:
            return refused
        n_prompt = len(ids) if ids is not None else len(body["text"].split())
        n = length(sp["max_new_tokens"], sp)

        def event(sent: int) -> dict[str, Any]:
            meta = {"completion_tokens": sent, "prompt_tokens": n_prompt, "finish_reason": None}
            return {"text": answer_of(k, sent), "output_ids": [7] * sent, "meta_info": meta}

        if not body.get("stream", False):
            return await whole(seen, n, k, lambda _: event(n))
        return StreamingResponse(tokens(seen, n, lambda s: _sse(event(s)), k), media_type="text/event-stream")

    def openai_route(chat: bool) -> Callable[[Request], Any]:
        async def route(request: Request) -> Response:
            k, seen = await admit(request)
            body = seen.body
            ok = well_formed(body, body) and (isinstance(body.get("messages"), list) if chat else "prompt" in body)
            if (refused := refusal(k, ok)) is not None:
                return refused
            n = length(body["max_tokens"], body)
            prompt_tokens = len(json.dumps(body["messages"] if chat else body["prompt"]).split())
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
            if not body.get("stream", False):

                def body_of(text: str) -> dict[str, Any]:
                    choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                    return {"choices": [{"index": 0, **choice, "finish_reason": "length"}], "usage": usage}

                return await whole(seen, n, k, body_of)
            options = body.get("stream_options") or {}
            continuous = state.continuous_usage and options.get("continuous_usage_stats", False)
            last = [0]

            def event(sent: int) -> str:
                new = answer_of(k, sent)[len(answer_of(k, last[0])) :]
                piece = {"delta": {"content": new}} if chat else {"text": new}
                last[0] = sent
                chunk: dict[str, Any] = {"choices": [{"index": 0, **piece}]}
                if continuous:
                    chunk["usage"] = {"completion_tokens": sent, "prompt_tokens": prompt_tokens}
                out = _sse(chunk)
                if chat and sent == 1:
                    # OpenAI streams open with a chunk that carries only the role.
                    out = _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}) + out
                if sent == n and options.get("include_usage"):
                    out += _sse({"choices": [], "usage": usage})
                return out

            return StreamingResponse(tokens(seen, n, event, k), media_type="text/event-stream")

        return route

    @app.post("/start_profile")
    @app.post("/stop_profile")
    async def profile(request: Request) -> Response:  # pd serve's answers; the trace named after the start's time
        if not state.profiler:
            return Response(status_code=404)
        state.profile_calls.append((request.url.path, await request.json(), time.perf_counter()))
        if request.url.path == "/start_profile":
            text = ["Start profiling.\n"] * 2
        else:
            text = [f"Stop profiling. This will take some time.\n/traces/{state.profile_calls[0][2]}-{i}.gz\n"
                    for i in range(2 if state.profile_as_lb else 1)]  # fmt: skip
        if state.profile_as_lb:
            workers = {"http://a": 200, "http://b": 200}
            answers = dict(zip(workers, [t.strip() for t in text], strict=True))
            return JSONResponse({"workers": workers, "answers": answers})
        return Response(text[0])

    app.post("/v1/completions")(openai_route(chat=False))
    app.post("/v1/chat/completions")(openai_route(chat=True))
    return app


@contextlib.contextmanager
def serve_stub() -> Iterator[tuple[str, StubState]]:
    """The stub on a free loopback port, in a daemon thread: yields (base URL, its state), then stops it."""
    import uvicorn

    state = StubState()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_stub(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the stub server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(5)


def reset(stub: tuple[str, StubState]) -> tuple[str, StubState]:
    """`stub` with its settings and records back to a fresh StubState's, for the next test."""
    state = stub[1]
    fresh = StubState()
    for name in fresh.__dataclass_fields__:
        setattr(state, name, getattr(fresh, name))
    return stub


def run_bench(url: str, tmp_path: Path, *flags: str) -> dict[str, Any]:
    """Run `pd bench` (the real CLI) against `url` with `flags`; returns its JSON report."""
    from launch.cli import main as cli_main

    path = tmp_path / "report.json"
    argv = ["bench", "--base-url", url, "--disable-progress", "--warmup-requests", "0", "--output-json", str(path),
            *flags]  # fmt: skip
    assert cli_main(argv) == 0
    return json.loads(path.read_text())
