"""The router of `pd.moe.topk.select_experts` as one Triton kernel, with or without expert groups.

Why: the torch path launches about eight small kernels per MoE layer (float upcast, softmax or sigmoid, top-k (two
kernels), gather, sum, add, div, mul), about fifteen with expert groups (DeepSeek-V2/V3: the group scores, their
top-k, the mask and its fill on top). At decode batch sizes each of them does almost no work, so the step is bound
by launches; one kernel per layer does the same work in one launch, with no host sync and shapes fixed by T, so it
can be captured in a CUDA graph.

Semantics (those of the torch path): logits upcast to float32; scores = softmax or sigmoid; choice = scores
(+ correction bias). With expert groups (E / num_expert_group consecutive experts each), a group scores the best
choice in it ("max") or the sum of its two best choices ("top2_sum", two choices tied at the best both counting, as
in torch.topk(2).values.sum); the topk_group best groups are kept, ties toward the lower group index, and only their
experts stay available. Then the K available experts of largest choice in descending order of choice, ties toward
the lower expert id; weights = the unbiased scores of those experts, renormalised as
``w / (w_0 + ... + w_{K-1} + 1e-20)`` with the sum taken in slot order, then times routed_scaling_factor.

Numerics: everything in float32. Softmax is ``exp(x - max) / sum(exp(x - max))``, sigmoid ``1 / (1 + exp(-x))``,
with IEEE-rounded divisions. What may differ from torch: the exp (libdevice's expf, within 2 ulp, when compiled;
numpy's under the interpreter; torch uses its own) and the order of the softmax sum, i.e. the last ulp or two of a
score and so of a weight; torch's sum of the K weights may also use another order than slot order (on the CPU it
does for some K; with groups torch takes an unsorted top-k and sums in its order). Where two choices (or two group
scores) are that close, the slot order, at the K-th place the chosen expert, or at the topk_group-th place the kept
group, may flip. Exact ties go to the lower id (group index); torch.topk does not promise that. A -inf choice inside
a kept group (a -inf bias) is taken only when fewer than K kept experts have a larger one, and then before any
expert of another group; torch's -inf fill ties the two, and it may take either. NaN choices are taken first, as
torch.topk ranks NaN above everything, so a NaN never yields an id outside [0, E); a NaN group score (NaN choices,
or inf + -inf in "top2_sum") likewise ranks its group first, tied with +inf rather than above it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from pd.moe.topk import TopKConfig, TopKOutput

# Rows x experts per program stay at most this many lanes, so a program holds its tile in registers.
_MAX_TILE = 2048
_MAX_BLOCK_T = 64
_ROW_PROGRAMS_UP_TO = 256
# Compiled, tl.exp is ex2.approx after a rounded multiply by log2(e), off by up to ~1e-6 relative for exponents
# near -16: enough to reorder choices that torch ranks apart. libdevice's expf is within 2 ulp. Triton's interpreter
# has no libdevice; there tl.exp is numpy's float32 exp, within an ulp.
_LIBDEVICE_EXP = os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _kept_groups(
    choice,
    cols,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TOP2_SUM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """[BLOCK_T, BLOCK_E] bool: the experts inside the TOPK_GROUP best of the NUM_GROUPS groups of GROUP_SIZE
    consecutive experts (pd.moe.topk._group_mask), from choice [BLOCK_T, BLOCK_E] with NaN already made +inf."""
    col_group = cols // GROUP_SIZE  # padded lanes (cols >= E = NUM_GROUPS * GROUP_SIZE) fall in no group
    groups = tl.arange(0, BLOCK_G)
    group_scores = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
    for g in tl.static_range(NUM_GROUPS):
        in_group = (col_group == g)[None, :]
        first = tl.max(tl.where(in_group, choice, float("-inf")), axis=1)
        if TOP2_SUM:
            # torch.topk(2).values.sum: the second value excludes one lane holding the best, so two lanes tied at
            # the best both count.
            at = tl.min(tl.where(in_group & (choice == first[:, None]), cols[None, :], BLOCK_E), axis=1)
            second = tl.max(tl.where(in_group & (cols[None, :] != at[:, None]), choice, float("-inf")), axis=1)
            score = first + second
            score = tl.where(score != score, float("inf"), score)  # inf + -inf: torch's NaN, ranked first
        else:
            score = first
        group_scores = tl.where(groups[None, :] == g, score[:, None], group_scores)

    # TOPK_GROUP rounds of "take the best group still available", ties toward the lower group index. The kept
    # experts are those of the groups taken; a -inf choice inside a kept group stays choosable, and no expert of
    # another group ever is (the torch path fills those with -inf, tying them with such a choice).
    group_avail = tl.broadcast_to((groups < NUM_GROUPS)[None, :], (BLOCK_T, BLOCK_G))
    kept = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.max(tl.where(group_avail, group_scores, float("-inf")), axis=1)
        hit = group_avail & (group_scores == best[:, None])
        taken = tl.min(tl.where(hit, groups[None, :], BLOCK_G), axis=1)
        group_avail = group_avail & (groups[None, :] != taken[:, None])
        kept = kept | (col_group[None, :] == taken[:, None])
    return kept


@triton.jit
def _select_experts_kernel(
    logits_ptr,
    bias_ptr,
    ids_ptr,
    weights_ptr,
    num_tokens,
    num_experts,
    logits_stride,
    scaling,
    K: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    TOP2_SUM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
    LIBDEVICE_EXP: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    # Rows past T read zeros (not -inf), so their softmax stays finite; they are never stored.
    x = tl.load(logits_ptr + rows[:, None] * logits_stride + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    if SOFTMAX:
        x = tl.where(col_ok[None, :], x, float("-inf"))  # padded lanes add exp(-inf) = 0 to the sum
        e = _exp(x - tl.max(x, axis=1)[:, None], LIBDEVICE_EXP)
        scores = tl.math.div_rn(e, tl.sum(e, axis=1)[:, None])  # IEEE division: compiled `/` is div.full (2 ulp)
    else:
        scores = tl.math.div_rn(1.0, 1.0 + _exp(-x, LIBDEVICE_EXP))
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(choice != choice, float("inf"), choice)  # NaN first, as torch.topk ranks it

    # K rounds of "take the largest still available": K and E are small, and this keeps the slots sorted by choice.
    # `avail` (not overwriting taken lanes with -inf) keeps a -inf choice from picking a taken or padded lane.
    avail = row_ok[:, None] & col_ok[None, :]  # [BLOCK_T, BLOCK_E]
    if NUM_GROUPS > 0:
        avail = avail & _kept_groups(choice, cols, NUM_GROUPS, TOPK_GROUP, GROUP_SIZE, TOP2_SUM, BLOCK_T, BLOCK_E,
                                     BLOCK_G)  # fmt: skip
    slots = tl.arange(0, BLOCK_K)
    weights = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in range(K):
        best = tl.max(tl.where(avail, choice, float("-inf")), axis=1)
        hit = avail & (choice == best[:, None])
        idx = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)  # ties: the lowest id
        taken = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(taken, scores, 0.0), axis=1)
        avail = avail & ~taken
        total += w  # slot order 0..K-1, the order in which torch sums its sorted top-k
        weights = tl.where(slots[None, :] == k, w[:, None], weights)
        tl.store(ids_ptr + rows * K + k, idx.to(tl.int64), mask=row_ok)
    if RENORMALIZE:
        weights = tl.math.div_rn(weights, (total + 1e-20)[:, None])
    weights = weights * scaling  # exact when scaling == 1.0, where torch skips the multiply
    out = rows[:, None] * K + slots[None, :]
    tl.store(weights_ptr + out, weights, mask=row_ok[:, None] & (slots[None, :] < K))


def fused_select_experts(
    router_logits_TE: torch.Tensor,
    config: TopKConfig,
    correction_bias_E: torch.Tensor | None = None,
) -> TopKOutput:
    """`pd.moe.topk.select_experts` in one launch, with or without expert groups (any device Triton runs on; in
    production CUDA).

    Args:
        router_logits_TE: [T, E] router logits, any float dtype (read and upcast to float32 in the kernel).
        config: the routing rule.
        correction_bias_E: [E] bias added to the scores to choose the groups and experts (not to the weights).

    Returns:
        TopKOutput with topk_ids [T, K] int64 sorted by descending choice, topk_weights [T, K] float32 and
        router_logits = router_logits_TE (the very tensor).

    Raises:
        ValueError: logits not 2-D, K > E, a bias of the wrong shape; with groups, E not divisible by
            num_expert_group, K above the experts of the kept groups, or "top2_sum" on groups of one expert.
    """
    if router_logits_TE.dim() != 2:
        raise ValueError(f"router logits must be [T, E], got shape {tuple(router_logits_TE.shape)}")
    num_tokens, num_experts = router_logits_TE.shape
    top_k = config.top_k
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds the {num_experts} experts")
    if correction_bias_E is not None and correction_bias_E.shape != (num_experts,):
        raise ValueError(f"correction bias must be [{num_experts}], got {tuple(correction_bias_E.shape)}")
    num_groups, topk_group, group_size = 0, 0, 1  # 0 groups: the kernel compiles without the group code
    if config.num_expert_group is not None and config.topk_group is not None:
        # The checks and messages of select_experts.
        num_groups, topk_group = config.num_expert_group, config.topk_group
        if num_experts % num_groups != 0:
            raise ValueError(f"num_experts={num_experts} is not divisible by num_expert_group={num_groups}")
        group_size = num_experts // num_groups
        if top_k > topk_group * group_size:
            raise ValueError(f"top_k={top_k} exceeds the {topk_group} kept groups of {group_size} experts")
        if config.group_scoring == "top2_sum" and group_size < 2:
            # The torch path fails here too (a RuntimeError from topk(2)).
            raise ValueError(f"group_scoring='top2_sum' needs at least 2 experts per group, got {group_size}")

    device = router_logits_TE.device
    ids_TK = torch.empty((num_tokens, top_k), dtype=torch.int64, device=device)
    weights_TK = torch.empty((num_tokens, top_k), dtype=torch.float32, device=device)
    if num_tokens == 0:
        return TopKOutput(topk_ids=ids_TK, topk_weights=weights_TK, router_logits=router_logits_TE)

    logits = router_logits_TE if router_logits_TE.stride(1) == 1 else router_logits_TE.contiguous()
    bias = correction_bias_E.contiguous() if correction_bias_E is not None else None
    block_e = triton.next_power_of_2(num_experts)
    # Decode batches (T up to _ROW_PROGRAMS_UP_TO) get one-row programs (one warp below 1024 experts), the shortest path
    # through the K rounds (each round's reductions stay within a warp), and as many programs as rows: 16-row
    # tiles took 7 us at T = 64, E = 128 on an H200, four programs each walking the rounds with cross-warp
    # reductions. Larger T shares the rounds among several rows. Powers of two keep the compiled variants few.
    if num_tokens <= _ROW_PROGRAMS_UP_TO:
        block_t = 1
    else:
        block_t = min(triton.next_power_of_2(num_tokens), max(_MAX_TILE // block_e, 1), _MAX_BLOCK_T)
    num_warps = min(max(block_t * block_e // 512, 1), 8)
    grid = (triton.cdiv(num_tokens, block_t),)
    _select_experts_kernel[grid](
        logits, bias if bias is not None else logits, ids_TK, weights_TK, num_tokens, num_experts, logits.stride(0),
        float(config.routed_scaling_factor), K=top_k, SOFTMAX=config.scoring == "softmax", HAS_BIAS=bias is not None,
        RENORMALIZE=config.renormalize, NUM_GROUPS=num_groups, TOPK_GROUP=topk_group, GROUP_SIZE=group_size,
        TOP2_SUM=num_groups > 0 and config.group_scoring == "top2_sum", BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k), BLOCK_G=triton.next_power_of_2(max(num_groups, 1)),
        LIBDEVICE_EXP=_LIBDEVICE_EXP, num_warps=num_warps,
    )  # fmt: skip
    return TopKOutput(topk_ids=ids_TK, topk_weights=weights_TK, router_logits=router_logits_TE)
