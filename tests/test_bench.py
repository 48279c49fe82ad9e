"""`pd bench` against a stub server that streams tokens with known delays (a FastAPI app in a uvicorn thread).

The stub is the oracle for timing (its sleeps), token counts (what it was asked to generate), concurrency (it
counts requests in flight) and arrivals (it stamps each request); numpy is the oracle for percentiles.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from launch.cli import main as cli_main
from pd.bench.args import BenchArgs, BenchArgsError
from pd.bench.client import BenchClient, RequestOutput
from pd.bench.datasets import make_requests, random_text_requests, random_token_requests
from pd.bench.report import build_report, compute_metrics
from pd.bench.runner import arrival_offsets, run_requests
from tests.server_process import free_port

VOCAB = 500
# Scheduling noise allowed on top of the stub's sleeps; generous because CI machines are shared.
SLACK_S = 0.03


@dataclass
class StubState:
    ttft_s: float = 0.04
    itl_s: float = 0.01
    tokens_per_chunk: int = 1
    fail_every: int = 0  # every k-th request answers HTTP 500
    error_event_every: int = 0  # every k-th request (not failed) sends an error event mid-stream
    continuous_usage: bool = True  # honour stream_options.continuous_usage_stats
    healthy: bool = True
    report_vocab: bool = True
    count: int = 0
    active: int = 0
    peak: int = 0
    arrivals: list[float] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)


def make_stub(state: StubState) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.healthy else 503)

    @app.get("/model_info")
    async def model_info() -> dict[str, Any]:
        return {"vocab_size": VOCAB} if state.report_vocab else {}

    def admit(request: Request) -> int:
        state.arrivals.append(time.perf_counter())
        state.auth.append(request.headers.get("authorization", ""))
        state.count += 1
        return state.count

    async def tokens(n: int, event: Any, k: int) -> AsyncIterator[str]:
        """First token after ttft_s, then chunks of `tokens_per_chunk` tokens, each token itl_s apart."""
        state.active += 1
        state.peak = max(state.peak, state.active)
        done = False
        try:
            await asyncio.sleep(state.ttft_s)
            sent = 1
            yield event(sent)
            if state.error_event_every and k % state.error_event_every == 0:
                yield "data: " + json.dumps({"error": {"message": "stub failure", "code": 500}}) + "\n\n"
                return
            while sent < n:
                m = min(state.tokens_per_chunk, n - sent)
                await asyncio.sleep(m * state.itl_s)
                sent += m
                yield event(sent)
            # Out of flight before [DONE], so a client freeing its slot on [DONE] never overlaps this request.
            state.active -= 1
            done = True
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                state.active -= 1

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await request.json()
        k = admit(request)
        sp = body["sampling_params"]
        ids = body.get("input_ids")
        well_formed = (
            body.get("stream") is True and sp["temperature"] == 0 and sp["ignore_eos"] is True
            and (isinstance(body.get("text"), str) or all(0 <= i < VOCAB for i in ids))
        )  # fmt: skip
        if not well_formed:
            return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
        if state.fail_every and k % state.fail_every == 0:
            return JSONResponse({"error": {"message": "stub overloaded"}}, status_code=500)
        n_prompt = len(ids) if ids is not None else len(body["text"].split())

        def event(sent: int) -> str:
            meta = {"completion_tokens": sent, "prompt_tokens": n_prompt, "finish_reason": None}
            return "data: " + json.dumps({"text": "x" * sent, "output_ids": [7] * sent, "meta_info": meta}) + "\n\n"

        return StreamingResponse(tokens(sp["max_new_tokens"], event, k), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        k = admit(request)
        if not (body.get("stream") is True and body["temperature"] == 0 and body["ignore_eos"] is True):
            return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
        continuous = state.continuous_usage and body["stream_options"]["continuous_usage_stats"]
        n = body["max_tokens"]
        last = [0]

        def event(sent: int) -> str:
            chunk: dict[str, Any] = {"choices": [{"index": 0, "text": "y" * (sent - last[0])}]}
            last[0] = sent
            if continuous:
                chunk["usage"] = {"completion_tokens": sent, "prompt_tokens": 3}
            out = "data: " + json.dumps(chunk) + "\n\n"
            if sent == n and body["stream_options"]["include_usage"]:
                out += "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": n}}) + "\n\n"
            return out

        return StreamingResponse(tokens(n, event, k), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stub_server() -> Iterator[tuple[str, StubState]]:
    import uvicorn

    state = StubState()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_stub(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the stub server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(5)


@pytest.fixture
def stub(stub_server: tuple[str, StubState]) -> tuple[str, StubState]:
    """The module's stub with its settings and counters reset for this test."""
    url, state = stub_server
    fresh = StubState()
    for name in fresh.__dataclass_fields__:
        setattr(state, name, getattr(fresh, name))
    return url, state


