"""The ``torch`` backend: expert-parallel dispatch/combine on torch.distributed all-to-all (gloo, NCCL, HCCL).

Two modes, picked at construction (``--deepep-mode``: prefill instances normal, decode instances low_latency):

normal
    Variable splits. Each rank first sends every peer its per-round token counts (one small all-to-all and the
    only host synchronisation), then moves hidden states and routing metadata with ``all_to_all_single``. A
    token routed to several experts of one rank is sent to that rank once, carrying all its local slots.
    With long-sequence rounds (``LongSeqConfig``) each rank sends at most ``per_round_tokens`` of its tokens
    per round, so every send and receive buffer of the exchange is sized per round (at most
    ``per_round_tokens * min(K, R)`` rows sent and ``per_round_tokens * R`` rows received); combine runs in rounds
    too when ``combine_enabled``, otherwise in one exchange. The DispatchOutput itself still holds every received
    row, because the runner computes all of them at once.

low_latency
    Static shapes, no host synchronisation, CUDA-graph capturable. Capacity layout: each rank sends every peer a
    fixed ``[C, H]`` block, ``C = max_tokens_per_rank``: row t holds token t if one of its experts lives on that
    peer, else zeros, and its routing metadata marks foreign slots -1. The receive buffer is ``[R * C, H]``
    (rows from source rank s at ``[s * C, (s + 1) * C)``); a row is valid iff one of its ids is >= 0.
    The receiver hands the runner the batched format (pd.moe.dispatcher.base): the valid rows grouped per local
    expert into ``[E_local, R * C, H]`` with a count per expert (no sort, no sync), so padding rows are never
    computed; combine weights the experts' outputs back into the ``[R * C, H]`` rows and returns them.
    Capacity bound: a rank may dispatch at most C tokens per batch (ValueError otherwise, checked on the shape,
    so no sync); memory per direction is about ``R * C * (H * itemsize + 8 * K)`` bytes, plus ``E_local * R * C
    * H * itemsize`` for the batched layout (and as much again for the runner's output).

Each token travels as one byte row holding its hidden state, global expert ids and weights (pd.moe.dispatcher.
payload), so both modes dispatch with a single data all-to-all; the receiver derives its local ids.

Transport: where every rank of the group is a CUDA device of one host, both modes move the same rows without
NCCL: each rank writes them straight into the peers' buffers over symmetric memory (pd.moe.dispatcher.
symm_exchange; normal mode sends before it learns the row counts, through a meta buffer, and then syncs the host
once, replaying CUDA graphs for batches of at most GRAPH_MAX_TOKENS tokens per rank (symm_graphs); low_latency
never syncs). Elsewhere (gloo, HCCL, several hosts), and for normal mode with long-sequence rounds, the
collectives are ``all_to_all_single``. Either way the DispatchOutput rows come in the same order.
dispatch_start / combine_start (two micro-batches in flight, two-batch overlap) always take ``all_to_all_single``,
started asynchronously: symmetric memory's blocks hold one batch at a time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from pd.moe.context import MoeContext
from pd.moe.dispatcher.base import (
    CombineInput,
    Dispatcher,
    DispatchFormat,
    DispatchOutput,
    ExpertRows,
    batch_by_expert,
    sum_expert_rows,
)
from pd.moe.dispatcher.payload import blank_row, pack_rows, row_layout, unpack_rows
from pd.moe.dispatcher.routing import expert_group, owner_rank, token_rank_mask
from pd.moe.dispatcher.symm_exchange import (
    SymmetricExchange,
    SymmetricMeta,
    exchange_for,
    meta_for,
    symmetric_memory_usable,
)
from pd.moe.dispatcher.symm_graphs import GRAPH_MAX_TOKENS, Bucket, SmallBatchGraphs, graphs_enabled, graphs_for
from pd.moe.long_seq import LongSeqConfig, check_tokens_per_rank
from pd.moe.topk import TopKOutput

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

T = TypeVar("T")
MODES = ("normal", "low_latency")
TRANSPORTS = ("auto", "nccl", "symm_mem")  # "nccl" = all_to_all_single on any backend
MIN_NORMAL_CAPACITY = 256  # normal mode's symmetric blocks start with this many rows and grow by powers of two
assert MIN_NORMAL_CAPACITY >= GRAPH_MAX_TOKENS, "a graphed small batch must fit the blocks without growing them"


def _all_to_all(
    out: torch.Tensor,
    inp: torch.Tensor,
    out_splits: list[int] | None,
    in_splits: list[int] | None,
    group: ProcessGroup | None,
    async_op: bool = False,
) -> dist.Work | None:
    """``all_to_all_single`` along dim 0 (a copy when there is no group, ep_size == 1): synchronous, or started
    with ``async_op`` (wait on the returned work, if any, before reading ``out``)."""
    if group is None:
        out.copy_(inp)
        return None
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)


def _finished(works: list[dist.Work | None], sent: list[torch.Tensor], then: Callable[[], T]) -> Callable[[], T]:
    """The call that waits for ``works`` and returns ``then()``; it holds the ``sent`` tensors until then."""

    def finish() -> T:
        for work in works:
            if work is not None:
                work.wait()
        sent.clear()  # the transfers read these until they finished
        return then()

    return finish


def _segments_index(starts: list[int], lengths: list[int], device: torch.device) -> torch.Tensor:
    """[sum(lengths)] int64 indices of the segments ``[start, start + length)`` concatenated in order."""
    starts_t = torch.tensor(starts, dtype=torch.int64, device=device)
    lengths_t = torch.tensor(lengths, dtype=torch.int64, device=device)
    out_begin = torch.cumsum(lengths_t, 0) - lengths_t
    total = int(sum(lengths))
    return torch.arange(total, device=device) + torch.repeat_interleave(starts_t - out_begin, lengths_t)


@dataclass(frozen=True)
class RoundLayout:
    """One normal-mode round. send_token_idx: [S] int64 token rows sent, grouped by destination rank in
    rank order (S = sum(send_splits)); send_splits / recv_splits: rows sent to / received from each rank."""

    send_token_idx: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]


@dataclass(frozen=True)
class NormalHandle:
    """Normal-mode state for combine: T, the rounds in order (received rows are round-major, then by source
    rank), and whether combine runs per round."""

    num_tokens: int
    rounds: tuple[RoundLayout, ...]
    combine_in_rounds: bool


@dataclass(frozen=True)
class SymmetricHandle:
    """State for combine over symmetric memory (both modes). pos_RT: [R, T] int32, the slot token t took in
    rank r's block (-1: not sent there); counts_R: [R] int64 on the device, rows received from each source;
    valid_N: [N] bool, received rows that hold a token; exchange and barrier: where the rows went; expert_rows
    (low_latency only): where the N received rows' slots sit in the batched layout the runner got."""

    num_tokens: int
    pos_RT: torch.Tensor
    counts_R: torch.Tensor
    valid_N: torch.Tensor
    exchange: SymmetricExchange
    barrier: Callable[[], None]
    expert_rows: ExpertRows | None = None


