"""The Triton router (pd.moe.triton_topk.fused_select_experts) against the torch path of
pd.moe.topk.select_experts on the CPU: small shapes under Triton's CPU interpreter in CI (tests/interpreter_child.py),
large decode and prefill shapes on a GPU. Inputs are drawn fresh each run.

Oracle: the kernel's exp and sums may differ from torch's in the last ulp, so two experts whose choices are that
close may swap places; everywhere else the ids must be the reference's, in the same order.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pd.moe.topk import TopKConfig, TopKOutput, select_experts
from tests.interpreter_child import InterpreterChild

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

NEAR_TIE = 1e-6  # relative gap between two choices below which their order may flip


def _reference_scores(logits_TE: torch.Tensor, scoring: str,
                      bias_E: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The torch path's scores (the weights' source) and choice (what it ranks), both [T, E] float32."""
    logits = logits_TE.float()
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    return scores, scores if bias_E is None else scores + bias_E.float()


def assert_same_routing(got: TopKOutput, ref: TopKOutput, config: TopKConfig, scores_TE: torch.Tensor,
                        choice_TE: torch.Tensor) -> None:  # fmt: skip
    """got (kernel, any device) against ref (select_experts on the CPU), both with slots sorted by choice."""
    ids, weights = got.topk_ids.cpu(), got.topk_weights.cpu()
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.shape == ref.topk_ids.shape and weights.shape == ref.topk_weights.shape
    num_tokens, top_k = ids.shape
    num_experts = choice_TE.shape[1]
    if num_tokens == 0:
        return
    assert bool(((ids >= 0) & (ids < num_experts)).all()), "ids out of range"
    assert bool((ids.sort(dim=-1).values.diff(dim=-1) != 0).all()), "an expert chosen twice"

    # The K + 1 best reference choices, sorted: slot k of the kernel must hold a choice within NEAR_TIE of the
    # reference's k-th best (this holds whatever near-ties flipped), and gaps above NEAR_TIE fix the ids.
    ranked = choice_TE.topk(min(top_k + 1, num_experts), dim=-1).values
    tol = NEAR_TIE * ranked.abs().clamp_min(1e-30)
    diff = (choice_TE.gather(1, ids) - ranked[:, :top_k]).abs()
    assert bool((diff <= tol[:, :top_k]).all()), f"a slot holds a choice off the reference's by {diff.max()}"
    gaps_clear = (ranked[:, :-1] - ranked[:, 1:]) > tol[:, :-1]  # [T, min(K, E - 1)]
    boundary_clear = gaps_clear[:, top_k - 1] if top_k < num_experts else torch.ones(num_tokens, dtype=torch.bool)
    order_clear = gaps_clear.all(dim=-1)  # no near-tie among the K + 1 best: ids fixed slot by slot
    torch.testing.assert_close(ids[order_clear], ref.topk_ids[order_clear], rtol=0, atol=0)

    # The chosen set is fixed wherever the K-th and (K+1)-th choices are apart; compare weights per expert there
    # (a swap inside the top K only reorders the renormalising sum).
    got_sorted, got_perm = ids.sort(dim=-1)
    ref_sorted, ref_perm = ref.topk_ids.sort(dim=-1)
    torch.testing.assert_close(got_sorted[boundary_clear], ref_sorted[boundary_clear], rtol=0, atol=0)
    same_set = (got_sorted == ref_sorted).all(dim=-1)
    torch.testing.assert_close(weights.gather(1, got_perm)[same_set], ref.topk_weights.gather(1, ref_perm)[same_set],
                               rtol=1e-6, atol=1e-7)  # fmt: skip
    # Every token, near-ties included: the weights are the formula applied to the reference scores of its ids.
    torch.testing.assert_close(weights, _weights(scores_TE.gather(1, ids), config), rtol=1e-6, atol=1e-7)


def _weights(picked_TK: torch.Tensor, config: TopKConfig) -> torch.Tensor:
    """select_experts' weight formula on the scores of the chosen experts, summed in slot order."""
    if config.renormalize:
        total = picked_TK[:, 0].clone()
        for k in range(1, picked_TK.shape[1]):
            total += picked_TK[:, k]
        picked_TK = picked_TK / (total[:, None] + 1e-20)
    return picked_TK * config.routed_scaling_factor


