"""Overlap scheduling (step N+1 prepared while step N runs) against the plain loop of the same engine.

The oracle is the engine with --disable-overlap-schedule: the same tokens for greedy and seeded sampling, with
chunked prompts, requests that stop on a stop token (the overlapped loop only learns of it one step late),
more requests than batch rows, and aborts while a step is in flight; every KV page is back when idle. On a GPU
(not in CI) the same with CUDA graphs, and a launch that makes no host sync.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pd.engine.io import GenerateRequest, SamplingParams
from pd.engine.llm import LLM
from tests.tiny_checkpoints import make_checkpoint


def _workload(seed: int, n: int = 10) -> tuple[list[list[int]], list[SamplingParams]]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (int(k),), generator=gen).tolist()
               for k in torch.randint(2, 70, (n,), generator=gen)]  # fmt: skip
    params = []
    for i in range(n):
        max_new = int(torch.randint(1, 24, (), generator=gen))
        if i % 3 == 0:
            params.append(SamplingParams(max_new_tokens=max_new, temperature=0.9, top_p=0.9, seed=1000 + i))
        else:
            params.append(SamplingParams(max_new_tokens=max_new, temperature=0.0))
    return prompts, params


def _engine(path: str, overlap: bool, device: str = "cpu", **kw: object) -> LLM:
    return LLM(path, device=device, dtype=torch.float32, page_size=4, chunked_prefill_size=32,
               max_running_requests=4, max_total_tokens=2048, overlap=overlap, **kw)  # fmt: skip


def _same_tokens(path: str, device: str, seed: int, **kw: object) -> None:
    prompts, params = _workload(seed)
    plain = _engine(path, False, device, **kw).generate(prompts, params)
    # Stop tokens taken from the plain run's middle tokens: those requests end early, and the overlapped loop
    # has already launched the step after the stop when it sees it.
    params = [dataclasses.replace(p, stop_token_ids=(out[len(out) // 2],)) if i % 2 and out else p
              for i, (p, out) in enumerate(zip(params, plain, strict=True))]  # fmt: skip
    runs, launched = {}, {}
    for overlap in (False, True):
        llm = _engine(path, overlap, device, **kw)
        assert llm.scheduler.overlap == overlap
        launched[overlap] = _count_launched_tokens(llm)
        runs[overlap] = llm.generate(prompts, params)
        sched = llm.scheduler
        assert sched.in_flight is None and sched.pool.num_free == sched.pool.num_pages
        del llm
    assert runs[True] == runs[False], f"seed {seed}"
    # The only extra work overlap may do: one token for each request that ended on a stop token.
    stopped = sum(1 for p, out in zip(params, runs[False], strict=True) if out and out[-1] in p.stop_token_ids)
    assert launched[False][0] <= launched[True][0] <= launched[False][0] + stopped


def _count_launched_tokens(llm: LLM) -> list[int]:
    count = [0]
    build = llm.runner.build_batch

    def counting(input_ids, *a, **k):  # noqa: ANN001, ANN002, ANN003
        count[0] += len(input_ids)
        return build(input_ids, *a, **k)

    llm.runner.build_batch = counting  # type: ignore[method-assign]
    return count


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_checkpoint("qwen3_moe", str(tmp_path_factory.mktemp("ckpt") / "qwen3_moe"),
                           seed=int(torch.randint(0, 2**31, ()).item()))  # fmt: skip


def test_overlapped_steps_give_the_plain_loops_tokens(checkpoint: str) -> None:
    _same_tokens(checkpoint, "cpu", seed=int(torch.randint(0, 2**31, ()).item()))


def test_abort_while_a_step_is_in_flight_ends_that_request_alone(checkpoint: str) -> None:
    prompts, params = _workload(int(torch.randint(0, 2**31, ()).item()), n=4)
    params = [dataclasses.replace(p, max_new_tokens=12) for p in params]
    expected = _engine(checkpoint, False).generate(prompts, params)
    llm = _engine(checkpoint, True)
    sched = llm.scheduler
    for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
        assert sched.add(GenerateRequest(f"r{i}", ids, p)) is None
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(4)}
    steps = 0
    while sched.has_work:
        for out in sched.step():
            got[out.rid].extend(out.new_token_ids)
        steps += 1
        if steps == 4:
            assert sched.in_flight is not None
            aborted = sched.abort("r1")
            assert aborted is not None and aborted.finish_reason == "abort"
    for i in (0, 2, 3):
        assert got[f"r{i}"] == expected[i]
    assert got["r1"] == expected[1][: len(got["r1"])] and len(got["r1"]) < 12
    assert sched.pool.num_free == sched.pool.num_pages and sched.slots.num_free_rows == 4


def test_a_failed_launch_returns_the_pages_of_the_step_in_flight(checkpoint: str) -> None:
    llm = _engine(checkpoint, True)
    sched = llm.scheduler
    sched.add(GenerateRequest("a", [1, 2, 3, 4, 5], SamplingParams(max_new_tokens=8, temperature=0.0)))
    sched.step()
    sched.step()
    assert sched.in_flight is not None
    sched.abort("a")  # its pages wait for the step in flight
    real = sched.runner.forward
    sched.add(GenerateRequest("b", [6, 7, 8], SamplingParams(max_new_tokens=2, temperature=0.0)))
    sched.runner.forward = lambda batch: (_ for _ in ()).throw(RuntimeError("forward failed"))  # type: ignore
    with pytest.raises(RuntimeError, match="forward failed"):
        sched.step()
    sched.runner.forward = real  # type: ignore[method-assign]
    sched.abort("b")
    assert sched.in_flight is None and sched.pool.num_free == sched.pool.num_pages


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_overlap_with_cuda_graphs_gives_the_plain_loops_tokens(arch: str, tmp_path, gpu_fp32_clean) -> None:
    path = make_checkpoint(arch, str(tmp_path / arch), seed=int(torch.randint(0, 2**31, ()).item()))
    _same_tokens(path, "cuda", seed=int(torch.randint(0, 2**31, ()).item()), cuda_graph_bs=(1, 2, 4))


@pytest.mark.gpu
def test_an_overlapped_launch_makes_no_host_sync(tmp_path) -> None:
    """Building, replaying and sampling a decode step (greedy and sampled rows) while the previous one runs."""
    path = make_checkpoint("qwen3_moe", str(tmp_path / "q"), seed=0)
    llm = LLM(path, device="cuda", dtype=torch.bfloat16, page_size=16, max_running_requests=8, max_total_tokens=4096)
    sched = llm.scheduler
    for i in range(6):
        p = SamplingParams(max_new_tokens=40, temperature=0.0 if i % 2 else 0.8, top_p=0.9, ignore_eos=True)
        sched.add(GenerateRequest(f"r{i}", list(range(3, 20 + i)), p))
    for _ in range(4):  # prompts in, decode running, graphs warm
        sched.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            launched = sched._launch()
            assert launched is not None and len(launched.reqs) == 6
            done, sched.in_flight = sched.in_flight, launched
            torch.cuda.set_sync_debug_mode("default")
            sched._collect(done)
            torch.cuda.set_sync_debug_mode("error")
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("overlap", [False, True])
def test_stream_interval_groups_tokens_and_keeps_them(checkpoint: str, overlap: bool) -> None:
    """A streaming request with stream_interval k: the first token alone, then messages of k tokens, the end with
    what is left; the same tokens as with interval 1 (the oracle), which reports every token alone."""
    prompts, params = _workload(int(torch.randint(0, 2**31, ())), n=6)
    llm = _engine(checkpoint, overlap)
    want = llm.generate(prompts, params)
    for k in (2, 5):
        for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
            assert llm.scheduler.add(GenerateRequest(f"s{k}-{i}", prompt, sp, stream_interval=k)) is None
        messages: dict[str, list[list[int]]] = {}
        while llm.scheduler.has_work:
            for out in llm.scheduler.step():
                messages.setdefault(out.rid, []).append(out.new_token_ids)
        for i, expected in enumerate(want):
            sizes = [len(m) for m in messages[f"s{k}-{i}"]]
            assert [t for m in messages[f"s{k}-{i}"] for t in m] == expected
            assert sizes[0] == 1 and all(s == k for s in sizes[1:-1]) and 1 <= sizes[-1] <= k, (k, sizes)