def _run(url: str, backend: str, requests: list, **kw: Any) -> list[RequestOutput]:
    async def go() -> list[RequestOutput]:
        async with BenchClient(url, backend) as client:
            return (await run_requests(client, requests, **kw)).outputs

    return asyncio.run(go())


def test_datasets_lengths_within_ranges_ids_within_vocab_and_seeded() -> None:
    reqs = random_token_requests(200, (3, 9), (2, 5), vocab_size=50, seed=11)
    ids = np.concatenate([r.prompt for r in reqs])
    assert all(len(r.prompt) == r.prompt_len and 3 <= r.prompt_len <= 9 and 2 <= r.output_len <= 5 for r in reqs)
    assert ids.min() >= 0 and ids.max() < 50 and len(np.unique(ids)) == 50
    assert {r.prompt_len for r in reqs} == set(range(3, 10)) and {r.output_len for r in reqs} == set(range(2, 6))
    assert reqs == random_token_requests(200, (3, 9), (2, 5), vocab_size=50, seed=11)
    assert reqs != random_token_requests(200, (3, 9), (2, 5), vocab_size=50, seed=12)
    texts = random_text_requests(50, (4, 6), (1, 1), seed=3)
    assert all(len(r.prompt.split()) == r.prompt_len for r in texts)
    with pytest.raises(ValueError, match="input_len_range"):
        make_requests("random-ids", 3, (5, 2), (1, 1), 0, vocab_size=10)


@pytest.mark.parametrize("backend,tokens_per_chunk", [("native", 1), ("native", 3), ("openai", 2)])
def test_ttft_itl_e2e_match_stub_delays(stub: tuple[str, StubState], backend: str, tokens_per_chunk: int) -> None:
    url, state = stub
    state.tokens_per_chunk = tokens_per_chunk
    reqs = random_token_requests(3, (4, 8), (6, 9), VOCAB, seed=5)
    outs = _run(url, backend, reqs, max_concurrency=1)
    for out, req in zip(outs, reqs, strict=True):
        assert out.success, out.error
        assert out.output_tokens == req.output_len
        # Several tokens per chunk are spread evenly: one ITL per token after the first, each ~ itl_s.
        assert len(out.itl) == req.output_len - 1
        assert state.ttft_s - 0.002 <= out.ttft <= state.ttft_s + SLACK_S
        # Median, not min: on a loaded machine the client may read two chunks late and back to back.
        assert state.itl_s - 0.002 <= np.median(out.itl) <= state.itl_s + SLACK_S / 3
        expected_e2e = state.ttft_s + (req.output_len - 1) * state.itl_s
        assert expected_e2e - 0.002 <= out.latency <= expected_e2e + SLACK_S * 2
        assert math.isclose(sum(out.itl), out.latency - out.ttft, abs_tol=0.01)


