"""The one owner of an instance's MoE communication resources on this rank.

Every MoE layer of a rank is built from the same MoeContext, and so shares its ``comm``: one CommResources that
holds what the layers communicate through and must not allocate once per layer: the symmetric-memory meta
buffers, exchanges and small-batch CUDA graphs of the torch backend (pd.moe.dispatcher.symm_exchange,
symm_graphs), DeepEP's buffers (they pin and register device memory with every peer) and the single-batch
overlap stream. Objects are keyed by process group (its name) and shape, so one owner serves any group.

Making an object may be collective (symmetric memory rendezvous, DeepEP buffers): every rank asks for the same
objects in the same order, which holds because all ranks run the same forwards through the same layers.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup

    from pd.moe.dispatcher.symm_exchange import SymmetricExchange, SymmetricMeta
    from pd.moe.dispatcher.symm_graphs import SmallBatchGraphs

T = TypeVar("T")


class CommResources:
    """Objects made on first use and kept for the life of the instance (never freed: buffers registered with
    peers stay valid only while every rank keeps its own)."""

    def __init__(self) -> None:
        self._objects: dict[Hashable, object] = {}

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        """The object for ``key``, made by ``make()`` at the first call (collectively where ``make`` is)."""
        if key not in self._objects:
            self._objects[key] = make()
        return self._objects[key]  # type: ignore[return-value]

    def symmetric_meta(self, group: ProcessGroup, device: torch.device) -> SymmetricMeta:
        """The meta buffer of ``group`` (normal mode's counts, barrier and block capacity). Collective."""
        from pd.moe.dispatcher.symm_exchange import SymmetricMeta

        return self.get(("meta", group.group_name, device), lambda: SymmetricMeta(group, device))

    def symmetric_exchange(self, group: ProcessGroup, capacity: int, row_bytes: int, hidden: int,
                           dtype: torch.dtype, device: torch.device) -> SymmetricExchange:  # fmt: skip
        """The dispatch and combine buffers of ``group`` for rows of this shape, ``capacity`` rows per block.
        Collective."""
        from pd.moe.dispatcher.symm_exchange import SymmetricExchange

        return self.get(("exchange", group.group_name, capacity, row_bytes, hidden, dtype, device),
                        lambda: SymmetricExchange(group, capacity, row_bytes, hidden, dtype, device))  # fmt: skip

    def small_batch_graphs(self, exchange: SymmetricExchange, meta: SymmetricMeta, my_rank: int,
                           num_local_experts: int, top_k: int, ids_at: int, row_bytes: int
                           ) -> SmallBatchGraphs:  # fmt: skip
        """The graphs of this exchange for this rank's routing (nothing collective: captured on first use)."""
        from pd.moe.dispatcher.symm_graphs import SmallBatchGraphs

        # id(exchange) is stable: this owner keeps every exchange it made.
        key = ("small-batch-graphs", id(exchange), my_rank, num_local_experts, top_k)
        return self.get(key, lambda: SmallBatchGraphs(exchange, meta, my_rank, num_local_experts, top_k, ids_at,
                                                      row_bytes))  # fmt: skip
