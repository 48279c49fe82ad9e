"""The symmetric-memory transport of the torch backend, both modes (the buffers and why they suffice:
pd.moe.dispatcher.symm_exchange; the kernels: symm_kernels).

Each rank writes its rows straight into the peers' blocks and a barrier tells everyone they are in. Low-latency
mode sends every row of every block and never syncs the host. Normal mode sends before it learns the row counts,
through the meta buffer, and then syncs the host once; it replays CUDA graphs for batches of at most
GRAPH_MAX_TOKENS tokens per rank (pd.moe.dispatcher.symm_graphs, whose handles finish themselves), and grows the
blocks, on every rank alike, when a batch does not fit. One set of blocks serves one batch at a time, so nothing
here can be left in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pd.moe.dispatcher.base import DispatchOutput, ExpertRows, batch_by_expert, sum_expert_rows
from pd.moe.dispatcher.payload import row_layout
from pd.moe.dispatcher.symm_exchange import SymmetricExchange, SymmetricMeta
from pd.moe.dispatcher.symm_graphs import GRAPH_MAX_TOKENS, GraphedHandle, SmallBatchGraphs, graphs_enabled
from pd.moe.dispatcher.transport import Transport, TransportHandle
from pd.moe.topk import TopKOutput

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from pd.moe.dispatcher.comm_resources import CommResources

MIN_NORMAL_CAPACITY = 256  # normal mode's symmetric blocks start with this many rows and grow by powers of two
assert MIN_NORMAL_CAPACITY >= GRAPH_MAX_TOKENS, "a graphed small batch must fit the blocks without growing them"


@dataclass(frozen=True)
class SymmetricHandle(TransportHandle):
    """State for combine over symmetric memory (both modes). pos_RT: [R, T] int32, the slot token t took in
    rank r's block (-1: not sent there); counts_R: [R] int64 on the device, rows received from each source;
    valid_N: [N] bool, received rows that hold a token; exchange and barrier: where the rows went; expert_rows
    (low_latency only): where the N received rows' slots sit in the batched layout the runner got."""

    transport: SymmetricTransport = field(repr=False, compare=False)
    num_tokens: int
    pos_RT: torch.Tensor
    counts_R: torch.Tensor
    valid_N: torch.Tensor
    exchange: SymmetricExchange
    barrier: Callable[[], None]
    expert_rows: ExpertRows | None = None

    def combine(self, x: torch.Tensor) -> torch.Tensor:
        return self.transport.combine(x, self)


