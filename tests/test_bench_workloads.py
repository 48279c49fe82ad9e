"""`pd bench` workloads through the CLI against the stub server (tests/bench_stub.py): the chat backend, the
python-docs and multi-turn datasets, gamma (bursty) arrivals, and requests without streaming or ignore_eos.

Oracles: the stub's record of what it received, sent and answered; CPython's own pydoc text for the real-text
dataset; the gamma distribution's mean, coefficient of variation and (for shape 2) closed-form CDF for arrivals.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pd.bench.client import BenchClient, RequestOutput
from pd.bench.conversations import converse, multi_turn_conversations
from pd.bench.datasets import BenchRequest, make_requests
from pd.bench.runner import arrival_offsets, run_requests
from tests.bench_stub import StubState, reset, run_bench, serve_stub


@pytest.fixture(scope="module")
def stub_server() -> Iterator[tuple[str, StubState]]:
    with serve_stub() as stub:
        yield stub


@pytest.fixture
def stub(stub_server: tuple[str, StubState]) -> tuple[str, StubState]:
    url, state = reset(stub_server)
    state.ttft_s, state.itl_s = 0.005, 0.002
    return url, state


def bench(url: str, tmp_path: Path, *flags: str) -> dict[str, Any]:
    """Run `pd bench` on the stub with `flags`; returns its JSON report."""
    return run_bench(url, tmp_path, *flags)


def test_chat_backend_sends_one_user_message_and_counts_the_streamed_deltas(
    stub: tuple[str, StubState], tmp_path: Path
) -> None:
    url, state = stub
    flags = ["--backend", "chat", "--dataset", "random-text", "--num-prompts", "4", "--max-concurrency", "1",
             "--input-len-range", "3", "6", "--output-len-range", "3", "6", "--seed", "2"]  # fmt: skip
    report = bench(url, tmp_path, *flags)
    dataset = make_requests("random-text", 4, (3, 6), (3, 6), 2)
    assert [s.path for s in state.seen] == ["/v1/chat/completions"] * 4
    for seen, req, entry in zip(state.seen, dataset, report["requests"], strict=True):
        assert seen.body["messages"] == [{"role": "user", "content": req.prompt}]
        assert seen.body["max_tokens"] == req.output_len and seen.body["stream"] is True
        assert seen.body["ignore_eos"] is True and seen.body["stream_options"]["include_usage"] is True
        assert entry["success"] and entry["output_tokens"] == req.output_len
        # The stub's prompt_tokens (usage) replace the dataset's word count.
        assert entry["prompt_len"] == len(json.dumps(seen.body["messages"]).split())
    assert report["metrics"]["completed"] == 4 and report["metrics"]["tpot_ms"]["p50"] > 0

    # Without per-chunk usage every chunk with content is one token; the opening role-only chunk is none.
    state.continuous_usage = False

    async def go() -> list[RequestOutput]:
        async with BenchClient(url, "chat") as client:
            return (await run_requests(client, dataset, max_concurrency=1)).outputs

    for out, req, seen in zip(asyncio.run(go()), dataset, state.seen[4:], strict=True):
        assert out.success and out.output_tokens == req.output_len and len(out.itl) == req.output_len - 1
        assert out.generated_text == seen.answer


def test_python_docs_prompts_are_passages_of_the_interpreters_own_documentation(
    stub: tuple[str, StubState], tmp_path: Path
) -> None:
    from pydoc_data.topics import topics

    docs = " ".join(topics.values()).split()
    docs_bigrams = set(zip(docs[:-1], docs[1:], strict=True))

    def bigrams_in_docs(text: str) -> float:
        words = text.split()
        return float(np.mean([pair in docs_bigrams for pair in zip(words[:-1], words[1:], strict=True)]))

    url, state = stub
    report = bench(url, tmp_path, "--backend", "openai", "--dataset", "python-docs", "--num-prompts", "5",
                   "--input-len-range", "20", "60", "--output-len-range", "2", "2")  # fmt: skip
    prompts = [s.body["prompt"] for s in state.seen]
    assert len(prompts) == 5 and len(set(prompts)) == 5 and report["metrics"]["completed"] == 5
    assert report["config"]["corpus"].startswith("pydoc_data.topics (Python ")
    for prompt in prompts:
        assert 20 <= len(prompt.split()) <= 60
        # Runs of real prose: nearly every pair of adjacent words is adjacent somewhere in the docs (a passage
        # joins paragraphs, and code samples are left out, so a few pairs straddle a cut).
        assert bigrams_in_docs(prompt) >= 0.9
    # The check tells real text from the random-words dataset.
    assert all(bigrams_in_docs(r.prompt) < 0.5 for r in make_requests("random-text", 5, (20, 60), (2, 2), 0))


def test_multi_turn_sends_each_turn_with_the_history_and_the_answers_the_server_gave(
    stub: tuple[str, StubState], tmp_path: Path
) -> None:
    url, state = stub
    report = bench(url, tmp_path, "--backend", "chat", "--dataset", "multi-turn", "--num-prompts", "3",
                   "--num-turns", "3", "--max-concurrency", "2", "--input-len-range", "5", "9",
                   "--output-len-range", "2", "4", "--seed", "4")  # fmt: skip
    conversations = multi_turn_conversations(3, 3, (5, 9), (2, 4), 4)
    assert len(state.seen) == 9 and report["metrics"]["completed"] == 9 and len(report["requests"]) == 9
    for c, conversation in enumerate(conversations):
        turns = [s for s in state.seen if s.body["messages"][0]["content"] == conversation.user_turns[0]]
        assert len(turns) == 3
        for t, seen in enumerate(turns):
            messages = seen.body["messages"]
            assert [m["role"] for m in messages] == ["user", "assistant"] * t + ["user"]
            assert messages[-1]["content"] == conversation.user_turns[t]
            assert seen.body["max_tokens"] == conversation.output_lens[t]
            if t:
                before = turns[t - 1]
                # The previous turn's messages, then the answer the stub gave to it.
                assert messages[:-1] == [*before.body["messages"], {"role": "assistant", "content": before.answer}]
                assert seen.arrived >= before.done  # sent once that answer was complete
            # Report order: conversation by conversation, turn by turn; prompt sizes are the stub's counts.
            entry = report["requests"][3 * c + t]
            assert entry["prompt_len"] == len(json.dumps(messages).split())
            assert entry["output_tokens"] == conversation.output_lens[t]


def test_a_failed_turn_ends_its_conversation_and_the_rest_count_as_failed() -> None:
    conversation = multi_turn_conversations(1, 4, (3, 3), (2, 2), 0)[0]
    sent: list[BenchRequest] = []

    async def send(req: BenchRequest) -> RequestOutput:
        sent.append(req)
        ok = len(sent) < 2
        return RequestOutput(prompt_len=3, success=ok, output_tokens=2, generated_text="a b", error="" if ok else "x")

    outputs = asyncio.run(converse(conversation, send))
    assert len(sent) == 2 and [o.success for o in outputs] == [True, False, False, False]
    assert outputs[2].error == outputs[3].error == "an earlier turn of its conversation failed"


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 2.0, 4.0])
def test_arrival_gaps_have_the_gamma_mean_and_spread(burstiness: float) -> None:
    rate = 8.0
    gaps = np.diff(arrival_offsets(40001, rate, seed=5, burstiness=burstiness))
    # Gamma(shape k, scale 1 / (rate k)): mean 1 / rate, coefficient of variation 1 / sqrt(k).
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.03)
    if burstiness == 2.0:
        # Shape 2 has a closed-form CDF: P(gap <= t) = 1 - exp(-x) (1 + x), x = t * rate * 2.
        for t in (0.02, 0.06, 0.125, 0.25):
            x = t * rate * 2
            assert np.mean(gaps <= t) == pytest.approx(1 - math.exp(-x) * (1 + x), abs=0.01)


def test_bursty_request_rate_sends_on_the_gamma_schedule(stub: tuple[str, StubState], tmp_path: Path) -> None:
    url, state = stub
    rate, burstiness, seed, n = 20.0, 0.25, 1, 16
    scheduled = arrival_offsets(n, rate, seed, burstiness)
    # With this seed some request's Poisson time comes well before its bursty one, so a run that ignored
    # --burstiness would send it too early and fail the check below.
    assert np.max(scheduled - arrival_offsets(n, rate, seed)) > 0.1
    report = bench(url, tmp_path, "--request-rate", str(rate), "--burstiness", str(burstiness), "--seed", str(seed),
                   "--num-prompts", str(n), "--input-len-range", "2", "3", "--output-len-range", "2", "2")  # fmt: skip
    assert report["config"]["burstiness"] == burstiness and report["metrics"]["completed"] == n
    sent_at = np.array([r["sent_at_s"] for r in report["requests"]])
    assert np.all(sent_at >= scheduled - 0.001)


@pytest.mark.parametrize("backend", ["native", "openai", "chat"])
def test_disable_stream_asks_for_whole_responses_and_times_them_as_one_event(
    stub: tuple[str, StubState], tmp_path: Path, backend: str
) -> None:
    url, state = stub
    report = bench(url, tmp_path, "--backend", backend, "--dataset", "random-text", "--disable-stream",
                   "--num-prompts", "3", "--input-len-range", "2", "4", "--output-len-range", "3", "6")  # fmt: skip
    dataset = make_requests("random-text", 3, (2, 4), (3, 6), 0)
    for seen, req, entry in zip(state.seen, dataset, report["requests"], strict=True):
        assert seen.body["stream"] is False and "stream_options" not in seen.body
        assert entry["success"] and entry["output_tokens"] == req.output_len
        # The first token arrives with the last: no sooner than the stub's whole generation time.
        assert entry["ttft"] >= state.ttft_s + (req.output_len - 1) * state.itl_s - 0.001
        assert entry["ttft"] <= entry["latency"]


@pytest.mark.parametrize("backend", ["native", "openai", "chat"])
def test_disable_ignore_eos_leaves_the_field_out_and_outputs_stop_at_eos(
    stub: tuple[str, StubState], tmp_path: Path, backend: str
) -> None:
    url, state = stub
    state.eos_after = 2
    flags = ["--backend", backend, "--dataset", "random-text", "--num-prompts", "2", "--output-len-range", "5", "5",
             "--input-len-range", "2", "2"]  # fmt: skip
    stopped = bench(url, tmp_path, *flags, "--disable-ignore-eos")
    full = bench(url, tmp_path, *flags)
    bodies = [s.body.get("sampling_params", s.body) for s in state.seen]
    assert all("ignore_eos" not in b for b in bodies[:2]) and all(b["ignore_eos"] is True for b in bodies[2:])
    assert [r["output_tokens"] for r in stopped["requests"]] == [2, 2]
    assert [r["output_tokens"] for r in full["requests"]] == [5, 5]
    assert stopped["config"]["disable_ignore_eos"] is True and full["config"]["disable_ignore_eos"] is False
