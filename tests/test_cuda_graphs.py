"""Decode batches replayed from CUDA graphs against the same engine run eagerly (not run in CI: needs a GPU).

The oracle is the eager forward of the same engine: in fp32 the greedy tokens are identical, with batches of
every size between buckets (padding requests), requests finishing at different times, and chunked prompts
joining mid-way. The replay path makes no host sync (torch.cuda.set_sync_debug_mode("error")). On CPU (CI) the
runner's bookkeeping (buckets, static inputs, padding into the sink page, the attention backend's static state)
runs uncaptured: each bucket's static forward eagerly, with the Triton kernels in Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re

import pytest
import torch

from pd.engine import compile_watch
from pd.engine.cuda_graph_runner import StagedDecode
from pd.engine.io import SamplingParams
from pd.engine.llm import LLM
from pd.server_args import default_cuda_graph_bs
from tests.tiny_checkpoints import make_checkpoint
from tests.triton_interpreter import patch_interpreter


def test_default_buckets_follow_sglang_spacing():
    assert default_cuda_graph_bs(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert default_cuda_graph_bs(3) == (1, 2, 3)


def greedy_workload(arch: str, root: str, device: str, num_prompts: int, max_prompt: int,
                    max_new: int) -> tuple[int, str, list[list[int]], list[SamplingParams]]:  # fmt: skip
    """A fresh random checkpoint of ``arch`` and greedy requests for it: (seed, path, prompts of 3 to max_prompt
    tokens, params of 2 to max_new new tokens). On CPU, Triton's interpreter computes like compiled Triton."""
    if device == "cpu":
        patch_interpreter()
    seed = int(torch.randint(0, 2**31, ()).item())
    path = make_checkpoint(arch, os.path.join(root, arch), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, max_prompt, (num_prompts,), generator=gen)]  # fmt: skip
    params = [SamplingParams(max_new_tokens=int(n), temperature=0.0)
              for n in torch.randint(2, max_new, (num_prompts,), generator=gen)]  # fmt: skip
    return seed, path, prompts, params


def graphs_equal_eager(arch: str, root: str, device: str, num_prompts: int, max_prompt: int, max_new: int) -> None:
    """Greedy tokens with decode batches replayed (or, on CPU, run uncaptured) from buckets (1, 2, 4, 8, 16)
    equal the eager engine's, in fp32 (the Triton attention backend and MoE runner: the ones graphs capture)."""
    seed, path, prompts, params = greedy_workload(arch, root, device, num_prompts, max_prompt, max_new)
    outs = {}
    # Graphs with and without overlap scheduling (under overlap a staged batch takes its tokens from the device).
    # On CPU (the interpreter, the suite's slowest part) graphs with overlap only: without it the staging is the
    # same code given host tokens, which the GPU test covers.
    configs = ((True, True), (True, False), (False, False)) if device == "cuda" else ((True, True), (False, False))
    for graphs, overlap in configs:
        llm = LLM(path, device=device, dtype=torch.float32, page_size=16, chunked_prefill_size=64,
                  max_running_requests=16, max_total_tokens=8192, attention_backend="triton", moe_runner="triton",
                  cuda_graph_bs=(1, 2, 4, 8, 16) if graphs else (), overlap=overlap)  # fmt: skip
        assert (llm.runner.graphs is not None) == graphs and llm.scheduler.overlap == overlap
        late = compile_watch.compiles_after_warm_up
        outs[graphs, overlap] = llm.generate(prompts, params)
        if graphs and device == "cuda":
            # Ragged prompt batches of every size and decode buckets: the warm-up and the capture compiled every
            # kernel variant they need (no request waits on Triton; see pd.engine.compile_watch)
            assert compile_watch.compiles_after_warm_up == late, "a kernel variant compiled after the warm-up"
        del llm
    for config in configs[:-1]:
        assert outs[config] == outs[False, False], f"seed {seed}, graphs and overlap {config}"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("arch", ["deepseek_v3"])  # MLA and MoE: the GPU test covers the other architectures
def test_graph_runner_bookkeeping_uncaptured_on_cpu_gives_the_eager_tokens(arch, tmp_path, interpreter):
    interpreter.run(__name__, "graphs_equal_eager", arch, str(tmp_path), "cpu", 4, 20, 6)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen3_moe", "deepseek_v3"])
def test_graph_replay_gives_the_eager_greedy_tokens(arch, tmp_path, gpu_fp32_clean):
    graphs_equal_eager(arch, str(tmp_path), "cuda", 13, 90, 40)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_graph_replay_makes_no_host_sync(arch, tmp_path, gpu_fp32_clean):
    path = make_checkpoint(arch, str(tmp_path / arch), seed=0)
    llm = LLM(path, device="cuda", dtype=torch.bfloat16, page_size=16, max_running_requests=8, max_total_tokens=4096)
    runner, sched = llm.runner, llm.scheduler
    rows = []
    for n in (5, 17, 9):
        row = sched.slots.alloc_row()
        sched.slots.assign_pages(row, 0, sched.pool.alloc(sched._pages_for(n + 4)))
        runner.forward(runner.build_batch(list(range(n)), [row], [0], [n], sched.slots))
        rows.append(row)
    batch = runner.build_batch([1, 2, 3], rows, [5, 17, 9], [1, 1, 1], sched.slots)
    assert isinstance(batch, StagedDecode)
    logits = forward_without_sync(runner, batch)
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()


def forward_without_sync(runner, batch) -> torch.Tensor:  # noqa: ANN001
    """runner.forward(batch) with any host sync it makes an error (torch.cuda.set_sync_debug_mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return runner.forward(batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_logged_graph_memory_leaves_out_blocks_cached_before(tmp_path, caplog, gpu_fp32_clean):
    """Blocks the allocator still caches when the engine starts (as quantizing weights at load leaves them) are
    handed back by the capture itself (torch.cuda.graph empties the cache): the start-up log must not count them
    as memory the graphs freed. The oracle: the figures lie between none and the cached block's size."""
    path = make_checkpoint("qwen3_moe", str(tmp_path / "qwen3_moe"), seed=0)
    cached = 1 << 30
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # cached for the side stream: nothing the engine allocates reuses it
        block = torch.empty(cached, dtype=torch.uint8, device="cuda")
    del block
    assert torch.cuda.memory_reserved() >= cached
    with caplog.at_level(logging.INFO, logger="pd.engine"):
        llm = LLM(path, device="cuda", dtype=torch.bfloat16, page_size=16, max_running_requests=8,
                  max_total_tokens=4096, cuda_graph_bs=(1, 2, 4), piecewise_tokens=(64, 128))  # fmt: skip
    decode = [float(m) for m in re.findall(r"captured \d+ CUDA graphs .* ([-\d.]+) MiB", caplog.text)]
    assert len(decode) == 1 and 0 <= decode[0] < cached / 2**20, caplog.text
    assert llm.runner.prompt_graphs is not None
    assert 0 <= llm.runner.prompt_graphs.capture_mib < cached / 2**20
