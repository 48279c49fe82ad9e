"""The ``none`` backend: every rank already holds every token, computes its own experts, and the group all-reduces.

This is the EP < TP layout (SGLang's ``--moe-a2a-backend none``): attention runs tensor-parallel, so the hidden
states entering the MoE layer are replicated on all ranks of the group. Nothing moves at dispatch; each rank
masks the routing to its local expert block, and combine sums the per-rank partial outputs with one all-reduce.
Because dispatch never exchanges tokens, no token is sent twice and no capacity bound applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pd.moe.context import MoeContext
from pd.moe.dispatcher.base import CombineInput, Dispatcher, DispatchOutput
from pd.moe.dispatcher.routing import expert_group, local_ids_for, owner_rank
from pd.moe.topk import TopKOutput


@dataclass(frozen=True)
class AllReduceHandle:
    """State combine needs: the token count T dispatch saw (combine checks the runner kept it)."""

    num_tokens: int


class AllReduceDispatcher(Dispatcher):
    """Replicated-token dispatcher: local masking at dispatch, sum all-reduce at combine.

    Args:
        ctx: placement and the process group (``ctx.group``, required when ep_size > 1); every rank of the group
            must call dispatch/combine with the same tokens, in the same order.
        num_experts: E, the number of (physical) experts the router's ids refer to; ep_size must divide it.

    Raises:
        ValueError: ep_size does not divide num_experts, a missing group, or a group that does not match ctx.
    """

    def __init__(self, ctx: MoeContext, *, num_experts: int) -> None:
        self.num_local_experts = ctx.num_local(num_experts)
        self.ep_rank = ctx.ep_rank
        self.group = expert_group(ctx, "none")

    def dispatch(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        """Keep every token; mask routing to this rank's experts. Synchronous, no communication, no host sync.

        Args:
            hidden_TH: [T, H] model dtype, identical on every rank of the group.
            topk: topk_ids [T, K] int64 global ids (-1 = no expert), topk_weights [T, K] float32.

        Returns:
            DispatchOutput with hidden_states = hidden_TH (not copied), topk_ids [T, K] int64 local ids (-1 for
            slots owned by other ranks), topk_weights [T, K] float32 unchanged.
        """
        owner_TK = owner_rank(topk.topk_ids, self.num_local_experts)
        local_TK = local_ids_for(topk.topk_ids, owner_TK, self.ep_rank, self.num_local_experts)
        handle = AllReduceHandle(num_tokens=hidden_TH.shape[0])
        return DispatchOutput(hidden_TH, local_TK, topk.topk_weights, handle)

    def combine(self, combine_input: CombineInput) -> torch.Tensor:
        """Sum the partial outputs over the group (synchronous all-reduce, performed in place).

        Args:
            combine_input: hidden_states [T, H] model dtype (this rank's experts only), the dispatch handle.

        Returns:
            [T, H] model dtype: the same tensor, now holding the sum over all ranks (every rank gets it).
        """
        handle = combine_input.handle
        assert isinstance(handle, AllReduceHandle)
        out_TH = combine_input.hidden_states
        assert out_TH.shape[0] == handle.num_tokens, "the runner changed the token count"
        if self.group is not None:
            dist.all_reduce(out_TH, op=dist.ReduceOp.SUM, group=self.group)
        return out_TH
