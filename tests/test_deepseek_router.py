"""DeepSeek's router logits against the reference's arithmetic (float32 activations times the float32 weight, as
transformers computes them), on fresh random inputs.

CPU: that very computation (no 16-bit copy of the weight). GPU (marked ``gpu``): with bf16 activations and a weight
that bf16 holds exactly, one tensor-core GEMM with float32 output; the products are the reference's exactly, only
the order of the float32 sums differs, so the logits agree to float32 rounding. A weight bf16 cannot hold takes the
float32 GEMM."""

from __future__ import annotations

import secrets

import pytest
import torch
import torch.nn.functional as F

from pd.engine.llm import LLM
from pd.models.deepseek import DeepseekMoE
from tests.tiny_checkpoints import make_checkpoint


def _router(tmp: str, device: str) -> DeepseekMoE:
    path = make_checkpoint("deepseek_v3", tmp, seed=secrets.randbelow(2**31))
    llm = LLM(path, device=device, dtype=torch.bfloat16, page_size=4, chunked_prefill_size=32, max_total_tokens=256)
    return next(m for m in llm.runner.model.modules() if isinstance(m, DeepseekMoE))


def _reference(moe: DeepseekMoE, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), moe.gate.weight.float())


def test_router_logits_on_cpu_are_the_float32_reference(tmp_path) -> None:
    moe = _router(str(tmp_path), "cpu")
    x = torch.randn(37, moe.gate.in_features, dtype=torch.bfloat16)
    assert torch.equal(moe._router_logits(x), _reference(moe, x))
    assert moe._gate_16bit == (None, None)  # no copy made off a GPU


@pytest.mark.gpu
def test_bf16_router_on_cuda_agrees_with_the_float32_reference(tmp_path) -> None:
    moe = _router(str(tmp_path), "cuda")
    weight = moe.gate.weight
    with torch.no_grad():
        weight.copy_(weight.to(torch.bfloat16).float())  # a checkpoint's bf16 router, loaded as float32
    x = torch.randn(3000, moe.gate.in_features, dtype=torch.bfloat16, device="cuda")
    got, want = moe._router_logits(x), _reference(moe, x)
    assert moe._gate_16bit[1] is not None, "the 16-bit GEMM was not used"
    assert got.dtype == torch.float32
    bound = 1e-5 * F.linear(x.float().abs(), weight.abs())  # float32 rounding of sums of exact products
    assert ((got - want).abs() <= bound).all(), float(((got - want).abs() / bound).amax())
    with torch.no_grad():
        weight[0, 0] += weight[0, 0].abs().clamp_min(1e-3) * 2**-12  # no longer a bf16 value
    assert torch.equal(moe._router_logits(x), _reference(moe, x)) and moe._gate_16bit[1] is None