def test_openai_without_per_chunk_usage_counts_chunks_and_takes_total_from_usage(stub: tuple[str, StubState]) -> None:
    url, state = stub
    state.tokens_per_chunk, state.continuous_usage = 3, False
    reqs = random_token_requests(2, (4, 4), (7, 7), VOCAB, seed=1)
    for out in _run(url, "openai", reqs):
        assert out.success and out.output_tokens == 7
        assert len(out.itl) == 2  # chunks of 1, 3, 3 tokens: one ITL per chunk after the first
        assert min(out.itl) >= 3 * state.itl_s - 0.002


def test_percentiles_and_throughput_match_numpy_on_recorded_lists() -> None:
    rng = np.random.default_rng()
    outs = []
    for i in range(40):
        n = int(rng.integers(1, 30))
        outs.append(RequestOutput(prompt_len=int(rng.integers(1, 100)), success=i % 7 != 3, ttft=float(rng.random()),
                                  itl=rng.random(n - 1).tolist(), latency=float(1 + rng.random()), output_tokens=n,
                                  error="" if i % 7 != 3 else "boom"))  # fmt: skip
    duration = 3.7
    m = compute_metrics(outs, duration)
    ok = [o for o in outs if o.success]
    assert m["completed"] == len(ok) and m["failed"] == len(outs) - len(ok)
    for key, values in (("ttft_ms", [o.ttft for o in ok]), ("e2e_ms", [o.latency for o in ok]),
                        ("itl_ms", [x for o in ok for x in o.itl])):  # fmt: skip
        for p in (50, 90, 99):
            assert m[key][f"p{p}"] == pytest.approx(np.percentile(np.array(values) * 1000, p))
        assert m[key]["mean"] == pytest.approx(np.mean(values) * 1000)
    assert m["request_throughput"] == pytest.approx(len(ok) / duration)
    assert m["output_token_throughput"] == pytest.approx(sum(o.output_tokens for o in ok) / duration)
    assert compute_metrics([RequestOutput(prompt_len=1, error="x")], 1.0)["ttft_ms"]["p99"] is None


def test_poisson_arrivals_have_the_requested_mean_interval_and_the_run_follows_them(
    stub: tuple[str, StubState],
) -> None:
    rate = 40.0
    gaps = np.diff(arrival_offsets(20000, rate, seed=7))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03) and gaps.std() == pytest.approx(1 / rate, rel=0.05)
    assert np.array_equal(arrival_offsets(50, rate, 7), arrival_offsets(50, rate, 7))
    assert not np.array_equal(arrival_offsets(50, rate, 7), arrival_offsets(50, rate, 8))
    assert not arrival_offsets(5, math.inf, 7).any()

    url, state = stub
    state.ttft_s, state.itl_s = 0.005, 0.002
    reqs = random_token_requests(40, (2, 4), (2, 3), VOCAB, seed=2)

    async def go() -> np.ndarray:
        async with BenchClient(url) as client:
            return (await run_requests(client, reqs, request_rate=rate, seed=3)).arrival_s

    released = asyncio.run(go())
    scheduled = arrival_offsets(40, rate, seed=3)
    assert np.all(released >= scheduled - 0.001) and np.all(released <= scheduled + SLACK_S)
    seen = np.diff(np.sort(state.arrivals))  # intervals between arrivals at the server
    assert seen.mean() == pytest.approx(np.diff(scheduled).mean(), rel=0.1)


def test_max_concurrency_bounds_requests_in_flight_at_the_server(stub: tuple[str, StubState]) -> None:
    url, state = stub
    reqs = random_token_requests(12, (2, 4), (3, 3), VOCAB, seed=4)
    assert all(o.success for o in _run(url, "native", reqs, max_concurrency=3))
    assert state.peak == 3
    state.peak = 0
    _run(url, "native", reqs)  # no limit: the stub would see more than 3 at once
    assert state.peak > 3


