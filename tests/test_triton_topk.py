"""The Triton router (pd.moe.triton_topk.fused_select_experts) against the torch path of
pd.moe.topk.select_experts on the CPU: small shapes under Triton's CPU interpreter in CI (tests/interpreter_child.py),
large decode and prefill shapes on a GPU. Inputs are drawn fresh each run.

Oracle: the kernel's exp and sums may differ from torch's in the last ulp, so two experts whose choices are that
close may swap places; everywhere else the ids must be the reference's, in the same order. With expert groups the
same holds for two groups whose scores are that close (the kept groups may differ); elsewhere the kernel must choose
within the reference's kept groups, as the reference does (whose slots are unsorted: compared sorted by choice).
"""

from __future__ import annotations

import contextlib
import importlib.util

import pytest
import torch

from pd.layers import fused_kernels
from pd.moe.topk import TopKConfig, TopKOutput, _group_mask, select_experts
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


def _group_scores(choice_TE: torch.Tensor, config: TopKConfig) -> torch.Tensor:
    """[T, G] the torch path's group scores (pd.moe.topk._group_mask)."""
    assert config.num_expert_group is not None
    grouped = choice_TE.view(choice_TE.shape[0], config.num_expert_group, -1)
    return grouped.amax(dim=-1) if config.group_scoring == "max" else grouped.topk(2, dim=-1).values.sum(dim=-1)


def assert_same_grouped_routing(got: TopKOutput, ref: TopKOutput, config: TopKConfig, scores_TE: torch.Tensor,
                                choice_TE: torch.Tensor) -> None:  # fmt: skip
    """got (kernel) against ref (select_experts on the CPU, unsorted slots) for a router with expert groups."""
    assert config.num_expert_group is not None and config.topk_group is not None
    ids, weights = got.topk_ids.cpu(), got.topk_weights.cpu()
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.shape == ref.topk_ids.shape and weights.shape == ref.topk_weights.shape
    num_tokens, top_k = ids.shape
    num_experts, num_groups, keep = choice_TE.shape[1], config.num_expert_group, config.topk_group
    if num_tokens == 0:
        return
    assert bool(((ids >= 0) & (ids < num_experts)).all()), "ids out of range"
    assert bool((ids.sort(dim=-1).values.diff(dim=-1) != 0).all()), "an expert chosen twice"

    # The kept groups are fixed wherever the topk_group-th and next best group scores are apart.
    group_scores = _group_scores(choice_TE, config)
    ranked = group_scores.sort(dim=-1, descending=True).values
    tol = NEAR_TIE * (ranked.abs() + choice_TE.abs().amax(dim=-1, keepdim=True))  # a sum of two choices
    if keep < num_groups:
        groups_clear = (ranked[:, keep - 1] - ranked[:, keep]) > tol[:, keep - 1]
    else:
        groups_clear = torch.ones(num_tokens, dtype=torch.bool)

    # Every token, near-ties included: the experts come from at most topk_group groups, each a group the
    # reference could keep, in slots sorted by choice, with the formula's weights.
    got_groups = ids // (num_experts // num_groups)
    used = torch.zeros(num_tokens, num_groups, dtype=torch.bool).scatter_(1, got_groups, True)
    assert bool((used.sum(dim=-1) <= keep).all()), "experts from more than topk_group groups"
    floor = ranked[:, keep - 1] - tol[:, keep - 1]
    assert bool((group_scores.gather(1, got_groups) >= floor[:, None]).all()), "an expert of a dropped group"
    picked = choice_TE.gather(1, ids)
    assert bool((picked[:, :-1] - picked[:, 1:] >= -NEAR_TIE * picked[:, :-1].abs()).all()), "slots not sorted"
    torch.testing.assert_close(weights, _weights(scores_TE.gather(1, ids), config), rtol=1e-6, atol=1e-7)

    # Tokens with clear kept groups: the plain oracle on the reference's masked choice (its slots sorted by it).
    masked = choice_TE.masked_fill(~_group_mask(choice_TE, config), float("-inf"))
    order = masked.gather(1, ref.topk_ids).argsort(dim=-1, descending=True, stable=True)
    ref_ids, ref_weights = ref.topk_ids.gather(1, order), ref.topk_weights.gather(1, order)
    ref_sorted = TopKOutput(ref_ids[groups_clear], ref_weights[groups_clear], None)
    assert_same_routing(TopKOutput(ids[groups_clear], weights[groups_clear], None), ref_sorted, config,
                        scores_TE[groups_clear], masked[groups_clear])  # fmt: skip


