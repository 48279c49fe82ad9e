"""The router of `pd.moe.topk.select_experts` without expert groups as one Triton kernel.

Why: the torch path launches about eight small kernels per MoE layer (float upcast, softmax or sigmoid, top-k (two
kernels), gather, sum, add, div, mul). At decode batch sizes each of them does almost no work, so the step is bound
by launches; one kernel per layer does the same work in one launch, with no host sync and shapes fixed by T, so it
can be captured in a CUDA graph.

Semantics (those of the torch path for ``num_expert_group is None``): logits upcast to float32; scores = softmax or
sigmoid; choice = scores (+ correction bias); the K experts of largest choice in descending order of choice, ties
toward the lower expert id; weights = the unbiased scores of those experts, renormalised as
``w / (w_0 + ... + w_{K-1} + 1e-20)`` with the sum taken in slot order, then times routed_scaling_factor.

Numerics: everything in float32. Softmax is ``exp(x - max) / sum(exp(x - max))``, sigmoid ``1 / (1 + exp(-x))``,
with IEEE-rounded divisions. What may differ from torch: the exp (libdevice's expf, within 2 ulp, when compiled;
numpy's under the interpreter; torch uses its own) and the order of the softmax sum, i.e. the last ulp or two of a
score and so of a weight; torch's sum of the K weights may also use another order than slot order (on the CPU it
does for some K). Where two choices are that close, the slot order, or at the K-th place the chosen expert, may
flip. Exact ties go to the lower id here; torch.topk does not promise that. NaN choices are taken first, as
torch.topk ranks NaN above everything, so a NaN never yields an id outside [0, E).
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
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
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
    """`pd.moe.topk.select_experts` for ``config.num_expert_group is None`` in one launch (any device Triton runs
    on; in production CUDA).

    Args:
        router_logits_TE: [T, E] router logits, any float dtype (read and upcast to float32 in the kernel).
        config: the routing rule; must have no expert groups.
        correction_bias_E: [E] bias added to the scores to choose the experts (not to the weights).

    Returns:
        TopKOutput with topk_ids [T, K] int64 sorted by descending choice, topk_weights [T, K] float32 and
        router_logits = router_logits_TE (the very tensor).

    Raises:
        ValueError: expert groups in config, logits not 2-D, K > E, or a bias of the wrong shape.
    """
    if config.num_expert_group is not None:
        raise ValueError("fused_select_experts does not implement grouped top-k; use select_experts")
    if router_logits_TE.dim() != 2:
        raise ValueError(f"router logits must be [T, E], got shape {tuple(router_logits_TE.shape)}")
    num_tokens, num_experts = router_logits_TE.shape
    top_k = config.top_k
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds the {num_experts} experts")
    if correction_bias_E is not None and correction_bias_E.shape != (num_experts,):
        raise ValueError(f"correction bias must be [{num_experts}], got {tuple(correction_bias_E.shape)}")

    device = router_logits_TE.device
    ids_TK = torch.empty((num_tokens, top_k), dtype=torch.int64, device=device)
    weights_TK = torch.empty((num_tokens, top_k), dtype=torch.float32, device=device)
    if num_tokens == 0:
        return TopKOutput(topk_ids=ids_TK, topk_weights=weights_TK, router_logits=router_logits_TE)

    logits = router_logits_TE if router_logits_TE.stride(1) == 1 else router_logits_TE.contiguous()
    bias = correction_bias_E.contiguous() if correction_bias_E is not None else None
    block_e = triton.next_power_of_2(num_experts)
    # Decode (T = 1) gets a one-row program, the shortest path through the K rounds; larger T shares the rounds
    # among several rows. Powers of two in T keep the number of compiled variants small.
    block_t = min(triton.next_power_of_2(num_tokens), max(_MAX_TILE // block_e, 1), _MAX_BLOCK_T)
    num_warps = min(max(block_t * block_e // 512, 1), 8)
    grid = (triton.cdiv(num_tokens, block_t),)
    _select_experts_kernel[grid](
        logits, bias if bias is not None else logits, ids_TK, weights_TK, num_tokens, num_experts, logits.stride(0),
        float(config.routed_scaling_factor), K=top_k, SOFTMAX=config.scoring == "softmax", HAS_BIAS=bias is not None,
        RENORMALIZE=config.renormalize, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        LIBDEVICE_EXP=_LIBDEVICE_EXP, num_warps=num_warps,
    )  # fmt: skip
    return TopKOutput(topk_ids=ids_TK, topk_weights=weights_TK, router_logits=router_logits_TE)
