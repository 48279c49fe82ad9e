"""The EP=1 bypass: one rank owns every expert, so dispatch and combine move nothing."""

from __future__ import annotations

import torch

from pd.moe.context import MoeContext
from pd.moe.dispatcher.base import CombineInput, Dispatcher, DispatchOutput
from pd.moe.topk import TopKOutput


class SingleRankDispatcher(Dispatcher):
    """Pass-through dispatcher for ep_size == 1 (local expert ids are the logical ids).

    Raises:
        ValueError: constructed with ep_size != 1.
    """

    def __init__(self, ctx: MoeContext, *, num_experts: int | None = None) -> None:
        if ctx.ep_size != 1:
            raise ValueError(f"the single_rank dispatcher needs ep_size == 1, got ep_size={ctx.ep_size}")

    def dispatch(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        """Return the inputs unchanged: hidden [T, H], topk_ids [T, K] int64, topk_weights [T, K] float32."""
        return DispatchOutput(
            hidden_states=hidden_TH, topk_ids=topk.topk_ids, topk_weights=topk.topk_weights, handle=None
        )

    def combine(self, combine_input: CombineInput) -> torch.Tensor:
        """Return the runner's [T, H] output as is (there is no other rank to sum over)."""
        return combine_input.hidden_states