def _weights(picked_TK: torch.Tensor, config: TopKConfig) -> torch.Tensor:
    """select_experts' weight formula on the scores of the chosen experts, summed in slot order."""
    if config.renormalize:
        total = picked_TK[:, 0].clone()
        for k in range(1, picked_TK.shape[1]):
            total += picked_TK[:, k]
        picked_TK = picked_TK / (total[:, None] + 1e-20)
    return picked_TK * config.routed_scaling_factor


def check(device: str, num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype, scoring: str,
          with_bias: bool, renormalize: bool, scaling: float, seed: int,
          groups: tuple[int, int, str] | None = None) -> None:  # fmt: skip
    """groups: (num_expert_group, topk_group, group_scoring), or None for a router without expert groups."""
    from pd.moe.triton_topk import fused_select_experts

    gen = torch.Generator().manual_seed(seed)
    # Spread wide enough that softmax scores range over several orders of magnitude.
    logits = (torch.randn(num_tokens, num_experts, generator=gen) * 2).to(dtype)
    bias = torch.randn(num_experts, generator=gen) * 0.1 if with_bias else None
    num_groups, keep, group_scoring = groups if groups is not None else (None, None, "max")
    config = TopKConfig(top_k=top_k, scoring=scoring, renormalize=renormalize, num_expert_group=num_groups,
                        topk_group=keep, group_scoring=group_scoring, routed_scaling_factor=scaling)  # fmt: skip
    ref = select_experts(logits, config, bias)  # the CPU torch path
    dev_logits = logits.to(device)
    dev_bias = bias.to(device) if bias is not None else None
    got = fused_select_experts(dev_logits, config, dev_bias)
    assert got.router_logits is dev_logits
    if groups is None:
        assert_same_routing(got, ref, config, *_reference_scores(logits, scoring, bias))
        return
    assert_same_grouped_routing(got, ref, config, *_reference_scores(logits, scoring, bias))
    # select_experts takes the kernel for grouped routers too (on the CPU only inside on_cpu()).
    with fused_kernels.on_cpu() if device == "cpu" else contextlib.nullcontext():
        via = select_experts(dev_logits, config, dev_bias)
    torch.testing.assert_close(via.topk_ids, got.topk_ids, rtol=0, atol=0)
    torch.testing.assert_close(via.topk_weights, got.topk_weights, rtol=0, atol=0)


