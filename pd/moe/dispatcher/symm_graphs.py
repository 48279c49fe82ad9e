"""Normal-mode dispatch and combine of small batches over symmetric memory, replayed from CUDA graphs.

At a few hundred tokens per rank the torch backend's normal mode is host-bound: each of its Python-side steps
(kernel launches, allocations, the barrier, the read-back of the counts) costs 5-50 us on a serving host, several
times the device work (benchmarks/results/README.md, EP=4). For batches of at most GRAPH_MAX_TOKENS tokens per
rank the steps are captured once and replayed:

  send graph (per token bucket):  route + send_rows on the bucket's static inputs (rows past the batch carry no
                                  expert, so they go nowhere) + barrier + the counts into a static buffer and,
                                  for the host, into pinned memory
  unpack graph:                   every row slot of every block (slots past the rows received are skipped) into
                                  static outputs
  combine graph (per bucket):     send_back over every row slot + barrier + reduce_partials into a static output

The host copies the batch in, replays, waits for the counts (normal mode's one host sync), replays unpack and
returns views of its outputs; combine copies the expert outputs in, replays and returns a copy. A rank on this
path and a rank on the eager path (a larger batch) follow the same protocol (the same meta writes, barriers and
buffers), so they may meet in one dispatch. A bucket reports its size as its token count, which matters only for
growth, and blocks never hold fewer than GRAPH_MAX_TOKENS rows.

One set of graphs serves every MoE layer of the instance (per group, block capacity and row shape; the instance's
CommResources holds it, pd.moe.dispatcher.comm_resources): a dispatch's outputs are views of its buffers, valid
until the next dispatch, as MoE layers run one after another. Their receive and combine-input buffers hold every
row slot of the blocks (a peer on the eager path may send more than GRAPH_MAX_TOKENS rows), so they cost
2 x R x capacity rows per rank once large batches grew the blocks. A batch that went through the graphs is
combined by its GraphedHandle.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pd.moe.dispatcher.symm_exchange import SymmetricExchange, SymmetricMeta
from pd.moe.dispatcher.transport import TransportHandle
from pd.moe.topk import TopKOutput

GRAPH_MAX_TOKENS = 256  # tokens per rank up to which normal mode replays graphs
MIN_BUCKET = 16
ENV_ENABLE = "PD_TORCH_A2A_NORMAL_GRAPHS"  # 0: small batches take the eager path too (to compare)


def graphs_enabled() -> bool:
    return os.environ.get(ENV_ENABLE, "1") != "0"


def bucket_for(num_tokens: int) -> int:
    """The static batch size a batch of ``num_tokens`` replays at: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << max(0, num_tokens - 1).bit_length())


def _captured(body: Callable[[], None]) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    # thread_local: ProcessGroupNCCL's watchdog thread queries CUDA events while we capture.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        body()
    return graph


@dataclass
class Bucket:
    """Static inputs and outputs of one token bucket, and its graphs. ``used`` rows of ``ids`` may hold a
    previous batch's ids (the others are -1)."""

    tokens: int
    x: torch.Tensor  # [Tb, H]
    ids: torch.Tensor  # [Tb, K] int64
    weights: torch.Tensor  # [Tb, K] float32
    out: torch.Tensor  # [Tb, H]: combine's result
    used: int = 0
    pos: torch.Tensor | None = None  # [R, Tb] int32, written by the send graph
    send_graph: torch.cuda.CUDAGraph | None = None
    combine_graph: torch.cuda.CUDAGraph | None = None


