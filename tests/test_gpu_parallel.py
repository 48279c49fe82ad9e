"""Multi-GPU `pd serve` (NCCL) against the one-GPU run on the same checkpoint (not run in CI).

fp32 for the portable layouts (none / torch all-to-all, DP attention): identical greedy tokens. DeepEP's kernels
take bf16 only (and its low_latency mode needs InfiniBand NICs), so its normal mode runs in bf16 beside the torch
backend; DeepEP's dispatch itself is checked bit for bit in tests/test_deepep_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_parallel_serve import Case

pytestmark = pytest.mark.gpu

GPU_ARGS = ("--device", "cuda", "--max-total-tokens", "16384")
FP32_LAYOUTS = {
    1: ["--enable-single-batch-overlap"],  # shared experts on a second stream (DeepSeek; Qwen3-MoE has none)
    2: ["--tp 2 --ep 2 --moe-a2a-backend torch --enable-single-batch-overlap",
        "--tp 2 --ep 2 --moe-a2a-backend torch --enable-two-batch-overlap",
        "--tp 2 --ep 2", "--tp 2 --ep 2 --moe-a2a-backend torch", "--tp 2 --dp-size 2 --enable-dp-attention",
        "--tp 2 --ep 2 --dp-size 2 --enable-dp-attention --moe-a2a-backend torch",
        # EPLB: expert weights move between GPUs (NCCL point-to-point) every 3 forwards, mid-request
        "--tp 2 --ep 2 --moe-a2a-backend torch --enable-eplb --ep-num-redundant-experts 2 "
        "--eplb-rebalance-num-iterations 3"],
    4: ["--tp 4 --ep 4 --moe-a2a-backend torch", "--tp 4 --ep 2 --moe-a2a-backend none",
        "--tp 4 --dp-size 4 --enable-dp-attention --ep 4 --moe-a2a-backend torch",
        "--tp 4 --dp-size 2 --enable-dp-attention --ep 4 --moe-a2a-backend torch",
        "--tp 4 --ep 4 --moe-a2a-backend torch --enable-eplb --ep-num-redundant-experts 4 "
        "--eplb-rebalance-num-iterations 3"],
    # The tiny checkpoints have 4 attention heads: at 8 ranks attention runs in DP groups of at most 4.
    8: ["--tp 8 --ep 8 --dp-size 2 --enable-dp-attention --moe-a2a-backend torch",
        "--tp 8 --ep 8 --dp-size 8 --enable-dp-attention --moe-a2a-backend torch"],
}


def _needs(gpus: int) -> None:
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs, {torch.cuda.device_count()} visible")


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe"])
def fp32_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(request.param, str(tmp_path_factory.mktemp("gpu32")), *GPU_ARGS, "--dtype", "float32")


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe"])
def bf16_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(request.param, str(tmp_path_factory.mktemp("gpu16")), *GPU_ARGS, "--dtype", "bfloat16")


@pytest.mark.parametrize("layout", [(n, lay) for n, lays in FP32_LAYOUTS.items() for lay in lays],
                         ids=lambda p: p[1])
def test_multi_gpu_layout_gives_the_one_gpu_tokens_fp32(fp32_case: Case, layout: tuple[int, str]) -> None:
    _needs(layout[0])
    fp32_case.check(layout[1])


@pytest.mark.parametrize("gpus", [2, 4])
def test_deepep_normal_is_as_close_to_one_gpu_as_the_torch_backend_bf16(bf16_case: Case, gpus: int) -> None:
    """In bf16 every multi-rank layout sums in another order than one GPU, and a near-tie then sends a sequence
    elsewhere (seen on 2x H200: 48-55 of 60 tokens equal for `none`, `torch` and `deepep` alike). So DeepEP is
    held to the torch all-to-all backend (exact in fp32 above) on the same layout: every first token equal, and
    at least as many tokens equal to the one-GPU run, give or take 10%."""
    _needs(gpus)
    pytest.importorskip("deep_ep", reason="deep_ep (DeepEP) is not installed")
    layout = f"--tp {gpus} --ep {gpus} --deepep-mode normal --moe-a2a-backend"
    deepep, torch_a2a = bf16_case.serve(f"{layout} deepep"), bf16_case.serve(f"{layout} torch")
    assert [g[0] for g in deepep] == [e[0] for e in bf16_case.expected], f"seed {bf16_case.seed}"
    total = sum(len(e) for e in bf16_case.expected)
    ours, reference = bf16_case.agreement(deepep), bf16_case.agreement(torch_a2a)
    assert ours >= reference - 0.1 * total, f"seed {bf16_case.seed}: deepep {ours}/{total}, torch {reference}/{total}"