def check(device: str, num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype, scoring: str,
          with_bias: bool, renormalize: bool, scaling: float, seed: int) -> None:  # fmt: skip
    from pd.moe.triton_topk import fused_select_experts

    gen = torch.Generator().manual_seed(seed)
    # Spread wide enough that softmax scores range over several orders of magnitude.
    logits = (torch.randn(num_tokens, num_experts, generator=gen) * 2).to(dtype)
    bias = torch.randn(num_experts, generator=gen) * 0.1 if with_bias else None
    config = TopKConfig(top_k=top_k, scoring=scoring, renormalize=renormalize, routed_scaling_factor=scaling)
    ref = select_experts(logits, config, bias)  # the CPU torch path
    dev_logits = logits.to(device)
    got = fused_select_experts(dev_logits, config, bias.to(device) if bias is not None else None)
    assert got.router_logits is dev_logits
    assert_same_routing(got, ref, config, *_reference_scores(logits, scoring, bias))


# (T, E, K, dtype, scoring, bias, renormalize, scaling): each listed axis value appears at least once.
INTERPRETER_CASES = [
    (5, 8, 2, torch.float32, "softmax", False, True, 1.0),  # Mixtral
    (1, 60, 8, torch.bfloat16, "softmax", False, False, 1.0),  # Qwen2-MoE, decode
    (5, 128, 8, torch.bfloat16, "softmax", False, True, 2.5),
    (5, 60, 1, torch.float32, "softmax", False, False, 2.5),  # DeepSeek-V2 greedy
    (5, 128, 8, torch.float32, "sigmoid", True, True, 2.5),  # DeepSeek-V3 scoring without groups
    (1, 8, 8, torch.bfloat16, "sigmoid", True, False, 1.0),  # K = E
    (0, 128, 2, torch.float32, "sigmoid", False, True, 1.0),
]


@needs_triton
@pytest.mark.parametrize("num_tokens,num_experts,top_k,dtype,scoring,with_bias,renormalize,scaling",
                         INTERPRETER_CASES)  # fmt: skip
def test_fused_select_experts_equals_the_reference_under_the_interpreter(
    num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype, scoring: str, with_bias: bool,
    renormalize: bool, scaling: float, interpreter: InterpreterChild,
) -> None:  # fmt: skip
    seed = int(torch.randint(0, 2**62, ()))  # fresh each run (tests/conftest.py seeds the global generator)
    interpreter.run(__name__, "check", "cpu", num_tokens, num_experts, top_k, dtype, scoring, with_bias,
                    renormalize, scaling, seed, timeout_s=300)  # fmt: skip


def check_ties(seed: int) -> None:
    """Exact ties go to the lower id, and slots come out sorted by descending choice."""
    from pd.moe.triton_topk import fused_select_experts

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-2, 3, (6, 16), generator=gen).float()  # five distinct values: many exact ties
    got = fused_select_experts(logits, TopKConfig(top_k=4, scoring="sigmoid", renormalize=False))
    key = logits * 16 - torch.arange(16)  # larger logit first, then lower id: a strict order
    torch.testing.assert_close(got.topk_ids, key.topk(4, dim=-1).indices, rtol=0, atol=0)


@needs_triton
def test_fused_select_experts_breaks_ties_toward_the_lower_id(interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_ties", int(torch.randint(0, 2**62, ())), timeout_s=300)


def test_fused_select_experts_rejects_what_it_does_not_implement() -> None:
    pytest.importorskip("triton")
    from pd.moe.triton_topk import fused_select_experts

    logits = torch.randn(2, 8)
    with pytest.raises(ValueError, match="grouped"):
        fused_select_experts(logits, TopKConfig(top_k=2, num_expert_group=2, topk_group=1))
    with pytest.raises(ValueError, match="exceeds"):
        fused_select_experts(logits, TopKConfig(top_k=9))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
@pytest.mark.parametrize("num_experts", [128, 256])
@pytest.mark.parametrize("scoring,with_bias,renormalize,scaling",
                         [("softmax", False, True, 1.0), ("sigmoid", True, True, 2.5)])  # fmt: skip
def test_fused_select_experts_equals_the_reference_on_the_gpu(
    num_tokens: int, num_experts: int, scoring: str, with_bias: bool, renormalize: bool, scaling: float
) -> None:
    check("cuda", num_tokens, num_experts, 8, torch.bfloat16, scoring, with_bias, renormalize, scaling,
          int(torch.randint(0, 2**62, ())))  # fmt: skip


@pytest.mark.gpu
def test_select_experts_on_cuda_uses_the_kernel() -> None:
    """The CUDA path of select_experts is the kernel: its slots sorted by choice, one launch, capturable."""
    logits = torch.randn(3, 64, device="cuda")
    config = TopKConfig(top_k=4)
    graph = torch.cuda.CUDAGraph()
    eager = select_experts(logits, config)
    with torch.cuda.graph(graph):
        captured = select_experts(logits, config)
    graph.replay()
    torch.testing.assert_close(captured.topk_ids, eager.topk_ids, rtol=0, atol=0)
    torch.testing.assert_close(captured.topk_weights, eager.topk_weights, rtol=0, atol=0)