@dataclass
class SmallBatchGraphs:
    """The graphs of one exchange (group, capacity, row shape) for this rank's routing (rank, local experts)."""

    exchange: SymmetricExchange
    meta: SymmetricMeta
    my_rank: int
    num_local_experts: int
    top_k: int
    ids_at: int
    row_bytes: int
    buckets: dict[int, Bucket] = field(default_factory=dict)
    unpack_graph: torch.cuda.CUDAGraph | None = None

    def __post_init__(self) -> None:
        ranks, capacity, hidden = self.exchange.combine_buffer.shape
        dtype, device = self.exchange.combine_buffer.dtype, self.exchange.combine_buffer.device
        self.rows = ranks * capacity
        self.counts = torch.zeros(ranks, dtype=torch.int64, device=device)
        self.meta_host = torch.zeros(ranks, 2, dtype=torch.int64, pin_memory=True)
        self.received = (torch.empty(self.rows, hidden, dtype=dtype, device=device),
                         torch.empty(self.rows, self.top_k, dtype=torch.int64, device=device),
                         torch.empty(self.rows, self.top_k, dtype=torch.float32, device=device),
                         torch.empty(self.rows, dtype=torch.bool, device=device))  # fmt: skip
        self.combine_in = torch.empty(self.rows, hidden, dtype=dtype, device=device)

    # ---- dispatch ----

    def send(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> tuple[list[list[int]], Bucket]:
        """Routes and sends the batch, then waits for every peer's counts: ([[rows from s, tokens on s], ...],
        the bucket, whose ``pos`` has the slots for combine)."""
        num_tokens = hidden_TH.shape[0]
        bucket = self._bucket(bucket_for(num_tokens))
        bucket.x[:num_tokens].copy_(hidden_TH)
        bucket.ids[:num_tokens].copy_(topk.topk_ids)
        bucket.weights[:num_tokens].copy_(topk.topk_weights)
        if bucket.used > num_tokens:  # rows a larger batch left behind must route nowhere
            bucket.ids[num_tokens : bucket.used].fill_(-1)
        bucket.used = num_tokens
        assert bucket.send_graph is not None
        bucket.send_graph.replay()
        torch.cuda.current_stream().synchronize()  # normal mode's one host sync: the counts
        return self.meta_host.tolist(), bucket

    def unpack(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``num_rows`` rows received, as views of static buffers (hidden, local ids, weights, valid)."""
        from pd.moe.dispatcher import symm_kernels

        if self.unpack_graph is None:
            ex = self.exchange
            hidden, dtype = self.received[0].shape[1], self.received[0].dtype
            self.unpack_graph = _captured(lambda: symm_kernels.unpack_rows(
                ex.dispatch_buffer, self.counts, self.rows, hidden, dtype, self.top_k, self.my_rank,
                self.num_local_experts, self.ids_at, out=self.received))  # fmt: skip
        self.unpack_graph.replay()
        hidden_NH, ids_NK, weights_NK, valid_N = self.received
        return hidden_NH[:num_rows], ids_NK[:num_rows], weights_NK[:num_rows], valid_N[:num_rows]

    # ---- combine ----

    def combine(self, x_NH: torch.Tensor, bucket: Bucket, num_tokens: int) -> torch.Tensor:
        """[num_tokens, H]: each received row's output back to its source, summed per token there."""
        from pd.moe.dispatcher import symm_kernels

        if bucket.combine_graph is None:
            ex = self.exchange
            assert bucket.pos is not None
            pos = bucket.pos

            def body() -> None:
                symm_kernels.send_back(self.combine_in, self.counts, ex.combine_peer_ptrs, ex.capacity, self.my_rank)
                self.meta.barrier()
                symm_kernels.reduce_partials(ex.combine_buffer, pos, out=bucket.out)

            bucket.combine_graph = _captured(body)
        self.combine_in[: x_NH.shape[0]].copy_(x_NH)
        bucket.combine_graph.replay()
        return bucket.out[:num_tokens].clone()  # the next layer's combine reuses the buffer

    def _bucket(self, tokens: int) -> Bucket:
        from pd.moe.dispatcher import symm_kernels  # Triton: imported where the kernels run (CUDA only)

        bucket = self.buckets.get(tokens)
        if bucket is not None:
            return bucket
        x = self.combine_in
        bucket = Bucket(tokens, x.new_zeros(tokens, x.shape[1]),
                        torch.full((tokens, self.top_k), -1, dtype=torch.int64, device=x.device),
                        torch.zeros(tokens, self.top_k, dtype=torch.float32, device=x.device),
                        x.new_empty(tokens, x.shape[1]))  # fmt: skip
        ex, meta = self.exchange, self.meta

        def body() -> None:
            bucket.pos = symm_kernels.route(bucket.ids, meta.peer_ptrs, self.my_rank, self.num_local_experts)
            symm_kernels.send_rows(bucket.x, bucket.ids, bucket.weights, bucket.pos, ex.dispatch_peer_ptrs,
                                   ex.capacity, self.my_rank, self.num_local_experts, self.ids_at, self.row_bytes,
                                   all_rows=False)  # fmt: skip
            meta.barrier()
            self.counts.copy_(meta.buffer[:, 0])
            self.meta_host.copy_(meta.buffer, non_blocking=True)

        bucket.send_graph = _captured(body)
        self.buckets[tokens] = bucket
        return bucket


@dataclass(frozen=True)
class GraphedHandle(TransportHandle):
    """State for combine of a normal-mode batch that went through the small-batch graphs: T, the rows received,
    and the graphs and bucket that hold the slots."""

    num_tokens: int
    num_rows: int
    graphs: SmallBatchGraphs
    bucket: Bucket

    def combine(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] == self.num_rows, "combine input rows differ from the rows dispatch delivered"
        return self.graphs.combine(x, self.bucket, self.num_tokens)
