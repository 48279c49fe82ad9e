"""Pure-torch MoE runner: the CPU path and the oracle every other runner is tested against.

Stages: pre-permute (sort (token, slot) pairs by local expert, gather their rows), grouped GEMM gate_up,
activation, grouped GEMM down, scale by the routing weight, post-permute (scatter-add back per token).
The arithmetic follows transformers' eager experts loop: per-expert ``linear``, ``act(gate) * up``,
``linear``, ``* weight`` (float32 weight, so the product is float32), cast to the hidden dtype. The sum back per
token differs from transformers (``index_add_`` in the hidden dtype, experts in ascending order, whose order on
CUDA varies run to run): each token's slot rows are added in ascending slot order in float32 and cast once, an
order every runner can reproduce exactly and without atomics.

The batched dispatch format (rows already grouped per expert, with counts) skips both permutes: a loop over the
experts runs rows [0, count_e) of each through the same per-expert arithmetic and returns them unweighted (the
dispatcher's combine weights and sums them, pd.moe.dispatcher.base.sum_expert_rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pd.moe.dispatcher.base import CombineInput, DispatchFormat, DispatchOutput
from pd.moe.runner import ExpertScales

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu": F.gelu}

# dtypes torch._grouped_mm accepts on CPU; on it the result equals per-expert ``linear`` bit for bit.
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_available(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm can run this input (checked only on CPU; other devices use the loop)."""
    return hasattr(torch, "_grouped_mm") and x.device.type == "cpu" and x.dtype in _GROUPED_MM_DTYPES


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gate activation called ``name`` ("silu" or "gelu"). Raises ValueError for any other name."""
    act = _ACTIVATIONS.get(name)
    if act is None:
        raise ValueError(f"unknown MoE activation {name!r}; known: {', '.join(_ACTIVATIONS)}")
    return act


class TorchMoeRunner:
    """Reference runner over the dispatched tokens of one rank, in either dispatch format.

    Args:
        use_grouped_mm: True forces ``torch._grouped_mm``, False forces the loop over hit experts, None picks
            grouped_mm where it is known to work (CPU, float32/bfloat16/float16) and at least a quarter of the
            local experts received rows.
    """

    formats = (DispatchFormat.STANDARD, DispatchFormat.BATCHED)
    block_fp8 = False  # computes in the model dtype: FusedMoE dequantizes FP8 experts for it

    def __init__(self, use_grouped_mm: bool | None = None) -> None:
        self.use_grouped_mm = use_grouped_mm

    def run(
        self,
        dispatch_out: DispatchOutput,
        w13_EXH: torch.Tensor,
        w2_EHI: torch.Tensor,
        activation: str = "silu",
        scales: ExpertScales | None = None,
    ) -> CombineInput:
        """Compute this rank's experts for the dispatched tokens.

        Args:
            dispatch_out: standard: hidden_states [N, H] (model dtype), topk_ids [N, K] int64 local ids (-1 = not
                on this rank), topk_weights [N, K] float32. Batched: hidden_states [E_local, max_rows, H],
                expert_counts [E_local] int32 (read on the host here).
            w13_EXH: [E_local, 2*I, H] fused gate (rows [0:I]) and up (rows [I:2I]) projections, model dtype.
            w2_EHI: [E_local, H, I] down projections, model dtype.
            activation: "silu" or "gelu", applied to the gate half.
            scales: None (block_fp8 is False).

        Returns:
            Standard: CombineInput whose hidden_states [N, H] (model dtype) is, per token, the sum over its local
            slots of weight * down(act(gate(x)) * up(x)); tokens with no local slot get zeros. Batched:
            hidden_states [E_local, max_rows, H], row j < count_e of expert e is down(act(gate(x)) * up(x)),
            unweighted, and the rows past the counts are zeros. The handle is passed on.

        Raises:
            ValueError: unknown activation, an expert id >= E_local, or a count outside [0, max_rows].
        """
        act = get_activation(activation)
        assert scales is None, "FP8 experts are dequantized for this runner (block_fp8 = False)"
        num_experts = w13_EXH.shape[0]
        assert dispatch_out.hidden_states.dtype == w13_EXH.dtype == w2_EHI.dtype
        if dispatch_out.format == DispatchFormat.BATCHED:
            return _run_batched(dispatch_out, w13_EXH, w2_EHI, act)
        perm = pre_permute(dispatch_out, num_experts)
        if perm.num_rows == 0:
            return post_permute(dispatch_out, perm, perm.x_MH)

        segments = _segments(perm.sizes_E)
        if self.use_grouped_mm is None:
            # CPU grouped_mm walks every expert, empty or not; a Python loop costs more per expert but only
            # visits the hit ones, so it wins when few experts are hit (small decode batches, many experts).
            use_gmm = _grouped_mm_available(perm.x_MH) and 4 * len(segments) >= num_experts
        else:
            use_gmm = self.use_grouped_mm
        offs = torch.cumsum(perm.counts_E, 0, dtype=torch.int32) if use_gmm else None

        gate_up_MX = _grouped_linear(perm.x_MH, w13_EXH, segments, offs)
        gate_MI, up_MI = gate_up_MX.chunk(2, dim=-1)
        inter_MI = act(gate_MI).mul_(up_MI)
        down_MH = _grouped_linear(inter_MI, w2_EHI, segments, offs)
        return post_permute(dispatch_out, perm, down_MH)

    def prepare_weights(self, w13_EXH: torch.Tensor, w2_EHI: torch.Tensor) -> None:
        """Nothing to prepare: this runner reads the weights as they are."""


def _run_batched(dispatch_out: DispatchOutput, w13_EXH: torch.Tensor, w2_EHI: torch.Tensor,
                 act: Callable[[torch.Tensor], torch.Tensor]) -> CombineInput:  # fmt: skip
    """The batched format as a masked loop over the experts: rows [0, count_e) of expert e through its MLP."""
    x_EMH = dispatch_out.hidden_states
    assert dispatch_out.expert_counts is not None
    num_experts, max_rows, _ = x_EMH.shape
    if num_experts != w13_EXH.shape[0]:
        raise ValueError(f"batched hidden states hold {num_experts} experts, the weights {w13_EXH.shape[0]}")
    counts = dispatch_out.expert_counts.tolist()  # the reference's host sync
    if any(not 0 <= n <= max_rows for n in counts):
        raise ValueError(f"expert_counts {counts} outside [0, max_rows={max_rows}]")
    out_EMH = torch.zeros_like(x_EMH)
    for expert, rows in enumerate(counts):
        if rows == 0:
            continue
        gate_MI, up_MI = torch.mm(x_EMH[expert, :rows], w13_EXH[expert].t()).chunk(2, dim=-1)
        torch.mm(act(gate_MI).mul_(up_MI), w2_EHI[expert].t(), out=out_EMH[expert, :rows])
    return CombineInput(hidden_states=out_EMH, handle=dispatch_out.handle)


@dataclass
class PermutedRows:
    """A rank's local (token, slot) pairs, sorted by local expert: the rows every runner's GEMMs consume.

    x_MH: [M, H] model dtype, one hidden row per local pair (M = number of local pairs), expert-major.
    order_M: [M] int64, each row's index into the slot-major flattening ``topk_ids.t().flatten()`` ([K*N]).
    token_idx_M: [M] int64, the dispatched token each row belongs to.
    counts_E: [E_local] int64, rows per local expert.
    sizes_E: counts_E on the host (the permute's host sync).
    """

    x_MH: torch.Tensor
    order_M: torch.Tensor
    token_idx_M: torch.Tensor
    counts_E: torch.Tensor
    sizes_E: list[int]

    @property
    def num_rows(self) -> int:
        return int(self.x_MH.shape[0])


def pre_permute(dispatch_out: DispatchOutput, num_experts: int) -> PermutedRows:
    """Group the dispatched (token, slot) pairs by local expert.

    Args:
        dispatch_out: hidden_states [N, H], topk_ids [N, K] int64 local ids (-1 = not on this rank).
        num_experts: E_local.

    Returns:
        PermutedRows; M == 0 when no slot is local.

    Raises:
        ValueError: an expert id >= num_experts.
    """
    hidden_NH = dispatch_out.hidden_states
    ids_NK = dispatch_out.topk_ids
    assert ids_NK is not None, "pre_permute takes the standard format"
    num_tokens = ids_NK.shape[0]
    assert hidden_NH.shape[0] == num_tokens
    # Slot-major (slot, token) pairs. Key = id + 1, so foreign slots (-1) form bucket 0 ahead of every local
    # expert, and the stable sort orders each expert's rows by (slot, token) like transformers' per-expert
    # loop: a GEMM's rounding can depend on where a row sits, so same order, same bits.
    keys = ids_NK.t().flatten() + 1
    counts = torch.bincount(keys, minlength=num_experts + 1)
    if counts.numel() != num_experts + 1:
        raise ValueError(f"topk_ids hold a local expert id >= num_local_experts={num_experts}")
    sizes = counts.tolist()  # a host sync (post_permute has the other): loops over experts need plain ints
    order = torch.argsort(keys, stable=True)[sizes[0] :]
    token_idx = order % num_tokens
    x_MH = hidden_NH.index_select(0, token_idx)
    return PermutedRows(x_MH, order, token_idx, counts[1:], sizes[1:])


def post_permute(dispatch_out: DispatchOutput, perm: PermutedRows, down_MH: torch.Tensor) -> CombineInput:
    """Scale each expert output row by its routing weight and sum the rows back per token.

    The sum is deterministic: per token, its K slot rows in ascending slot order (k = 0, 1, ...), accumulated in
    float32, cast to the model dtype once; slots without a local expert add nothing.

    Args:
        dispatch_out: the DispatchOutput ``perm`` was built from (topk_weights [N, K] float32, handle).
        perm: from pre_permute.
        down_MH: [M, H] model dtype, expert outputs in perm's row order (may be overwritten).

    Returns:
        CombineInput with hidden_states [N, H] (model dtype; zeros for tokens without a local slot).
    """
    hidden_NH = dispatch_out.hidden_states
    assert dispatch_out.topk_ids is not None and dispatch_out.topk_weights is not None, "standard format only"
    num_tokens, top_k = dispatch_out.topk_ids.shape
    dtype = hidden_NH.dtype
    if perm.num_rows == 0:
        return CombineInput(hidden_states=hidden_NH.new_zeros(num_tokens, hidden_NH.shape[1]),
                            handle=dispatch_out.handle)  # fmt: skip
    # Weight in float32, like HF, so bf16 rows are scaled in float32; cast.
    weights_M1 = dispatch_out.topk_weights.t().flatten().index_select(0, perm.order_M).unsqueeze(1)
    if down_MH.dtype == weights_M1.dtype:
        weighted_MH = down_MH.mul_(weights_M1)
    else:
        weighted_MH = (down_MH * weights_M1).to(dtype)
    # Slot by slot (k = 0, 1, ...), each slot's rows added to their tokens: a token meets at most one row per
    # slot, so no two additions of one index_add_ touch the same element and the result does not depend on how
    # the device orders them (index_add_ with repeated indices is nondeterministic on CUDA).
    slot_M = perm.order_M // num_tokens  # order_M is slot-major: k * N + t
    by_slot = torch.argsort(slot_M, stable=True)
    sizes = torch.bincount(slot_M, minlength=top_k).tolist()  # a host sync, like pre_permute's
    out_NH = hidden_NH.new_zeros(num_tokens, hidden_NH.shape[1], dtype=torch.float32)
    for rows in by_slot.split(sizes):
        out_NH.index_add_(0, perm.token_idx_M.index_select(0, rows), weighted_MH.index_select(0, rows).float())
    return CombineInput(hidden_states=out_NH.to(dtype), handle=dispatch_out.handle)


def _segments(sizes_E: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) row ranges of the experts that received rows, in expert order."""
    segments = []
    start = 0
    for expert, size in enumerate(sizes_E):
        if size:
            segments.append((expert, start, start + size))
            start += size
    return segments


def _grouped_linear(
    x_MK: torch.Tensor, w_EOK: torch.Tensor, segments: list[tuple[int, int, int]], offs_E: torch.Tensor | None
) -> torch.Tensor:
    """Rows sorted by expert, [M, K] -> [M, O]: rows [start, end) of expert e times w_EOK[e].T.

    offs_E ([E] int32 cumulative row counts) selects torch._grouped_mm; None selects a loop over ``segments``,
    the (expert, start, end) triples of the non-empty experts.
    """
    if offs_E is not None:
        return torch._grouped_mm(x_MK, w_EOK.transpose(-2, -1), offs=offs_E)
    y_MO = x_MK.new_empty(x_MK.shape[0], w_EOK.shape[1])
    for expert, start, end in segments:
        torch.mm(x_MK[start:end], w_EOK[expert].t(), out=y_MO[start:end])
    return y_MO
