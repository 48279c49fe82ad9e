"""Multi-GPU `pd serve` (NCCL) against the one-GPU run on the same checkpoint (not run in CI).

fp32 for the portable layouts (none / torch all-to-all, DP attention): identical greedy tokens. DeepEP's kernels
take bf16 only, so its layouts run in bf16 against the one-GPU bf16 run, where a near-tie may flip a later token
(seen once for a tiny DeepSeek-V3: 6 equal tokens, then a different one); DeepEP's dispatch itself is checked
bit for bit in tests/test_deepep_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_parallel_serve import Case

pytestmark = pytest.mark.gpu

GPU_ARGS = ("--device", "cuda", "--max-total-tokens", "16384")
FP32_LAYOUTS = {
    2: ["--tp 2 --ep 2", "--tp 2 --ep 2 --moe-a2a-backend torch", "--tp 2 --dp-size 2 --enable-dp-attention",
        "--tp 2 --ep 2 --dp-size 2 --enable-dp-attention --moe-a2a-backend torch"],
    4: ["--tp 4 --ep 4 --moe-a2a-backend torch", "--tp 4 --ep 2 --moe-a2a-backend none",
        "--tp 4 --dp-size 4 --enable-dp-attention --ep 4 --moe-a2a-backend torch"],
}
# DeepEP low_latency needs InfiniBand NICs; normal mode runs over NVLink.
DEEPEP_LAYOUTS = {n: [f"--tp {n} --ep {n} --moe-a2a-backend deepep --deepep-mode normal"] for n in (2, 4)}


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


@pytest.mark.parametrize("layout", [(n, lay) for n, lays in DEEPEP_LAYOUTS.items() for lay in lays],
                         ids=lambda p: p[1])
def test_deepep_normal_layout_gives_the_one_gpu_tokens_bf16(bf16_case: Case, layout: tuple[int, str]) -> None:
    _needs(layout[0])
    pytest.importorskip("deep_ep", reason="deep_ep (DeepEP) is not installed")
    bf16_case.check(layout[1], exact=False)