@dataclass(frozen=True)
class GraphedHandle:
    """State for combine of a normal-mode batch that went through the small-batch graphs: T, the rows received,
    and the graphs and bucket that hold the slots."""

    num_tokens: int
    num_rows: int
    graphs: SmallBatchGraphs
    bucket: Bucket


@dataclass(frozen=True)
class LowLatencyHandle:
    """Low-latency state for combine. sent_RT: [R, T] bool, token t went to rank r; expert_rows: where the slots of
    the R * C received rows sit in the batched layout (padding rows have none)."""

    num_tokens: int
    sent_RT: torch.Tensor
    expert_rows: ExpertRows


class TorchA2ADispatcher(Dispatcher):
    """Portable all-to-all dispatcher (see the module docstring for both modes' layouts).

    Args:
        ctx: placement and ``ctx.group`` (required when ep_size > 1; its size/rank must match ctx).
        num_experts: E, the (physical) expert count the router's ids refer to; ep_size must divide it.
        mode: "normal" or "low_latency".
        max_tokens_per_rank: low_latency capacity C (the same on every rank); unused by normal mode.
        long_seq: normal-mode rounds; None or a disabled config = one round of any size.
        transport: "auto" (symmetric memory where the group allows it, decided at the first dispatch, which must
            then run eagerly on every rank), "nccl" (all_to_all_single on any backend), or "symm_mem" (required;
            the first dispatch raises where it is not usable). Normal mode with rounds always uses NCCL.

    Raises:
        ValueError: unknown mode or transport, C < 1, ep_size not dividing num_experts, a missing or mismatched
            group.
    """

    def __init__(
        self,
        ctx: MoeContext,
        *,
        num_experts: int,
        mode: str = "normal",
        max_tokens_per_rank: int = 128,
        long_seq: LongSeqConfig | None = None,
        transport: str = "auto",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"torch dispatcher mode must be one of {MODES}, got {mode!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"torch dispatcher transport must be one of {TRANSPORTS}, got {transport!r}")
        if transport == "symm_mem" and mode == "normal" and long_seq is not None and long_seq.enabled:
            raise ValueError("normal mode with long-sequence rounds runs on all_to_all_single; transport='symm_mem' "
                             "cannot be combined with DEEPEP_NORMAL_LONG_SEQ_* rounds")
        if max_tokens_per_rank < 1:
            raise ValueError(f"max_tokens_per_rank must be >= 1, got {max_tokens_per_rank}")
        self.mode = mode
        self.num_local_experts = ctx.num_local(num_experts)
        self.ep_size, self.ep_rank = ctx.ep_size, ctx.ep_rank
        self.max_tokens_per_rank = max_tokens_per_rank
        self.long_seq = long_seq if long_seq is not None and long_seq.enabled else None
        self.group = expert_group(ctx, "torch")
        self.transport = transport
        self._symmetric = False
        self._transport_decided = transport == "nccl" or self.group is None

    @property
    def output_format(self) -> DispatchFormat:
        """normal: standard rows; low_latency: batched per local expert."""
        return DispatchFormat.BATCHED if self.mode == "low_latency" else DispatchFormat.STANDARD

    def dispatch(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        """Send each token once to every rank that owns one of its experts. Synchronous.

        Args:
            hidden_TH: [T, H] this rank's tokens, model dtype (T may differ per rank, and be 0).
            topk: topk_ids [T, K] int64 global ids in [-1, E), topk_weights [T, K] float32.

        Returns:
            normal: standard format, hidden_states [N, H] (N = rows received, round-major then by source rank),
            topk_ids [N, K] int64 local ids or -1, topk_weights [N, K] float32, handle NormalHandle.
            low_latency: batched format, hidden_states [E_local, R * C, H] (R = ep_size, C = max_tokens_per_rank):
            expert e's rows are the received rows with a slot on e, in (slot, received row) order (received rows
            by source rank, then token), the rest unwritten; expert_counts [E_local] int32; handle
            LowLatencyHandle (or SymmetricHandle), which keeps the weights for combine.

        Raises:
            ValueError: low_latency with T > max_tokens_per_rank (raised on that rank only, before any
                collective: bound the decode batch at startup); normal with rounds when any rank's T exceeds
                rounds x per_round_tokens (raised on every rank, after the count exchange).
        """
        if self.mode == "low_latency":
            return self._dispatch_low_latency(hidden_TH, topk)
        return self._dispatch_normal(hidden_TH, topk)

    def combine(self, combine_input: CombineInput) -> torch.Tensor:
        """Return each rank's partial outputs to the tokens' home rank and sum them. Synchronous.

        Args:
            combine_input: normal: hidden_states [N, H] model dtype, in the row order dispatch produced.
                low_latency: [E_local, R * C, H] model dtype, each expert's unweighted outputs for its rows
                (rows past the counts are not read). The handle.

        Returns:
            [T, H] model dtype in this rank's original token order, summed over ranks.
        """
        handle = combine_input.handle
        if isinstance(handle, GraphedHandle):
            x_NH = combine_input.hidden_states
            assert x_NH.shape[0] == handle.num_rows, "combine input rows differ from the rows dispatch delivered"
            return handle.graphs.combine(x_NH, handle.bucket, handle.num_tokens)
        if isinstance(handle, SymmetricHandle):
            return self._combine_symmetric(combine_input.hidden_states, handle)
        if isinstance(handle, LowLatencyHandle):
            return self._combine_low_latency_start(combine_input.hidden_states, handle)()
        assert isinstance(handle, NormalHandle), f"not a torch dispatcher handle: {type(handle).__name__}"
        return self._combine_normal(combine_input.hidden_states, handle)

    def dispatch_start(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> Callable[[], DispatchOutput]:
        """dispatch over all_to_all_single, its payload left in flight until the returned call.

        Two micro-batches in flight (two-batch overlap) never use symmetric memory: its blocks are rewritten by
        the next dispatch, and a peer past the barrier may start writing the other micro-batch's rows before this
        rank has read the first's. all_to_all_single gives every transfer its own buffers (and on CUDA runs on
        NCCL's stream, beside the other micro-batch's compute)."""
        if self.mode == "low_latency":
            self._check_low_latency_capacity(hidden_TH.shape[0])
            return self._dispatch_low_latency_start(hidden_TH, topk)
        return self._dispatch_normal_start(hidden_TH, topk)

    def combine_start(self, combine_input: CombineInput) -> Callable[[], torch.Tensor]:
        """combine of a dispatch_start's output, the all-to-all back left in flight until the returned call."""
        handle, x = combine_input.handle, combine_input.hidden_states
        if isinstance(handle, LowLatencyHandle):
            return self._combine_low_latency_start(x, handle)
        assert isinstance(handle, NormalHandle), f"not a dispatch_start handle: {type(handle).__name__}"
        return self._combine_normal_start(x, handle)

    # ---- normal mode -------------------------------------------------------------------------------------------

    def _dispatch_normal(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        if self.long_seq is None and self._use_symmetric(hidden_TH):
            return self._dispatch_normal_symmetric(hidden_TH, topk)
        return self._dispatch_normal_start(hidden_TH, topk)()

    def _dispatch_normal_start(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> Callable[[], DispatchOutput]:
        num_tokens, hidden = hidden_TH.shape
        ids_TK, weights_TK = topk.topk_ids, topk.topk_weights
        top_k, ranks, device = ids_TK.shape[1], self.ep_size, hidden_TH.device
        if self.long_seq is not None:
            per_round, max_rounds = self.long_seq.per_round_tokens, self.long_seq.rounds
        else:
            per_round, max_rounds = None, 1
        assert ids_TK.shape[0] == num_tokens and weights_TK.shape == ids_TK.shape

        owner_TK = owner_rank(ids_TK, self.num_local_experts)
        sent_RT = token_rank_mask(owner_TK, ranks).t()
        # Clamped so an over-long batch still joins the count exchange; the capacity check follows it.
        if per_round is None:
            counts_RC = sent_RT.sum(dim=1, keepdim=True)
        else:
            round_T = (
                torch.arange(num_tokens, device=device).div(per_round, rounding_mode="floor").clamp(max=max_rounds - 1)
            )
            counts_RC = torch.zeros(ranks, max_rounds, dtype=torch.int64, device=device)
            counts_RC.index_add_(1, round_T, sent_RT.long())
        # Peers learn our per-round counts and our token count (the last column), which fixes the round count.
        send_meta = torch.cat([counts_RC, torch.full((ranks, 1), num_tokens, device=device)], dim=1)
        recv_meta = torch.empty_like(send_meta)
        _all_to_all(recv_meta, send_meta, None, None, self.group)
        payload_TB = pack_rows(hidden_TH, ids_TK, weights_TK)  # queued before the host waits on the counts
        send_counts, recv_counts = torch.stack([send_meta, recv_meta]).tolist()  # the one host sync
        max_tokens = max(row[max_rounds] for row in recv_counts)
        if self.long_seq is not None:
            # Checked on the exchanged maximum, so every rank raises together instead of one rank leaving the
            # others blocked in the next collective.
            check_tokens_per_rank(self.long_seq, max_tokens)
        num_rounds = 1 if per_round is None else max(1, math.ceil(max_tokens / per_round))

        total_recv = sum(recv_counts[s][r] for s in range(ranks) for r in range(num_rounds))
        recv_NB = payload_TB.new_empty(total_recv, payload_TB.shape[1])
        rounds, offset, works, sent = [], 0, [], []
        for r in range(num_rounds):
            send_splits = [send_counts[d][r] for d in range(ranks)]
            recv_splits = [recv_counts[s][r] for s in range(ranks)]
            lo = min(r * per_round, num_tokens) if per_round else 0
            hi = min(lo + per_round, num_tokens) if per_round else num_tokens
            token_S = self._round_tokens(sent_RT[:, lo:hi], sum(send_splits), lo)
            rows = slice(offset, offset + sum(recv_splits))
            sent.append(payload_TB.index_select(0, token_S))
            works.append(_all_to_all(recv_NB[rows], sent[-1], recv_splits, send_splits, self.group, async_op=True))
            rounds.append(RoundLayout(token_S, send_splits, recv_splits))
            offset = rows.stop
        combine_in_rounds = self.long_seq is not None and self.long_seq.combine_enabled
        handle = NormalHandle(num_tokens, tuple(rounds), combine_in_rounds)

        def unpack() -> DispatchOutput:
            recv_x, local_NK, weights_NK = unpack_rows(recv_NB, hidden, hidden_TH.dtype, top_k, self.ep_rank,
                                                       self.num_local_experts)  # fmt: skip
            return DispatchOutput(recv_x, local_NK, weights_NK, handle)

        return _finished(works, sent, unpack)

    @staticmethod
    def _round_tokens(sent_RC: torch.Tensor, num_pairs: int, first_token: int) -> torch.Tensor:
        """[S] int64 token of each True entry of ``sent_RC`` ([R, chunk]), rank-major (grouped by destination).
        S is known from the exchanged counts, so a stable sort replaces ``nonzero`` (another host sync on GPU)."""
        chunk = sent_RC.shape[1]
        if chunk == 0:
            return torch.empty(0, dtype=torch.int64, device=sent_RC.device)
        pos = torch.argsort(sent_RC.reshape(-1).logical_not(), stable=True)[:num_pairs]
        return pos.remainder(chunk) + first_token

    def _combine_normal(self, x_NH: torch.Tensor, handle: NormalHandle) -> torch.Tensor:
        return self._combine_normal_start(x_NH, handle)()

    def _combine_normal_start(self, x_NH: torch.Tensor, handle: NormalHandle) -> Callable[[], torch.Tensor]:
        out_TH = x_NH.new_zeros(handle.num_tokens, x_NH.shape[1])
        offsets = [0]
        for layout in handle.rounds:
            offsets.append(offsets[-1] + sum(layout.recv_splits))
        assert offsets[-1] == x_NH.shape[0], "combine input rows differ from the rows dispatch delivered"
        indices = list(range(len(handle.rounds)))
        groups = [[r] for r in indices] if handle.combine_in_rounds else [indices]
        works, arrivals, sent = [], [], []
        for group in groups:
            send_x, in_splits, out_splits, token_idx = self._combine_group(x_NH, handle, offsets, group)
            back = x_NH.new_empty(sum(out_splits), x_NH.shape[1])
            sent.append(send_x)
            works.append(_all_to_all(back, send_x, out_splits, in_splits, self.group, async_op=True))
            arrivals.append((token_idx, back))

        def reduce() -> torch.Tensor:  # in round order, as the synchronous path summed
            for token_idx, back in arrivals:
                out_TH.index_add_(0, token_idx, back)
            return out_TH

        return _finished(works, sent, reduce)

    def _combine_group(
        self, x_NH: torch.Tensor, handle: NormalHandle, offsets: list[int], group: list[int]
    ) -> tuple[torch.Tensor, list[int], list[int], torch.Tensor]:
        """Rows to send back for the rounds in ``group``, reordered from (round, rank) to (rank, round), with the
        splits and, on the home side, the token each returning row belongs to (same order)."""
        rounds, ranks = [handle.rounds[r] for r in group], self.ep_size
        if len(group) == 1:
            layout = rounds[0]
            rows = x_NH[offsets[group[0]] : offsets[group[0] + 1]]
            return rows, layout.recv_splits, layout.send_splits, layout.send_token_idx
        in_splits = [sum(layout.recv_splits[s] for layout in rounds) for s in range(ranks)]
        out_splits = [sum(layout.send_splits[d] for layout in rounds) for d in range(ranks)]
        # Segments in (rank, round) order: on this (expert) side rows of x_NH, on the home side entries of the
        # rounds' send_token_idx concatenated; both orders match what the peer's all-to-all delivers.
        send_bases = list(itertools.accumulate((layout.send_token_idx.shape[0] for layout in rounds), initial=0))
        x_starts, x_lens, t_starts, t_lens = [], [], [], []
        for rank in range(ranks):
            for i, (r, layout) in enumerate(zip(group, rounds, strict=True)):
                x_starts.append(offsets[r] + sum(layout.recv_splits[:rank]))
                x_lens.append(layout.recv_splits[rank])
                t_starts.append(send_bases[i] + sum(layout.send_splits[:rank]))
                t_lens.append(layout.send_splits[rank])
        device = x_NH.device
        send_x = x_NH.index_select(0, _segments_index(x_starts, x_lens, device))
        all_tokens = torch.cat([layout.send_token_idx for layout in rounds])
        token_idx = all_tokens.index_select(0, _segments_index(t_starts, t_lens, device))
        return send_x, in_splits, out_splits, token_idx

    # ---- low-latency mode --------------------------------------------------------------------------------------

    def _dispatch_low_latency(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        # Every peer gets a [C, row] block: row t is token t's payload if it has an expert there, else a blank
        # (ids -1), so the receiver needs no counts and the shapes never change (graph-capturable).
        self._check_low_latency_capacity(hidden_TH.shape[0])
        if self._use_symmetric(hidden_TH):
            return self._dispatch_low_latency_symmetric(hidden_TH, topk)
        return self._dispatch_low_latency_start(hidden_TH, topk)()

    def _check_low_latency_capacity(self, num_tokens: int) -> None:
        capacity = self.max_tokens_per_rank
        if num_tokens > capacity:
            raise ValueError(
                f"low_latency dispatch got {num_tokens} tokens on one rank but max_tokens_per_rank={capacity}; "
                "raise max_tokens_per_rank (every rank must use the same value) or cap the decode batch size"
            )

    def _dispatch_low_latency_start(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> Callable[[], DispatchOutput]:
        """The all_to_all_single path, started (the caller checked the capacity)."""
        num_tokens, hidden = hidden_TH.shape
        capacity, ranks, device = self.max_tokens_per_rank, self.ep_size, hidden_TH.device
        ids_TK, top_k = topk.topk_ids, topk.topk_ids.shape[1]
        owner_TK = owner_rank(ids_TK, self.num_local_experts)
        sent_RT = token_rank_mask(owner_TK, ranks).t()
        payload_TB = pack_rows(hidden_TH, ids_TK, topk.topk_weights)
        blank_B = blank_row(hidden, hidden_TH.dtype, top_k, device)
        send_RCB = blank_B.expand(ranks, capacity, -1).clone()
        send_RCB[:, :num_tokens] = torch.where(sent_RT.unsqueeze(-1), payload_TB.unsqueeze(0), blank_B)
        recv_NB = torch.empty_like(send_RCB).view(ranks * capacity, -1)
        sent = [send_RCB.view(ranks * capacity, -1)]
        work = _all_to_all(recv_NB, sent[0], None, None, self.group, async_op=True)

        def unpack() -> DispatchOutput:
            recv_x, local_NK, weights_NK = unpack_rows(recv_NB, hidden, hidden_TH.dtype, top_k, self.ep_rank,
                                                       self.num_local_experts)  # fmt: skip
            x_EMH, counts_E, rows = batch_by_expert(recv_x, local_NK, weights_NK, self.num_local_experts)
            return DispatchOutput.batched(x_EMH, counts_E, LowLatencyHandle(num_tokens, sent_RT, rows))

        return _finished([work], sent, unpack)

    # ---- symmetric-memory transport (both modes) ---------------------------------------------------------------

    def _use_symmetric(self, hidden_TH: torch.Tensor) -> bool:
        """Whether this batch goes over symmetric memory. The group's answer is decided (collectively) at the first
        call; after that it depends only on the row width, which every rank shares."""
        if not self._transport_decided:
            assert self.group is not None
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the first dispatch sets up its transport and must run eagerly, not under CUDA "
                                   "graph capture: run one eager forward before capturing")
            self._symmetric = symmetric_memory_usable(self.group, hidden_TH.device)
            if self.transport == "symm_mem" and not self._symmetric:
                raise ValueError("transport='symm_mem' needs every rank of the expert group on CUDA devices of one "
                                 "host with NCCL and Triton")
            self._transport_decided = True
        # the kernels move 64-bit words
        return self._symmetric and hidden_TH.shape[1] * hidden_TH.element_size() % 8 == 0

    def _exchange(self, capacity: int, hidden_TH: torch.Tensor, top_k: int) -> tuple[SymmetricExchange, int, int]:
        """(exchange, ids offset, row bytes) for rows of this batch's shape."""
        assert self.group is not None
        ids_at, row_bytes = row_layout(hidden_TH.shape[1], hidden_TH.dtype, top_k)
        exchange = exchange_for(self.group, capacity, row_bytes, hidden_TH.shape[1], hidden_TH.dtype,
                                hidden_TH.device)  # fmt: skip
        return exchange, ids_at, row_bytes

    def _dispatch_low_latency_symmetric(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
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
        handle = SymmetricHandle(num_tokens, pos_RT, exchange.full_counts, valid_N, exchange, exchange.barrier,
                                 rows)  # fmt: skip
        return DispatchOutput.batched(x_EMH, counts_E, handle)

    def _dispatch_normal_symmetric(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        from pd.moe.dispatcher import symm_kernels

        assert self.group is not None
        num_tokens, hidden = hidden_TH.shape
        ids_TK, top_k, device = topk.topk_ids, topk.topk_ids.shape[1], hidden_TH.device
        meta = meta_for(self.group, device)
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
        handle = SymmetricHandle(num_tokens, pos_RT, counts_R, valid_N, exchange, meta.barrier)
        return DispatchOutput(recv_x, local_NK, weights_NK, handle)

    def _small_batch_graphs(self, meta: SymmetricMeta, capacity: int, hidden_TH: torch.Tensor, top_k: int
                            ) -> SmallBatchGraphs | None:  # fmt: skip
        """The instance's graphs for this batch's shape, unless they are switched off or this call is itself
        being captured."""
        if not graphs_enabled() or torch.cuda.is_current_stream_capturing():
            return None
        exchange, ids_at, row_bytes = self._exchange(capacity, hidden_TH, top_k)
        return graphs_for(exchange, meta, self.ep_rank, self.num_local_experts, top_k, ids_at, row_bytes)

    def _send_normal(self, hidden_TH: torch.Tensor, topk: TopKOutput, pos_RT: torch.Tensor, capacity: int) -> None:
        """Routed rows into the peers' blocks of the exchange with ``capacity`` rows per block (slots past it are
        skipped)."""
        from pd.moe.dispatcher import symm_kernels

        exchange, ids_at, row_bytes = self._exchange(capacity, hidden_TH, topk.topk_ids.shape[1])
        symm_kernels.send_rows(hidden_TH, topk.topk_ids, topk.topk_weights, pos_RT, exchange.dispatch_peer_ptrs,
                               capacity, self.ep_rank, self.num_local_experts, ids_at, row_bytes,
                               all_rows=False)  # fmt: skip

    def _combine_symmetric(self, x: torch.Tensor, handle: SymmetricHandle) -> torch.Tensor:
        from pd.moe.dispatcher import symm_kernels

        exchange = handle.exchange
        # low_latency: the experts' batched outputs, weighted back into the received rows
        x_NH = x if handle.expert_rows is None else sum_expert_rows(x, handle.expert_rows)
        assert x_NH.shape[0] == handle.valid_N.shape[0], "combine input rows differ from the rows dispatch delivered"
        # Each row back into its source's combine buffer at the slot it came from; barrier; sum per token.
        symm_kernels.send_back(x_NH, handle.counts_R, exchange.combine_peer_ptrs, exchange.capacity, self.ep_rank)
        handle.barrier()
        return symm_kernels.reduce_partials(exchange.combine_buffer, handle.pos_RT)

    def _combine_low_latency_start(self, x_EMH: torch.Tensor, handle: LowLatencyHandle) -> Callable[[], torch.Tensor]:
        ranks, capacity, hidden = self.ep_size, self.max_tokens_per_rank, x_EMH.shape[-1]
        assert x_EMH.shape == (self.num_local_experts, ranks * capacity, hidden), "not this batch's batched layout"
        x_NH = sum_expert_rows(x_EMH, handle.expert_rows)
        back = torch.empty_like(x_NH)
        sent = [x_NH]
        work = _all_to_all(back, sent[0], None, None, self.group, async_op=True)

        def reduce() -> torch.Tensor:
            partial_RTH = back.view(ranks, capacity, hidden)[:, : handle.num_tokens]
            # Rows a token was never sent with come back as zeros; masked all the same, so the sum does not rely on it.
            return torch.where(handle.sent_RT.unsqueeze(-1), partial_RTH, 0).sum(dim=0)

        return _finished([work], sent, reduce)
