"""The all-to-all transport of the torch backend: both modes over ``all_to_all_single`` (gloo, NCCL, HCCL; a copy
when ep_size == 1). The layouts are the torch backend's (pd.moe.dispatcher.torch_a2a).

Every dispatch and combine here can be started and left in flight (dispatch_start, AsyncHandle.combine_start): each
transfer gets its own buffers, so two micro-batches may be in flight at once (two-batch overlap).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from pd.moe.dispatcher.base import DispatchOutput, ExpertRows, batch_by_expert, sum_expert_rows
from pd.moe.dispatcher.payload import blank_row, pack_rows, unpack_rows
from pd.moe.dispatcher.routing import owner_rank, token_rank_mask
from pd.moe.dispatcher.transport import AsyncHandle, Transport
from pd.moe.long_seq import LongSeqConfig, check_tokens_per_rank
from pd.moe.topk import TopKOutput

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

T = TypeVar("T")


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
class NormalHandle(AsyncHandle):
    """Normal-mode state for combine: T, the rounds in order (received rows are round-major, then by source
    rank), and whether combine runs per round."""

    transport: AllToAllTransport = field(repr=False, compare=False)
    num_tokens: int
    rounds: tuple[RoundLayout, ...]
    combine_in_rounds: bool

    def combine_start(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        return self.transport.combine_normal_start(x, self)


@dataclass(frozen=True)
class LowLatencyHandle(AsyncHandle):
    """Low-latency state for combine. sent_RT: [R, T] bool, token t went to rank r; expert_rows: where the slots of
    the R * C received rows sit in the batched layout (padding rows have none)."""

    transport: AllToAllTransport = field(repr=False, compare=False)
    num_tokens: int
    sent_RT: torch.Tensor
    expert_rows: ExpertRows

    def combine_start(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        return self.transport.combine_low_latency_start(x, self)


class AllToAllTransport(Transport):
    """Both modes' dispatch and combine over all_to_all_single, synchronous or started.

    Args:
        mode: "normal" or "low_latency".
        group: the expert group; None when ep_size == 1 (the transfers are copies).
        ep_size, ep_rank: R and this rank.
        num_local_experts: E_local.
        max_tokens_per_rank: low_latency capacity C (checked by the dispatcher before any collective).
        long_seq: normal-mode rounds; None = one round of any size.
    """

    def __init__(self, mode: str, group: ProcessGroup | None, ep_size: int, ep_rank: int, num_local_experts: int,
                 max_tokens_per_rank: int, long_seq: LongSeqConfig | None) -> None:  # fmt: skip
        self.mode = mode
        self.group = group
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.num_local_experts = num_local_experts
        self.max_tokens_per_rank = max_tokens_per_rank
        self.long_seq = long_seq

    def dispatch(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        return self.dispatch_start(hidden_TH, topk)()

    def dispatch_start(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> Callable[[], DispatchOutput]:
        """dispatch with its payload all-to-all left in flight until the returned call (normal mode's count
        exchange, before it, is synchronous). The handle is an AsyncHandle."""
        if self.mode == "low_latency":
            return self._dispatch_low_latency_start(hidden_TH, topk)
        return self._dispatch_normal_start(hidden_TH, topk)

    # ---- normal mode -------------------------------------------------------------------------------------------

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
        handle = NormalHandle(self, num_tokens, tuple(rounds), combine_in_rounds)

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

    def combine_normal_start(self, x_NH: torch.Tensor, handle: NormalHandle) -> Callable[[], torch.Tensor]:
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
            return DispatchOutput.batched(x_EMH, counts_E, LowLatencyHandle(self, num_tokens, sent_RT, rows))

        return _finished([work], sent, unpack)

    def combine_low_latency_start(self, x_EMH: torch.Tensor, handle: LowLatencyHandle) -> Callable[[], torch.Tensor]:
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
