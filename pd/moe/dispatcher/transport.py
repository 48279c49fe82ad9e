"""The torch backend's transports (pd.moe.dispatcher.torch_a2a): how one dispatcher's rows move between ranks.

A transport moves a batch in the dispatcher's mode and returns the DispatchOutput; the output's handle carries
what combine needs and finishes the batch itself, over the transport that dispatched it, so the dispatcher's
combine never asks which transport that was. Implementations:

  AllToAllTransport  (a2a_transport):  all_to_all_single on any backend; the only one that can also start a
                                       dispatch or combine and leave it in flight (AsyncHandle)
  SymmetricTransport (symm_transport): CUDA symmetric memory, every rank of the group on one host; its normal
                                       mode replays small batches from CUDA graphs (symm_graphs, GraphedHandle)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from pd.moe.dispatcher.base import DispatchOutput
from pd.moe.topk import TopKOutput


class TransportHandle(ABC):
    """State one dispatch left for its combine."""

    @abstractmethod
    def combine(self, x: torch.Tensor) -> torch.Tensor:
        """Synchronous combine of this dispatch's rows: ``x`` is the runner's output for them (the dispatcher's
        combine input, see TorchA2ADispatcher.combine); returns [T, H], this rank's tokens summed over ranks."""


class AsyncHandle(TransportHandle):
    """A handle whose combine can be started and left in flight."""

    @abstractmethod
    def combine_start(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        """combine with its transfer started; the returned call waits for it and returns what combine would."""

    def combine(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine_start(x)()


class Transport(ABC):
    """Moves one dispatcher's batches (its mode, group and placement are fixed at construction)."""

    @abstractmethod
    def dispatch(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        """Synchronous dispatch (see TorchA2ADispatcher.dispatch for shapes); the handle is a TransportHandle."""
