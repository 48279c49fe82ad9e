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

Transport (one per file, behind pd.moe.dispatcher.transport's interface; the handle a dispatch returns finishes
its own combine): where every rank of the group is a CUDA device of one host, both modes move the same rows
without NCCL: each rank writes them straight into the peers' buffers over symmetric memory (pd.moe.dispatcher.
symm_transport, over symm_exchange's buffers; normal mode sends before it learns the row counts, through a meta
buffer, and then syncs the host once, replaying CUDA graphs for batches of at most GRAPH_MAX_TOKENS tokens per rank
(symm_graphs); low_latency never syncs). Elsewhere (gloo, HCCL, several hosts), and for normal mode with
long-sequence rounds, the collectives are ``all_to_all_single`` (a2a_transport). Either way the DispatchOutput
rows come in the same order. dispatch_start / combine_start (two micro-batches in flight, two-batch overlap) always
take ``all_to_all_single``, started asynchronously: symmetric memory's blocks hold one batch at a time. The
symmetric buffers and graphs every MoE layer shares are held by the context's CommResources (``ctx.comm``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pd.moe.context import MoeContext
from pd.moe.dispatcher.a2a_transport import AllToAllTransport
from pd.moe.dispatcher.base import CombineInput, Dispatcher, DispatchFormat, DispatchOutput
from pd.moe.dispatcher.routing import expert_group
from pd.moe.dispatcher.symm_exchange import symmetric_memory_usable
from pd.moe.dispatcher.symm_transport import SymmetricTransport
from pd.moe.dispatcher.transport import AsyncHandle, TransportHandle
from pd.moe.long_seq import LongSeqConfig
from pd.moe.topk import TopKOutput

MODES = ("normal", "low_latency")
TRANSPORTS = ("auto", "nccl", "symm_mem")  # "nccl" = all_to_all_single on any backend


class TorchA2ADispatcher(Dispatcher):
    """Portable all-to-all dispatcher (see the module docstring for both modes' layouts).

    Args:
        ctx: placement and ``ctx.group`` (required when ep_size > 1; its size/rank must match ctx); ``ctx.comm``
            holds the symmetric-memory buffers and graphs that every dispatcher of the context shares.
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
        self._symmetric = False  # the group can use symmetric memory (decided once)
        self._transport_decided = transport == "nccl" or self.group is None
        # dispatch picks one of these per batch (_use_symmetric); each handle finishes over the one that made it
        num_local = self.num_local_experts
        self.a2a_transport = AllToAllTransport(mode, self.group, self.ep_size, self.ep_rank, num_local,
                                               max_tokens_per_rank, self.long_seq)  # fmt: skip
        self.symm_transport: SymmetricTransport | None = None  # None: nothing to communicate with (ep_size 1)
        if self.group is not None:
            self.symm_transport = SymmetricTransport(mode, self.group, self.ep_size, self.ep_rank, num_local,
                                                     max_tokens_per_rank, ctx.comm)  # fmt: skip

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
            # Every peer gets a [C, row] block: row t is token t's payload if it has an expert there, else a blank
            # (ids -1), so the receiver needs no counts and the shapes never change (graph-capturable).
            self._check_low_latency_capacity(hidden_TH.shape[0])
        # Normal mode with long-sequence rounds stays on all_to_all_single.
        if (self.mode == "low_latency" or self.long_seq is None) and self._use_symmetric(hidden_TH):
            assert self.symm_transport is not None
            return self.symm_transport.dispatch(hidden_TH, topk)
        return self.a2a_transport.dispatch(hidden_TH, topk)

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
        assert isinstance(handle, TransportHandle), f"not a torch dispatcher handle: {type(handle).__name__}"
        return handle.combine(combine_input.hidden_states)

    def dispatch_start(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> Callable[[], DispatchOutput]:
        """dispatch over all_to_all_single, its payload left in flight until the returned call.

        Two micro-batches in flight (two-batch overlap) never use symmetric memory: its blocks are rewritten by
        the next dispatch, and a peer past the barrier may start writing the other micro-batch's rows before this
        rank has read the first's. all_to_all_single gives every transfer its own buffers (and on CUDA runs on
        NCCL's stream, beside the other micro-batch's compute)."""
        if self.mode == "low_latency":
            self._check_low_latency_capacity(hidden_TH.shape[0])
        return self.a2a_transport.dispatch_start(hidden_TH, topk)

    def combine_start(self, combine_input: CombineInput) -> Callable[[], torch.Tensor]:
        """combine of a dispatch_start's output, the all-to-all back left in flight until the returned call."""
        handle, x = combine_input.handle, combine_input.hidden_states
        assert isinstance(handle, AsyncHandle), f"not a dispatch_start handle: {type(handle).__name__}"
        return handle.combine_start(x)

    # ---- capacity check and transport choice -----------------------------------------------------------------

    def _check_low_latency_capacity(self, num_tokens: int) -> None:
        capacity = self.max_tokens_per_rank
        if num_tokens > capacity:
            raise ValueError(
                f"low_latency dispatch got {num_tokens} tokens on one rank but max_tokens_per_rank={capacity}; "
                "raise max_tokens_per_rank (every rank must use the same value) or cap the decode batch size"
            )

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