# (T, E, K, dtype, scoring, bias, renormalize, scaling): each listed axis value appears at least once.
INTERPRETER_CASES = [
    (5, 8, 2, torch.float32, "softmax", False, True, 1.0),  # Mixtral
    (1, 60, 8, torch.bfloat16, "softmax", False, False, 1.0),  # Qwen2-MoE, decode
    (5, 128, 8, torch.bfloat16, "softmax", False, True, 2.5),
    (5, 60, 1, torch.float32, "softmax", False, False, 2.5),  # DeepSeek-V2 greedy
    (5, 128, 8, torch.float32, "sigmoid", True, True, 2.5),  # DeepSeek-V3 scoring without groups
    (1, 8, 8, torch.bfloat16, "sigmoid", True, False, 1.0),  # K = E
    (0, 128, 2, torch.float32, "sigmoid", False, True, 1.0),
    (300, 8, 2, torch.float32, "softmax", False, True, 1.0),  # past one-row programs: rows share a program
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


V3_GROUPS = (8, 4, "top2_sum")  # DeepSeek-V3: 256 experts in 8 groups, 4 kept; here 64 experts
V2_GROUPS = (6, 3, "max")  # DeepSeek-V2 (160 experts, 8 groups, 3 kept) scaled down: groups of 10, not a power of 2
# (T, E, K, dtype, scoring, bias, renormalize, scaling, groups): each listed axis value appears at least once.
GROUPED_INTERPRETER_CASES = [
    (5, 64, 8, torch.float32, "sigmoid", True, True, 2.5, V3_GROUPS),  # DeepSeek-V3
    (1, 64, 8, torch.bfloat16, "sigmoid", True, True, 2.5, V3_GROUPS),  # DeepSeek-V3, decode
    (0, 64, 8, torch.bfloat16, "sigmoid", True, True, 2.5, V3_GROUPS),
    (5, 60, 6, torch.bfloat16, "softmax", False, False, 16.0, V2_GROUPS),  # DeepSeek-V2
    (1, 60, 6, torch.float32, "softmax", False, False, 16.0, V2_GROUPS),
    (5, 8, 2, torch.float32, "sigmoid", False, True, 1.0, (4, 2, "top2_sum")),  # groups of two: top2 = the group
    (5, 8, 2, torch.bfloat16, "softmax", True, False, 1.0, (4, 2, "max")),
    (260, 64, 8, torch.float32, "sigmoid", True, True, 2.5, V3_GROUPS),  # rows sharing a program
]


@needs_triton
@pytest.mark.parametrize("num_tokens,num_experts,top_k,dtype,scoring,with_bias,renormalize,scaling,groups",
                         GROUPED_INTERPRETER_CASES)  # fmt: skip
def test_grouped_fused_select_experts_equals_the_reference_under_the_interpreter(
    num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype, scoring: str, with_bias: bool,
    renormalize: bool, scaling: float, groups: tuple[int, int, str], interpreter: InterpreterChild,
) -> None:  # fmt: skip
    seed = int(torch.randint(0, 2**62, ()))
    interpreter.run(__name__, "check", "cpu", num_tokens, num_experts, top_k, dtype, scoring, with_bias,
                    renormalize, scaling, seed, groups, timeout_s=300)  # fmt: skip


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


def _tie_rule(choice_TE: torch.Tensor, config: TopKConfig) -> torch.Tensor:
    """[T, K] the kernel's documented rule, one sort at a time: the topk_group best groups (ties: the lower group
    index), then the K experts of largest choice among theirs (ties: the lower id), sorted."""
    assert config.num_expert_group is not None and config.topk_group is not None
    num_tokens, num_experts = choice_TE.shape
    kept_groups = _group_scores(choice_TE, config).sort(dim=-1, descending=True, stable=True).indices
    kept_TG = torch.zeros(num_tokens, config.num_expert_group, dtype=torch.bool)
    kept_TG.scatter_(1, kept_groups[:, : config.topk_group], True)
    kept_TE = kept_TG.repeat_interleave(num_experts // config.num_expert_group, dim=1)
    by_choice = choice_TE.sort(dim=-1, descending=True, stable=True).indices
    kept_first = kept_TE.gather(1, by_choice).int().sort(dim=-1, descending=True, stable=True).indices
    return by_choice.gather(1, kept_first)[:, : config.top_k]


def check_group_ties(seed: int) -> None:
    """Exact ties in group scores, within a group's top two and among choices (integer logits, a -inf bias):
    where torch's result is well-defined (no tie at the topk_group-th group, none at the K-th expert) the kernel
    must choose its set; everywhere it follows its own rule (ties to the lower group index and expert id)."""
    from pd.moe.triton_topk import fused_select_experts

    gen = torch.Generator().manual_seed(seed)
    num_tokens, num_experts = 64, 16
    # Values 0..3: every group's top two (and every score) set apart from every other by far more than an ulp, so
    # torch and the kernel see the same ties.
    logits = torch.randint(0, 4, (num_tokens, num_experts), generator=gen).float()
    # Two groups tied at their best value 3: both 3s count (2 * s(3) > s(3) + s(2)), so with one group kept the
    # first group must win; a second value taken from below the best would keep the second.
    logits[0] = torch.tensor([3.0, 3, 0, 0, 3, 2, 2, 2, 0, 0, 0, 0, 1, 1, 1, 1])
    logits[1] = torch.tensor([3.0, 2, 2, 2, 0, 0, 0, 0, 3, 3, 0, 0, 1, 1, 1, 1])
    top2 = dict(num_expert_group=4, group_scoring="top2_sum")
    no_bias = torch.zeros(num_experts)
    # A -inf bias: -inf choices, so -inf group scores, and kept experts tied with the torch path's -inf fill.
    random_inf = torch.where(torch.rand(num_experts, generator=gen) < 0.3, float("-inf"), 0.0)
    # Groups with no, one, one and two experts left: where the "max" of the last is below the other two, the two
    # kept groups hold two choosable experts for K = 3, so a -inf one of theirs (5, not 0 of a dropped group) is third.
    few_left = torch.full((num_experts,), float("-inf"))
    few_left[[4, 8, 12, 13]] = 0.0
    # Group 0 scores inf + -inf = NaN, which torch ranks above every group: always kept.
    nan_group = torch.zeros(num_experts)
    nan_group[0], nan_group[1:4] = float("inf"), float("-inf")
    for config, bias in [
        (TopKConfig(top_k=3, scoring="sigmoid", renormalize=False, topk_group=2, **top2), no_bias),
        (TopKConfig(top_k=2, scoring="sigmoid", renormalize=True, topk_group=1, **top2), no_bias),
        (TopKConfig(top_k=3, scoring="sigmoid", renormalize=True, topk_group=2, **top2), random_inf),
        (TopKConfig(top_k=3, scoring="softmax", renormalize=False, num_expert_group=4, topk_group=2), no_bias),
        (TopKConfig(top_k=3, scoring="sigmoid", renormalize=False, num_expert_group=4, topk_group=2), few_left),
        (TopKConfig(top_k=2, scoring="sigmoid", renormalize=True, topk_group=2, **top2), nan_group),
    ]:
        ref = select_experts(logits, config, bias)
        got = fused_select_experts(logits, config, bias)
        scores, choice = _reference_scores(logits, config.scoring, bias)
        torch.testing.assert_close(got.topk_ids, _tie_rule(choice, config), rtol=0, atol=0)
        torch.testing.assert_close(got.topk_weights, _weights(scores.gather(1, got.topk_ids), config), rtol=1e-6,
                                   atol=1e-7)  # fmt: skip

        assert config.topk_group is not None
        ranked = _group_scores(choice, config).sort(dim=-1, descending=True).values
        groups_clear = ranked[:, config.topk_group - 1] > ranked[:, config.topk_group]
        if bias is no_bias:  # (a -inf bias, the same for every row, may give every row one pattern)
            # Each row has a tie at the boundary with probability 0.3 to 0.5: both kinds come up but once in 1e9.
            assert bool(groups_clear.any()) and bool((~groups_clear).any()), "no tie, or only ties, at the boundary"
        if bias is few_left:  # about one row in four; none in 64 once in 1e9
            assert bool(choice.gather(1, got.topk_ids).isinf().any()), "no kept expert of -inf choice taken"
        mask = _group_mask(choice, config)
        assert bool(mask.gather(1, got.topk_ids)[groups_clear].all()), "an expert of a group torch drops"
        kth = choice.masked_fill(~mask, float("-inf")).topk(config.top_k + 1, dim=-1).values
        set_clear = groups_clear & (kth[:, -2] > kth[:, -1])
        torch.testing.assert_close(got.topk_ids.sort(dim=-1).values[set_clear],
                                   ref.topk_ids.sort(dim=-1).values[set_clear], rtol=0, atol=0)  # fmt: skip


@needs_triton
def test_grouped_fused_select_experts_ties(interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_group_ties", int(torch.randint(0, 2**62, ())), timeout_s=300)


def test_fused_select_experts_rejects_what_it_does_not_implement() -> None:
    pytest.importorskip("triton")
    from pd.moe.triton_topk import fused_select_experts

    logits = torch.randn(2, 8)
    with pytest.raises(ValueError, match="exceeds"):
        fused_select_experts(logits, TopKConfig(top_k=9))
    # The checks of select_experts, with its messages; and top2 of one expert, where its torch.topk(2) fails.
    for config, match in [
        (TopKConfig(top_k=2, num_expert_group=3, topk_group=1), "divisible"),
        (TopKConfig(top_k=5, num_expert_group=4, topk_group=2), "exceeds"),
        (TopKConfig(top_k=2, num_expert_group=8, topk_group=4, group_scoring="top2_sum"), "at least 2"),
    ]:
        with pytest.raises(ValueError, match=match):
            fused_select_experts(logits, config)
        if match != "at least 2":
            with pytest.raises(ValueError, match=match):
                select_experts(logits, config)


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
@pytest.mark.parametrize("num_tokens", [1, 64, 4096])
@pytest.mark.parametrize("scoring,with_bias,renormalize,scaling,groups",
                         [("sigmoid", True, True, 2.5, (8, 4, "top2_sum")),  # DeepSeek-V3
                          ("softmax", False, False, 16.0, (8, 4, "max"))])  # fmt: skip
def test_grouped_fused_select_experts_equals_the_reference_on_the_gpu(
    num_tokens: int, scoring: str, with_bias: bool, renormalize: bool, scaling: float, groups: tuple[int, int, str]
) -> None:
    check("cuda", num_tokens, 256, 8, torch.bfloat16, scoring, with_bias, renormalize, scaling,
          int(torch.randint(0, 2**62, ())), groups)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("grouped", [False, True])
def test_select_experts_on_cuda_uses_the_kernel(grouped: bool) -> None:
    """The CUDA path of select_experts is the kernel: its slots sorted by choice, one launch, capturable."""
    logits = torch.randn(3, 64, device="cuda")
    config, bias = TopKConfig(top_k=4), None
    if grouped:
        config = TopKConfig(top_k=8, scoring="sigmoid", num_expert_group=8, topk_group=4, group_scoring="top2_sum",
                            routed_scaling_factor=2.5)  # fmt: skip
        bias = torch.randn(64, device="cuda") * 0.1
    graph = torch.cuda.CUDAGraph()
    eager = select_experts(logits, config, bias)
    with torch.cuda.graph(graph):
        captured = select_experts(logits, config, bias)
    graph.replay()
    choice = _reference_scores(logits, config.scoring, bias)[1].gather(1, eager.topk_ids)
    assert bool((choice.diff(dim=-1) <= 1e-6).all()), "slots not sorted by choice: not the kernel"
    torch.testing.assert_close(captured.topk_ids, eager.topk_ids, rtol=0, atol=0)
    torch.testing.assert_close(captured.topk_weights, eager.topk_weights, rtol=0, atol=0)