def test_http_errors_error_events_and_unreachable_servers_are_counted(stub: tuple[str, StubState]) -> None:
    url, state = stub
    state.fail_every, state.error_event_every = 3, 4
    reqs = random_token_requests(12, (2, 4), (3, 3), VOCAB, seed=6)
    outs = _run(url, "native", reqs, max_concurrency=4)
    report = build_report({}, outs, 1.0)
    # Requests 3, 6, 9, 12 answer 500; 4 and 8 break mid-stream.
    assert report["metrics"]["failed"] == 6 and report["metrics"]["completed"] == 6
    errors = report["errors"]
    assert sum(c for e, c in errors.items() if e.startswith("HTTP 500")) == 4
    assert sum(c for e, c in errors.items() if e.startswith("error event")) == 2
    dead = _run(f"http://127.0.0.1:{free_port()}", "native", reqs[:2])
    assert not any(o.success for o in dead) and all("ConnectError" in o.error for o in dead)


def test_cli_end_to_end_writes_the_json_report(stub: tuple[str, StubState], tmp_path: Any, capsys: Any) -> None:
    url, state = stub
    path = tmp_path / "out.json"
    argv = ["bench", "--base-url", url, "--num-prompts", "6", "--request-rate", "200", "--max-concurrency", "2",
            "--input-len-range", "4", "8", "--output-len-range", "3", "5", "--seed", "9", "--backend", "native",
            "--output-json", str(path), "--disable-progress", "--api-key", "sekret",
            "--warmup-requests", "2"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    report = json.loads(path.read_text())
    assert set(report) == {"schema_version", "config", "metrics", "errors", "requests"}
    expected = make_requests("random-ids", 6, (4, 8), (3, 5), 9, vocab_size=VOCAB)
    assert report["config"]["vocab_size"] == VOCAB and "api_key" not in report["config"]
    assert report["config"]["request_rate"] == 200 and report["config"]["max_concurrency"] == 2
    m = report["metrics"]
    assert m["completed"] == 6 and m["failed"] == 0 and report["errors"] == {}
    assert m["total_output_tokens"] == sum(r.output_len for r in expected)
    assert m["total_input_tokens"] == sum(r.prompt_len for r in expected)
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        assert set(m[key]) == {"mean", "std", "p50", "p90", "p99"} and m[key]["p50"] > 0
    assert [r["output_tokens"] for r in report["requests"]] == [r.output_len for r in expected]
    assert state.count == 8 and set(state.auth) == {"Bearer sekret"} and state.peak <= 2

    argv = ["bench", "--base-url", url, "--num-prompts", "3", "--backend", "openai", "--dataset", "random-text",
            "--output-len-range", "2", "2", "--input-len-range", "3", "3", "--disable-progress"]  # fmt: skip
    assert cli_main(argv) == 0


def test_cli_reports_unreachable_unhealthy_failing_servers_and_bad_flags(
    stub: tuple[str, StubState], capsys: Any
) -> None:
    url, state = stub
    base = ["bench", "--num-prompts", "2", "--disable-progress", "--output-len-range", "2", "2"]
    assert cli_main([*base, "--base-url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "cannot reach the server" in capsys.readouterr().err
    state.healthy = False
    assert cli_main([*base, "--base-url", url]) == 1
    assert "not healthy" in capsys.readouterr().err
    state.healthy, state.fail_every = True, 1
    assert cli_main([*base, "--base-url", url]) == 1
    err = capsys.readouterr().err
    assert "warm-up requests failed" in err and "HTTP 500" in err
    state.fail_every, state.report_vocab = 0, False
    assert cli_main([*base, "--base-url", url]) == 1
    assert "--vocab-size" in capsys.readouterr().err
    for bad, message in ((["--num-prompts", "0"], "--num-prompts"), (["--request-rate", "fast"], "--request-rate"),
                         (["--max-concurrency", "0"], "--max-concurrency"), (["--base-url", "localhost:1"], "http://"),
                         (["--output-len-range", "4", "2"], "--output-len-range")):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            cli_main(["bench", "--base-url", url, *bad])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(BenchArgsError, match="--warmup-requests"):
        BenchArgs(base_url=url, warmup_requests=-1)
