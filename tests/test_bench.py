"""`pd bench` against a stub server that streams tokens with known delays (tests/bench_stub.py).

The stub is the oracle for timing (when it sent each event: a client cannot see a token before it was sent),
token counts (what it was asked to generate), concurrency (it counts requests in flight) and arrivals (it stamps
each request); numpy is the oracle for percentiles. Timing checks are orderings between the stub's records and
the client's, which hold however loaded the machine is; none bounds a latency by the clock.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from launch.cli import main as cli_main
from pd.bench.args import BenchArgs, BenchArgsError
from pd.bench.client import BenchClient, RequestOutput, sse_lines
from pd.bench.datasets import make_requests, random_text_requests, random_token_requests
from pd.bench.report import build_report, compute_metrics
from pd.bench.runner import RunResult, arrival_offsets, run_requests
from tests.bench_stub import VOCAB, Seen, StubState, reset, serve_stub
from tests.server_process import free_port

# The JSON fields of the first report format.
OLD_CONFIG_FIELDS = {"base_url", "num_prompts", "request_rate", "max_concurrency", "input_len_range",
                     "output_len_range", "seed", "backend", "dataset", "vocab_size", "model", "warmup_requests",
                     "output_json", "disable_progress", "timeout_s"}  # fmt: skip
OLD_METRICS_FIELDS = {"completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
                      "request_throughput", "input_token_throughput", "output_token_throughput",
                      "total_token_throughput", "mean_concurrency", "ttft_ms", "itl_ms", "tpot_ms",
                      "e2e_ms"}  # fmt: skip
OLD_REQUEST_FIELDS = {"prompt_len", "success", "ttft", "latency", "output_tokens", "error"}


@pytest.fixture(scope="module")
def stub_server() -> Iterator[tuple[str, StubState]]:
    with serve_stub() as stub:
        yield stub


@pytest.fixture
def stub(stub_server: tuple[str, StubState]) -> tuple[str, StubState]:
    return reset(stub_server)


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


def _check_against_send_times(out: RequestOutput, seen: Seen, counts: list[int]) -> bool:
    """The client's timing of one stream against the stub's record of it; returns whether the client read the
    first token before the stub sent the last one.

    counts: the cumulative token count the client credits after each token-carrying event. The client's own
    numbers say when it read each event: the first at start + TTFT, each later one where the ITLs of its tokens
    add up. No event can be read before the stub sent it.
    """
    assert len(out.itl) == counts[-1] - 1
    token_times = out.start_time + out.ttft + np.concatenate(([0.0], np.cumsum(out.itl)))
    read = token_times[np.array(counts) - 1]
    sent = np.array(seen.sent[:-1])  # the last entry is data: [DONE]
    assert out.start_time <= seen.arrived <= sent[0] and len(read) == len(sent)
    assert np.all(read >= sent)
    # The stream ends after [DONE] was sent, and after the last token was read.
    assert out.start_time + out.latency >= max(seen.sent[-1], read[-1])
    # An event of k tokens gives each of them the same ITL: its gap / k.
    for lo, hi in zip(counts[:-1], counts[1:], strict=True):
        assert np.ptp(out.itl[lo - 1 : hi - 1]) <= 1e-9
    return bool(read[0] < sent[-1])


@pytest.mark.parametrize("backend,tokens_per_chunk", [("native", 1), ("native", 3), ("openai", 2)])
def test_ttft_and_itls_place_every_event_after_the_stub_sent_it(
    stub: tuple[str, StubState], backend: str, tokens_per_chunk: int
) -> None:
    url, state = stub
    state.tokens_per_chunk = tokens_per_chunk
    reqs = random_token_requests(3, (4, 8), (6, 9), VOCAB, seed=5)
    outs = _run(url, backend, reqs, max_concurrency=1)
    assert len(state.seen) == len(reqs)  # one at a time: the stub's log is in request order
    streamed = []
    for out, req, seen in zip(outs, reqs, state.seen, strict=True):
        assert out.success, out.error
        assert out.output_tokens == req.output_len
        # The stub sends 1 token, then chunks of tokens_per_chunk (the last one shorter).
        counts = [1, *range(1 + tokens_per_chunk, req.output_len, tokens_per_chunk), req.output_len]
        streamed.append(_check_against_send_times(out, seen, sorted(set(counts))))
    # A client that read whole responses before timing them would never see a token before the last was sent; a
    # streaming one does, unless the machine stalls it through every one of the streams.
    assert any(streamed)


def test_openai_without_per_chunk_usage_counts_chunks_and_takes_total_from_usage(stub: tuple[str, StubState]) -> None:
    url, state = stub
    state.tokens_per_chunk, state.continuous_usage = 3, False
    reqs = random_token_requests(2, (4, 4), (7, 7), VOCAB, seed=1)
    outs = _run(url, "openai", reqs, max_concurrency=1)
    for out, seen in zip(outs, state.seen, strict=True):
        assert out.success and out.output_tokens == 7
        # Chunks of 1, 3, 3 tokens, each counted as one when it arrives; the final usage chunk fixes the total.
        assert len(out.itl) == 2
        token_times = out.start_time + out.ttft + np.concatenate(([0.0], np.cumsum(out.itl)))
        assert np.all(token_times >= np.array(seen.sent[:-1]))


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

    async def go() -> RunResult:
        async with BenchClient(url) as client:
            return await run_requests(client, reqs, request_rate=rate, seed=3)

    result = asyncio.run(go())
    scheduled = result.start_time + arrival_offsets(40, rate, seed=3)
    released = result.start_time + result.arrival_s
    # Never released before its time (the event loop may wake a timer up to its clock resolution early); sent
    # once released, and at the stub after it was sent.
    assert np.all(released >= scheduled - 0.001)
    seen = {tuple(s.body["input_ids"]): s for s in state.seen}
    done = [seen[tuple(req.prompt)].done for req in reqs]
    for req, out, release in zip(reqs, result.outputs, released, strict=True):
        assert release <= out.start_time <= seen[tuple(req.prompt)].arrived
    # Open loop: the schedule has gaps shorter than the stub's answers, so some request is released while the
    # one before it is still in flight; a runner that waited for answers before releasing never does that.
    assert np.sum(np.diff(scheduled) < state.ttft_s) >= 5
    assert any(nxt < prev_done for nxt, prev_done in zip(released[1:], done[:-1], strict=True))


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
    # The fields earlier versions wrote stay (readers of old reports keep working); new ones only add.
    assert OLD_CONFIG_FIELDS <= set(report["config"]) and OLD_METRICS_FIELDS <= set(m)
    assert all(OLD_REQUEST_FIELDS <= set(r) for r in report["requests"])
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        assert {"mean", "std", "p50", "p90", "p99"} <= set(m[key]) and m[key]["p50"] > 0
        assert "p95" in m[key]  # reported by default since p95 is what SLOs are often written against
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


def test_profile_covers_the_timed_run_and_not_the_warm_up(stub: tuple[str, StubState], tmp_path: Any,
                                                          capsys: Any) -> None:  # fmt: skip
    url, state = stub
    path = tmp_path / "out.json"
    argv = ["bench", "--base-url", url, "--num-prompts", "5", "--max-concurrency", "2", "--output-len-range", "2", "4",
            "--warmup-requests", "3", "--disable-progress", "--output-json", str(path), "--profile",
            "--profile-output-dir", str(tmp_path / "traces")]  # fmt: skip
    assert cli_main(argv) == 0
    (start, body, started), (stop, _, stopped) = state.profile_calls
    assert (start, stop) == ("/start_profile", "/stop_profile") and body == {"output_dir": str(tmp_path / "traces")}
    warmup, timed = state.seen[:3], state.seen[3:]
    assert len(timed) == 5 and all(s.done is not None and s.done <= started for s in warmup)
    assert all(started <= s.arrived and s.done is not None and s.done <= stopped for s in timed)
    report = json.loads(path.read_text())
    assert report["profile_traces"] == [f"/traces/{started}-0.gz"] and report["config"]["profile"] is True
    assert f"profile trace: /traces/{started}-0.gz" in capsys.readouterr().out
    # Through pd lb: every instance's traces, from the balancer's JSON answer.
    reset(stub)
    state.profile_as_lb = True
    assert cli_main(argv) == 0
    started = state.profile_calls[0][2]
    assert json.loads(path.read_text())["profile_traces"] == [f"/traces/{started}-{i}.gz" for i in range(2)]
    # A server without a profiler: the run stops before its timed part, saying why.
    reset(stub)
    state.profiler = False
    assert cli_main([*argv[:-3], "--profile"]) == 1
    assert "POST /start_profile answered 404" in capsys.readouterr().err and len(state.seen) == 3  # the warm-up only


def test_sse_lines_split_where_sse_ends_lines_whatever_the_chunks() -> None:
    """sse_lines against SSE's rule applied to the whole body (a line ends at LF, CR LF or CR), on fresh random bodies
    cut into random chunks (a CR LF or a UTF-8 character may straddle two): the same lines, and U+2028, U+2029 and
    U+0085 inside an event stay in it (httpx's aiter_lines splits there)."""

    class Body:
        def __init__(self, chunks: list[bytes]) -> None:
            self.chunks = chunks

        async def aiter_bytes(self) -> Any:
            for chunk in self.chunks:
                yield chunk

    async def lines(chunks: list[bytes]) -> list[str]:
        return [line async for line in sse_lines(Body(chunks))]  # type: ignore[arg-type]

    rng = random.Random()
    pieces = ['data: {"text": "a\u2028b\x85"}', "", "x", "\u00e9\u2029世", "data: [DONE]"]
    for _ in range(2000):
        parts = [rng.choice(pieces) + rng.choice(["\n", "\r\n", "\r", ""]) for _ in range(rng.randint(0, 6))]
        body = "".join(parts).encode()
        cuts = sorted(rng.sample(range(len(body) + 1), min(len(body) + 1, rng.randint(0, 5))))
        chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        want = [line.decode() for line in body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")]
        if want[-1] == "":  # the body ended with a line's end, not a line
            want.pop()
        assert asyncio.run(lines(chunks)) == want, (body, chunks)
