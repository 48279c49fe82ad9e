"""The dispatcher contract: move routed tokens to the ranks that own their experts, and bring results back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pd.moe.topk import TopKOutput


@dataclass
class DispatchOutput:
    """What one rank receives from dispatch.

    hidden_states: [N, H] the tokens this rank computes on (N = T for the EP=1 bypass).
    topk_ids: [N, K] int64 LOCAL expert ids in [0, num_local_experts); -1 marks slots owned by other ranks.
    topk_weights: [N, K] float32 combine weights of those slots.
    handle: opaque state that this dispatcher's combine needs (layouts, counts); it travels with the data so
        a dispatcher object keeps no per-batch state and two micro-batches can be in flight at once.
    """

    hidden_states: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    handle: object


@dataclass
class CombineInput:
    """What a runner hands back to combine.

    hidden_states: [N, H] per received token, the weighted sum over its local experts' outputs.
    handle: the handle of the DispatchOutput it was computed from.
    """

    hidden_states: torch.Tensor
    handle: object


class Dispatcher(ABC):
    """Moves tokens between ranks around the expert computation.

    Implementations keep no per-batch state on ``self``; everything combine needs is in the handle.
    """

    @abstractmethod
    def dispatch(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        """Send each token to the ranks owning its selected experts.

        Args:
            hidden_TH: [T, H] this rank's tokens, model dtype.
            topk: routing of those T tokens (logical/physical expert ids, float32 weights).

        Returns:
            DispatchOutput with the tokens this rank must compute on.
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
