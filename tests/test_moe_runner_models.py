"""The whole model with `--moe-runner-backend triton` against the torch reference runner.

GPU (not in CI): every MoE architecture in fp32 gives the reference runner's greedy tokens and logits within 1e-4.
CPU (CI): tests/test_attention_backends.py serves PD with the Triton runner (and attention) on the decode side in
Triton's interpreter, against `pd serve` on the reference code.
"""

from __future__ import annotations

import secrets

import pytest
import torch

from pd.engine.io import SamplingParams
from pd.engine.llm import LLM
from tests.tiny_checkpoints import make_checkpoint

MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_triton_runner_gives_the_reference_runners_greedy_tokens_on_cuda(arch, tmp_path, gpu_fp32_clean):
    seed = secrets.randbelow(2**31)
    path = make_checkpoint(arch, str(tmp_path / arch), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (200, 5, 61, 33)]
    engines = {r: LLM(path, device="cuda", dtype=torch.float32, page_size=16, chunked_prefill_size=64,
                      max_total_tokens=8192, moe_runner=r) for r in ("torch", "triton")}  # fmt: skip
    ref, got = (engines[r].prefill_logits(prompts[0]) for r in ("torch", "triton"))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0, msg=f"seed {seed}")
    sp = SamplingParams(max_new_tokens=24, temperature=0.0)
    assert engines["triton"].generate(prompts, sp) == engines["torch"].generate(prompts, sp), f"seed {seed}"
