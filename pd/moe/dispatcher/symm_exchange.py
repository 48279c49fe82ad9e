"""Low-latency dispatch/combine transport over CUDA symmetric memory: ranks write rows into peers' buffers.

The torch backend's low_latency mode moves a fixed [C, row] block between every pair of ranks. Over NCCL that
is an ``all_to_all_single`` per direction, whose rendezvous and proxy cost ~100 us even for a few MB. When
every rank of the expert group is a CUDA device of one host (NVLink or PCIe peer access), each rank can
instead write its block for peer p straight into p's receive buffer (one kernel per peer, peer memory mapped
into this process by ``torch.distributed._symmetric_memory``), and a barrier on the allocation's signal pads
tells everyone the data is in. All of it is stream-ordered device work: no host sync, capturable in a CUDA
graph.

Buffers, one set per expert group and shape, shared by every MoE layer of the instance:
  dispatch: [R, C, row_bytes] uint8 on each rank; block s holds what rank s sent to this rank.
  combine:  [R, C, H] model dtype; block s holds rank s's partial outputs for this rank's tokens.
Why one set is enough when layers run one after another: a rank writes into a peer's dispatch buffer only
after the previous combine barrier, which the peer reaches only after it unpacked that buffer (its stream
runs unpack before it); the same holds for the combine buffer with the dispatch barrier. Two micro-batches
in flight at once (two-batch overlap) would need a second set.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

logger = logging.getLogger(__name__)

# Set to 0 to keep low_latency mode on NCCL all-to-all even where symmetric memory works (to compare them).
ENV_ENABLE = "PD_TORCH_A2A_SYMM_MEM"
BARRIER_TIMEOUT_MS = 60_000  # a peer that never arrives fails the barrier instead of hanging the instance

_exchanges: dict[tuple, SymmetricExchange] = {}


def symmetric_memory_usable(group: ProcessGroup | None, device: torch.device) -> bool:
    """Whether this group can use SymmetricExchange: CUDA, NCCL, Triton, every rank on this host, not switched off.

    A collective over ``group`` (the hostname check) when the cheap checks pass, so call it on every rank.
    """
    if group is None or device.type != "cuda" or os.environ.get(ENV_ENABLE, "1") == "0":
        return False
    if dist.get_backend(group) != "nccl":
        return False
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
        import triton  # noqa: F401 - the exchange's kernels
    except ImportError:
        return False
    hosts: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return len(set(hosts)) == 1


class SymmetricExchange:
    """The dispatch and combine buffers of one expert group, with each peer's block mapped here.

    Args:
        group: the expert-parallel group (NCCL, one host); rendezvous is collective over it.
        capacity: C, rows per (source, destination) block.
        row_bytes: bytes per dispatched row (pd.moe.dispatcher.payload).
        hidden: H of the combine rows; dtype: their dtype.
        device: this rank's CUDA device.
    """

    def __init__(
        self, group: ProcessGroup, capacity: int, row_bytes: int, hidden: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        ranks = dist.get_world_size(group)
        before_2_8 = torch.torch_version.TorchVersion(torch.__version__) < (2, 8)
        if before_2_8 and not symm_mem.is_symm_mem_enabled_for_group(group.group_name):
            symm_mem.enable_symm_mem_for_group(group.group_name)  # needed before torch 2.8
        self.dispatch_buffer = symm_mem.empty(ranks, capacity, row_bytes, dtype=torch.uint8, device=device)
        self.combine_buffer = symm_mem.empty(ranks, capacity, hidden, dtype=dtype, device=device)
        self._dispatch_handle = symm_mem.rendezvous(self.dispatch_buffer, group)
        combine_handle = symm_mem.rendezvous(self.combine_buffer, group)
        # Where each rank's buffers are mapped in this process, for the kernels (pd.moe.dispatcher.symm_kernels).
        self.dispatch_peer_ptrs = torch.tensor(
            [self._dispatch_handle.get_buffer(p, tuple(self.dispatch_buffer.shape), torch.uint8).data_ptr()
             for p in range(ranks)], dtype=torch.int64, device=device,
        )  # fmt: skip
        self.combine_peer_ptrs = torch.tensor(
            [combine_handle.get_buffer(p, tuple(self.combine_buffer.shape), dtype).data_ptr() for p in range(ranks)],
            dtype=torch.int64, device=device,
        )  # fmt: skip
        self._combine_handle = combine_handle
        logger.info(
            "low_latency dispatch over symmetric memory: %d ranks, %d rows per block, %.1f MiB per rank",
            ranks, capacity, (self.dispatch_buffer.nbytes + self.combine_buffer.nbytes) / 2**20,
        )

    def barrier(self) -> None:
        """Every rank's writes issued before this (on its current stream) are visible to every rank after it."""
        self._dispatch_handle.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)


def symmetric_exchange_for(
    group: ProcessGroup, capacity: int, row_bytes: int, hidden: int, dtype: torch.dtype, device: torch.device
) -> SymmetricExchange:
    """The instance's exchange for this group and shape, created (collectively) on first use."""
    key = (group.group_name, capacity, row_bytes, hidden, dtype, device)
    if key not in _exchanges:
        _exchanges[key] = SymmetricExchange(group, capacity, row_bytes, hidden, dtype, device)
    return _exchanges[key]