class SymmetricTransport(Transport):
    """Both modes' dispatch and combine over symmetric memory; synchronous only.

    Args:
        mode: "normal" or "low_latency".
        group: the expert group, every rank a CUDA device of this host (the dispatcher checked it).
        ep_size, ep_rank: R and this rank.
        num_local_experts: E_local.
        max_tokens_per_rank: low_latency capacity C (checked by the dispatcher before any collective).
        comm: the instance's resources, which hold the buffers and graphs every MoE layer shares.
    """

    def __init__(self, mode: str, group: ProcessGroup, ep_size: int, ep_rank: int, num_local_experts: int,
                 max_tokens_per_rank: int, comm: CommResources) -> None:  # fmt: skip
        self.mode = mode
        self.group = group
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.num_local_experts = num_local_experts
        self.max_tokens_per_rank = max_tokens_per_rank
        self.comm = comm

    def dispatch(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        if self.mode == "low_latency":
            return self._dispatch_low_latency(hidden_TH, topk)
        return self._dispatch_normal(hidden_TH, topk)

    def _exchange(self, capacity: int, hidden_TH: torch.Tensor, top_k: int) -> tuple[SymmetricExchange, int, int]:
        """(exchange, ids offset, row bytes) for rows of this batch's shape."""
        ids_at, row_bytes = row_layout(hidden_TH.shape[1], hidden_TH.dtype, top_k)
        exchange = self.comm.symmetric_exchange(self.group, capacity, row_bytes, hidden_TH.shape[1], hidden_TH.dtype,
                                                hidden_TH.device)  # fmt: skip
        return exchange, ids_at, row_bytes

    def _dispatch_low_latency(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        from pd.moe.dispatcher import symm_kernels

        num_tokens, hidden = hidden_TH.shape
        ids_TK, top_k, ranks = topk.topk_ids, topk.topk_ids.shape[1], self.ep_size
        exchange, ids_at, row_bytes = self._exchange(self.max_tokens_per_rank, hidden_TH, top_k)
        # Every row 0..C-1 of every peer's block (blank where not routed); one barrier; unpack all R * C rows.
        pos_RT = torch.empty(ranks, num_tokens, dtype=torch.int32, device=hidden_TH.device)
        symm_kernels.send_rows(hidden_TH, ids_TK, topk.topk_weights, pos_RT, exchange.dispatch_peer_ptrs,
                               exchange.capacity, self.ep_rank, self.num_local_experts, ids_at, row_bytes,
                               all_rows=True)  # fmt: skip
        exchange.barrier()
        recv_x, local_NK, weights_NK, valid_N = symm_kernels.unpack_rows(
            exchange.dispatch_buffer, exchange.full_counts, ranks * exchange.capacity, hidden, hidden_TH.dtype,
            top_k, self.ep_rank, self.num_local_experts, ids_at,
        )  # fmt: skip
        x_EMH, counts_E, rows = batch_by_expert(recv_x, local_NK, weights_NK, self.num_local_experts)
        handle = SymmetricHandle(self, num_tokens, pos_RT, exchange.full_counts, valid_N, exchange,
                                 exchange.barrier, rows)  # fmt: skip
        return DispatchOutput.batched(x_EMH, counts_E, handle)

    def _dispatch_normal(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        from pd.moe.dispatcher import symm_kernels

        num_tokens, hidden = hidden_TH.shape
        ids_TK, top_k, device = topk.topk_ids, topk.topk_ids.shape[1], hidden_TH.device
        meta = self.comm.symmetric_meta(self.group, device)
        capacity = meta.normal_capacity
        graphs = bucket = None
        if capacity and num_tokens <= GRAPH_MAX_TOKENS:
            graphs = self._small_batch_graphs(meta, capacity, hidden_TH, top_k)
        if graphs is not None:  # the steps below, replayed from CUDA graphs (pd.moe.dispatcher.symm_graphs)
            received, bucket = graphs.send(hidden_TH, topk)
            pos_RT, counts_R = bucket.pos, graphs.counts
        else:
            # Slots per destination, and (rows, tokens) into every peer's meta. The rows go out at once into the
            # buffers of the agreed capacity; rows past it are dropped and sent again below, once they grew.
            pos_RT = symm_kernels.route(ids_TK, meta.peer_ptrs, self.ep_rank, self.num_local_experts)
            if capacity:
                self._send_normal(hidden_TH, topk, pos_RT, capacity)
            meta.barrier()
            # the counts stay for combine (peers rewrite this meta buffer at the next dispatch)
            counts_R = meta.buffer[:, 0].clone()
            received = meta.buffer.tolist()  # [[rows from source s, tokens on source s], ...]: the one host sync
        # Every rank read every rank's token count, so all grow alike (growing is collective).
        most_tokens = max(tokens for _, tokens in received)
        if capacity == 0 or most_tokens > capacity:
            capacity = max(MIN_NORMAL_CAPACITY, 1 << max(0, most_tokens - 1).bit_length())
            meta.normal_capacity = capacity
            if graphs is not None and bucket is not None:  # this batch goes on eagerly, in the grown buffers
                assert bucket.pos is not None
                self._send_normal(bucket.x, TopKOutput(bucket.ids, bucket.weights, None), bucket.pos, capacity)
                pos_RT, counts_R, graphs = bucket.pos[:, :num_tokens].contiguous(), counts_R.clone(), None
            else:
                self._send_normal(hidden_TH, topk, pos_RT, capacity)
            meta.barrier()
        num_rows = sum(rows for rows, _ in received)
        if graphs is not None and bucket is not None:
            recv_x, local_NK, weights_NK, _ = graphs.unpack(num_rows)
            return DispatchOutput(recv_x, local_NK, weights_NK, GraphedHandle(num_tokens, num_rows, graphs, bucket))
        exchange, ids_at, _ = self._exchange(capacity, hidden_TH, top_k)
        recv_x, local_NK, weights_NK, valid_N = symm_kernels.unpack_rows(
            exchange.dispatch_buffer, counts_R, num_rows, hidden, hidden_TH.dtype, top_k, self.ep_rank,
            self.num_local_experts, ids_at,
        )  # fmt: skip
        handle = SymmetricHandle(self, num_tokens, pos_RT, counts_R, valid_N, exchange, meta.barrier)
        return DispatchOutput(recv_x, local_NK, weights_NK, handle)

    def _small_batch_graphs(self, meta: SymmetricMeta, capacity: int, hidden_TH: torch.Tensor, top_k: int
                            ) -> SmallBatchGraphs | None:  # fmt: skip
        """The instance's graphs for this batch's shape, unless they are switched off or this call is itself
        being captured."""
        if not graphs_enabled() or torch.cuda.is_current_stream_capturing():
            return None
        exchange, ids_at, row_bytes = self._exchange(capacity, hidden_TH, top_k)
        return self.comm.small_batch_graphs(exchange, meta, self.ep_rank, self.num_local_experts, top_k, ids_at,
                                            row_bytes)  # fmt: skip

    def _send_normal(self, hidden_TH: torch.Tensor, topk: TopKOutput, pos_RT: torch.Tensor, capacity: int) -> None:
        """Routed rows into the peers' blocks of the exchange with ``capacity`` rows per block (slots past it are
        skipped)."""
        from pd.moe.dispatcher import symm_kernels

        exchange, ids_at, row_bytes = self._exchange(capacity, hidden_TH, topk.topk_ids.shape[1])
        symm_kernels.send_rows(hidden_TH, topk.topk_ids, topk.topk_weights, pos_RT, exchange.dispatch_peer_ptrs,
                               capacity, self.ep_rank, self.num_local_experts, ids_at, row_bytes,
                               all_rows=False)  # fmt: skip

    def combine(self, x: torch.Tensor, handle: SymmetricHandle) -> torch.Tensor:
        """The combine of a dispatch of this transport (SymmetricHandle.combine)."""
        from pd.moe.dispatcher import symm_kernels

        exchange = handle.exchange
        # low_latency: the experts' batched outputs, weighted back into the received rows
        x_NH = x if handle.expert_rows is None else sum_expert_rows(x, handle.expert_rows)
        assert x_NH.shape[0] == handle.valid_N.shape[0], "combine input rows differ from the rows dispatch delivered"
        # Each row back into its source's combine buffer at the slot it came from; barrier; sum per token.
        symm_kernels.send_back(x_NH, handle.counts_R, exchange.combine_peer_ptrs, exchange.capacity, self.ep_rank)
        handle.barrier()
        return symm_kernels.reduce_partials(exchange.combine_buffer, handle.pos_RT)
