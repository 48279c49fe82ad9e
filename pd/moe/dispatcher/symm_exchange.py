"""The torch backend's transport over CUDA symmetric memory: ranks write rows straight into peers' buffers.

Over NCCL, dispatch and combine are ``all_to_all_single`` calls whose per-call rendezvous and proxy cost ~100 us
even for a few MB, and normal mode adds a count all-to-all and a host sync before the data moves. When every
rank of the expert group is a CUDA device of one host (NVLink or PCIe peer access), ``torch.distributed.
_symmetric_memory`` maps every rank's buffers into every process, so a rank writes its rows straight into the
peers' receive buffers (one Triton kernel, pd.moe.dispatcher.symm_kernels) and a barrier on the signal pads
tells everyone the data is in. Low-latency mode is then device work only (no host sync, graph-capturable).
Normal mode sends its rows at once into blocks of the capacity all ranks agreed on, with its row and token counts
into the peers' meta buffers; after the barrier the host reads the counts (its one sync). A batch larger than the
blocks grows them on every rank alike and is sent again (a second barrier), so only growth costs extra.

Buffers, shared by every MoE layer of the instance (the instance's CommResources holds them, made on first use:
pd.moe.dispatcher.comm_resources):
  SymmetricExchange (per group, capacity C and row shape):
    dispatch [R, C, row_bytes] uint8: block s holds the rows rank s sent to this rank;
    combine  [R, C, H] model dtype:   block s holds rank s's partial outputs for this rank's tokens.
  SymmetricMeta (per group): [R, 2] int64, row s = (rows rank s sends here, rank s's token count).
Why one set is enough when layers run one after another: a rank writes into a peer's buffer only after a
barrier that the peer reaches only after it consumed that buffer's previous contents (its stream runs the
consumer first). Two micro-batches in flight at once (two-batch overlap) would need a second set.
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

# Set to 0 to keep the torch backend on NCCL all-to-all even where symmetric memory works (to compare them).
ENV_ENABLE = "PD_TORCH_A2A_SYMM_MEM"
BARRIER_TIMEOUT_MS = 60_000  # a peer that never arrives fails the barrier instead of hanging the instance


def symmetric_memory_usable(group: ProcessGroup | None, device: torch.device) -> bool:
    """Whether this group can use the symmetric transport: CUDA, NCCL, Triton, every rank on this host, and
    not switched off. A collective over ``group`` (the hostname check) once the cheap checks pass, so call it
    on every rank."""
    if group is None or device.type != "cuda" or os.environ.get(ENV_ENABLE, "1") == "0":
        return False
    if dist.get_backend(group) != "nccl":
        return False
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
        import triton  # noqa: F401 - the transport's kernels
    except ImportError:
        return False
    hosts: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return len(set(hosts)) == 1


def _symmetric(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, group: ProcessGroup
               ) -> tuple[torch.Tensor, object, torch.Tensor]:  # fmt: skip
    """(local tensor, handle, [R] int64 device tensor of every rank's copy's address here). Collective."""
    import torch.distributed._symmetric_memory as symm_mem

    if torch.torch_version.TorchVersion(torch.__version__) < (2, 8):
        if not symm_mem.is_symm_mem_enabled_for_group(group.group_name):
            symm_mem.enable_symm_mem_for_group(group.group_name)
    local = symm_mem.empty(*shape, dtype=dtype, device=device)
    handle = symm_mem.rendezvous(local, group)
    ptrs = [handle.get_buffer(p, shape, dtype).data_ptr() for p in range(dist.get_world_size(group))]
    return local, handle, torch.tensor(ptrs, dtype=torch.int64, device=device)


class SymmetricExchange:
    """Dispatch and combine buffers of one expert group for rows of one shape, ``capacity`` rows per block."""

    def __init__(self, group: ProcessGroup, capacity: int, row_bytes: int, hidden: int, dtype: torch.dtype,
                 device: torch.device) -> None:  # fmt: skip
        ranks = dist.get_world_size(group)
        self.capacity = capacity
        self.dispatch_buffer, self._handle, self.dispatch_peer_ptrs = _symmetric(
            (ranks, capacity, row_bytes), torch.uint8, device, group
        )
        self.combine_buffer, _, self.combine_peer_ptrs = _symmetric((ranks, capacity, hidden), dtype, device, group)
        # low_latency's received layout: every block full
        self.full_counts = torch.full((ranks,), capacity, dtype=torch.int64, device=device)
        logger.info("symmetric-memory exchange: %d ranks, %d rows per block, %.1f MiB per rank", ranks, capacity,
                    (self.dispatch_buffer.nbytes + self.combine_buffer.nbytes) / 2**20)  # fmt: skip

    def barrier(self) -> None:
        """Every rank's writes issued before this (on its current stream) are visible to all ranks after it."""
        self._handle.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)


class SymmetricMeta:
    """Per group: what each rank sends each peer in normal mode (rows, token count), normal mode's barrier, and
    its current block capacity."""

    def __init__(self, group: ProcessGroup, device: torch.device) -> None:
        self.buffer, self._handle, self.peer_ptrs = _symmetric(
            (dist.get_world_size(group), 2), torch.int64, device, group
        )
        # Normal mode's rows per block, the same on every rank: 0 until the first dispatch, then grown (by every
        # rank alike, from the token counts all of them read here) when a batch does not fit.
        self.normal_capacity = 0

    def barrier(self) -> None:
        self._handle.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)

