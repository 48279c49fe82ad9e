"""The dispatcher contract: move routed tokens to the ranks that own their experts, and bring results back.

A dispatch output comes in one of two formats (``DispatchFormat``), and a runner declares which it takes:

- standard: token rows ``[N, H]``, each with its K local expert ids (-1 = another rank's) and weights. The runner
  groups the (token, slot) pairs by expert itself and returns per-token weighted sums ``[N, H]``.
- batched: already grouped per local expert, ``[E_local, max_rows, H]`` with a row count per expert (what
  low-latency dispatch produces: static shapes, no host sync). The runner computes rows ``[0, count_e)`` of each
  expert and returns them unweighted, ``[E_local, max_rows, H]``; the dispatcher's combine applies the routing
  weights (DeepEP's ``low_latency_combine`` does, so every batched producer does). Rows past a count hold
  anything, on the way in and on the way out: nothing reads them.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pd.moe.topk import TopKOutput


class DispatchFormat(str, enum.Enum):
    """Layout of a DispatchOutput (and of the CombineInput computed from it); see the module docstring."""

    STANDARD = "standard"
    BATCHED = "batched"


@dataclass
class DispatchOutput:
    """What one rank receives from dispatch.

    Standard format:
        hidden_states: [N, H] model dtype, the tokens this rank computes on (N = T for the EP=1 bypass).
        topk_ids: [N, K] int64 LOCAL expert ids in [0, num_local_experts); -1 marks slots owned by other ranks.
        topk_weights: [N, K] float32 combine weights of those slots.
    Batched format (``DispatchOutput.batched``):
        hidden_states: [E_local, max_rows, H] model dtype; rows [0, expert_counts[e]) of expert e are its tokens,
            the rows past them hold anything.
        expert_counts: [E_local] int32 on the hidden states' device, in [0, max_rows]. Runners on the fast path
            never read it on the host.
        topk_ids, topk_weights: None (combine applies the weights; the dispatcher keeps them in the handle).
    handle: opaque state that this dispatcher's combine needs (layouts, counts); it travels with the data so
        a dispatcher object keeps no per-batch state and two micro-batches can be in flight at once.
    """

    hidden_states: torch.Tensor
    topk_ids: torch.Tensor | None
    topk_weights: torch.Tensor | None
    handle: object
    format: DispatchFormat = DispatchFormat.STANDARD
    expert_counts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.format == DispatchFormat.BATCHED:
            assert self.hidden_states.dim() == 3 and self.topk_ids is None and self.topk_weights is None
            assert self.expert_counts is not None and self.expert_counts.shape == self.hidden_states.shape[:1]
            assert self.expert_counts.dtype == torch.int32, self.expert_counts.dtype
        else:
            assert self.format == DispatchFormat.STANDARD and self.expert_counts is None, self.format
            assert self.topk_ids is not None and self.topk_weights is not None
            assert self.hidden_states.dim() == 2 and self.topk_ids.shape[0] == self.hidden_states.shape[0]

    @classmethod
    def batched(cls, hidden_EMH: torch.Tensor, expert_counts_E: torch.Tensor, handle: object) -> DispatchOutput:
        """A batched-format output: hidden [E_local, max_rows, H], counts [E_local] int32 (see the class)."""
        return cls(hidden_EMH, None, None, handle, DispatchFormat.BATCHED, expert_counts_E)


@dataclass
class CombineInput:
    """What a runner hands back to combine; its layout follows the DispatchOutput it was computed from.

    hidden_states: standard: [N, H] model dtype, per received token the weighted sum over its local experts'
        outputs. Batched: [E_local, max_rows, H] model dtype, each expert's output for its rows [0, count_e),
        unweighted; rows past the counts hold anything and combine ignores them.
    handle: the handle of the DispatchOutput it was computed from.
    """

    hidden_states: torch.Tensor
    handle: object


@dataclass(frozen=True)
class ExpertRows:
    """Where the local slots of token rows sit in a batched layout (from ``batch_by_expert``).

    slot_NK: [N, K] int64, row ``e * max_rows + j`` of the flattened [E_local * max_rows, H] layout for a local
        slot (expert e, row j), -1 for another rank's slot. A token with two slots on one expert has one row.
    weights_NK: [N, K] float32 routing weights of those slots.
    max_rows: rows per expert of the layout (= N).
    """

    slot_NK: torch.Tensor
    weights_NK: torch.Tensor
    max_rows: int


def batch_by_expert(hidden_NH: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor,
                    num_local_experts: int) -> tuple[torch.Tensor, torch.Tensor, ExpertRows]:  # fmt: skip
    """Token rows -> the batched format, on the device without a host sync or a sort (static shapes).

    Each expert's rows are its tokens in (slot, token) order, the order the reference runner's pre_permute gives
    them, so the reference computes the same rows in both formats.

    Args:
        hidden_NH: [N, H] model dtype. ids_NK: [N, K] int64 local ids, -1 = not here (ids >= num_local_experts are
            not checked: that needs a host sync). weights_NK: [N, K] float32.
        num_local_experts: E_local.

    Returns:
        (hidden [E_local, N, H] with the rows past the counts unwritten; counts [E_local] int32; ExpertRows for
        ``sum_expert_rows``).
    """
    num_rows, top_k = ids_NK.shape
    local_NK = ids_NK >= 0
    # A token with two slots on one expert (not produced by top-k routing, but legal) gets one row, at the first.
    same_NKK = ids_NK[:, :, None] == ids_NK[:, None, :]
    first_slot_NK = same_NKK.to(torch.int32).argmax(dim=-1)  # the first slot holding this slot's expert
    first_NK = local_NK & (first_slot_NK == torch.arange(top_k, device=ids_NK.device))
    # Rows numbered per expert by a running count over the (slot, token) pairs; column 0 takes the others.
    key_P = torch.where(first_NK, ids_NK, -1).t().reshape(-1, 1)
    hits_PE = torch.zeros(top_k * num_rows, num_local_experts + 1, dtype=torch.int32, device=ids_NK.device)
    hits_PE.scatter_(1, key_P + 1, 1)
    row_P = (torch.cumsum(hits_PE, dim=0) - 1).gather(1, key_P + 1)
    counts_E = hits_PE[:, 1:].sum(dim=0, dtype=torch.int32)
    slot_NK = torch.where(first_NK, ids_NK * num_rows + row_P.view(top_k, num_rows).t(), -1)
    slot_NK = torch.where(local_NK, slot_NK.gather(1, first_slot_NK), -1)
    # One extra row takes the copies of the slots that own no row; it is dropped.
    trash = num_local_experts * num_rows
    out = hidden_NH.new_empty(trash + 1, hidden_NH.shape[1])
    for k in range(top_k):
        out.index_copy_(0, torch.where(first_NK[:, k], slot_NK[:, k], trash), hidden_NH)
    hidden_EMH = out[:trash].view(num_local_experts, num_rows, hidden_NH.shape[1])
    return hidden_EMH, counts_E, ExpertRows(slot_NK, weights_NK.float(), num_rows)


def sum_expert_rows(out_EMH: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
    """Batched expert outputs -> per token row, the weighted sum over its local slots: [N, H] model dtype.

    The reference runner's arithmetic (pd.moe.runner.torch_ref.post_permute): each slot's output times its float32
    weight, rounded to the model dtype, added in ascending slot order in float32 from 0.0, cast once; foreign slots
    add nothing and rows without a local slot get zeros. No host sync.
    """
    num_local_experts, max_rows, hidden = out_EMH.shape
    assert max_rows == rows.max_rows, (out_EMH.shape, rows.max_rows)
    flat = out_EMH.reshape(num_local_experts * max_rows, hidden)
    acc_NH = out_EMH.new_zeros(rows.slot_NK.shape[0], hidden, dtype=torch.float32)
    for k in range(rows.slot_NK.shape[1]):
        slot_N = rows.slot_NK[:, k]
        term_NH = (flat.index_select(0, slot_N.clamp(min=0)) * rows.weights_NK[:, k, None]).to(out_EMH.dtype)
        acc_NH += torch.where(slot_N[:, None] >= 0, term_NH.float(), 0.0)  # the where also drops unread rows' NaNs
    return acc_NH.to(out_EMH.dtype)


class Dispatcher(ABC):
    """Moves tokens between ranks around the expert computation.

    Implementations keep no per-batch state on ``self``; everything combine needs is in the handle.
    """

    @property
    def output_format(self) -> DispatchFormat:
        """The format of every DispatchOutput this dispatcher returns (a runner must take it)."""
        return DispatchFormat.STANDARD

    @abstractmethod
    def dispatch(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        """Send each token to the ranks owning its selected experts.

        Args:
            hidden_TH: [T, H] this rank's tokens, model dtype.
            topk: routing of those T tokens (logical/physical expert ids, float32 weights).

        Returns:
            DispatchOutput with the tokens this rank must compute on, in ``output_format``.
        """

    @abstractmethod
    def combine(self, combine_input: CombineInput) -> torch.Tensor:
        """Return [T, H] in the original token order of this rank: the sum over ranks of the partial outputs."""

    def dispatch_start(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> Callable[[], DispatchOutput]:
        """Starts dispatch and returns the call that finishes it. Work between the two (another micro-batch's
        attention) overlaps the transfer where the backend supports it; by default it all happens here. The
        same collectives in the same order as dispatch, so ranks may mix the two."""
        out = self.dispatch(hidden_TH, topk)
        return lambda: out

    def combine_start(self, combine_input: CombineInput) -> Callable[[], torch.Tensor]:
        """Starts combine and returns the call that finishes it (see dispatch_start)."""
        out = self.combine(combine_input)
        return lambda: out
