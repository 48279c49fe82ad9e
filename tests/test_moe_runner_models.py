"""The whole model with `--moe-runner-backend triton` against the torch reference runner.

GPU (not in CI): every MoE architecture in fp32 gives the reference runner's greedy tokens and logits within 1e-4.
CPU (CI): PD with the Triton runner on the decode side only (its kernels in Triton's interpreter) gives the
tokens of `pd serve` on the reference runner.
"""

from __future__ import annotations

import importlib.util
import os
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


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_pd_with_the_triton_runner_on_the_decode_side_equals_pd_serve(pd_references, monkeypatch):
    from tests.test_pd_e2e import _pd_equals_pd_serve

    reference = pd_references("qwen3_moe")  # made (if not yet) before the variables below are set
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets --moe-runner-backend triton run on the CPU
    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interpreter_site")  # the interpreter's fixes
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])))
    with _pd_equals_pd_serve(reference, 4, 6, 1, 1, decode_args=("--moe-runner-backend", "triton")):
        pass
