"""Prompt (extend) forwards replayed from piecewise CUDA graphs (SGLang's --disable-piecewise-cuda-graph,
--piecewise-cuda-graph-max-tokens, --piecewise-cuda-graph-tokens).

A prefill step of a MoE model launches about fifteen kernels per layer. On an H200 the host took 10-16 ms to
launch an 8-layer, 8,192-token step, about as long as the GPU ran it, so the host paced prefill. A whole prompt
forward cannot be one graph: its attention's grid and metadata follow the requests' lengths. Everything else
follows only the token count. So a forward of T tokens runs in the smallest captured size S >= T: the model's
pieces between two attention calls replay as graphs over static inputs of S tokens (padding tokens read token 0
at position 0 and write their KV into the sink slot no request owns), and each layer's attention runs eagerly
between them over the T real tokens, with the batch's own metadata.

The eager attention reads its inputs (queries, keys and values; MLA's expanded form: queries and latents) where the
piece before it wrote them: a replay writes every tensor of its capture at the same address. It holds them as
aliases that do not keep the memory allocated (as torch's own CUDA-graph trees hold graph outputs), so later pieces
may reuse it, which stream order makes safe: the next piece runs after the attention. Copying them into static
buffers instead took 0.79 ms of the 66.6 ms of kernels of a 16 x 1024-token prefill of the two-layer DeepSeek-V3
shape on an H200 (MLA's queries are 128 heads of 192 values). The attention writes its output into a buffer shared
by every layer and size, which the next piece reads.
Sizes are captured from the largest down into one memory pool. A static forward is a prompt's, so MLA captures its
expanded form, and only batches of mostly new tokens replay it (pd.engine.forward_batch.BatchLayout.mostly_new);
decode-like batches of an MLA model run eagerly.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pd.engine.forward_batch import BatchLayout, ForwardBatch, empty_layout
from pd.engine.graph_memory import free_before_capture, used_since

if TYPE_CHECKING:
    from pd.attention import LatentExpand
    from pd.engine.kv_cache import ReqToToken
    from pd.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _AttentionCall:
    """One layer's attention as the captured forward made it; the replay makes it again over the real tokens."""

    layer_id: int
    q: torch.Tensor  # [S, Hq, Dk] views of the shared static buffers
    k: torch.Tensor
    v: torch.Tensor | None
    out: torch.Tensor
    scale: float
    kv_heads: slice | None
    v_dim: int | None
    kv_stored: bool

    def attend(self, batch: ForwardBatch) -> None:
        n = batch.num_tokens
        batch.attn_backend.forward(self.layer_id, self.q[:n], self.k[:n], None if self.v is None else self.v[:n],
                                   batch, self.scale, kv_heads=self.kv_heads, v_dim=self.v_dim,
                                   kv_stored=self.kv_stored, out=self.out[:n])  # fmt: skip


@dataclass(frozen=True)
class _ExpandedCall:
    """One MLA layer's attention over expanded latents (forward_expanded), as captured."""

    layer_id: int
    q: torch.Tensor
    latent: torch.Tensor
    expand: LatentExpand
    v_dim: int
    out: torch.Tensor
    scale: float

    def attend(self, batch: ForwardBatch) -> None:
        n = batch.num_tokens
        batch.attn_backend.forward_expanded(self.layer_id, self.q[:n], self.latent[:n], self.expand, self.v_dim,
                                            batch, self.scale, out=self.out[:n])  # fmt: skip


class _SplitAtAttention:
    """The attention backend a static forward sees: it hands each call to the graphs, which end a piece there."""

    name = "piecewise"

    def __init__(self, graphs: PiecewiseGraphs) -> None:
        self.graphs = graphs

    def forward(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, batch: ForwardBatch,
                scale: float, kv_heads: slice | None = None, v_dim: int | None = None,
                kv_stored: bool = False) -> torch.Tensor:  # fmt: skip
        graphs = self.graphs
        out_dim = v_dim if v is None else v.shape[-1]
        out = graphs._buffer("out", (q.shape[0], q.shape[1], out_dim), q.dtype)
        v_held = None if v is None else graphs._hold(v)
        return graphs._split(_AttentionCall(layer_id, graphs._hold(q), graphs._hold(k), v_held, out, scale, kv_heads,
                                            v_dim, kv_stored))  # fmt: skip

    def forward_expanded(self, layer_id: int, q: torch.Tensor, latent: torch.Tensor,
                         expand: LatentExpand, v_dim: int,
                         batch: ForwardBatch, scale: float) -> torch.Tensor:  # fmt: skip
        graphs = self.graphs
        out = graphs._buffer("out", (q.shape[0], q.shape[1], v_dim), q.dtype)
        graphs.expands = True
        return graphs._split(_ExpandedCall(layer_id, graphs._hold(q), graphs._hold(latent), expand, v_dim, out,
                                           scale))  # fmt: skip


class PiecewiseGraphs:
    """Captured prompt forwards of one rank, one set of pieces per token count.

    Args:
        runner: the model runner whose model and KV cache are captured (its attention backend runs eagerly).
        page_table: the scheduler's page table.
        sizes: the token counts to capture (any order).
        pad_slot: a KV slot no request owns (padding tokens write there).
        capture: False runs each size's static forward eagerly, attention included, instead of replaying graphs
            (the same static buffers, padding and split: how the bookkeeping is tested without a GPU).
    """

    def __init__(self, runner: ModelRunner, page_table: ReqToToken, sizes: tuple[int, ...], pad_slot: int,
                 capture: bool = True) -> None:  # fmt: skip
        self.runner, self.sizes = runner, tuple(sorted(set(sizes)))
        self.max_tokens = self.sizes[-1]
        device = runner.device
        self._inputs = torch.zeros(3, self.max_tokens, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.out_loc = self._inputs
        self.out_loc.fill_(pad_slot)
        self.pad_slot, self.page_table = pad_slot, page_table
        self._buffers: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}
        self._split_at = _SplitAtAttention(self)
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.calls: dict[int, list[_AttentionCall | _ExpandedCall]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self._capturing: list[torch.cuda.CUDAGraph] | None = None  # the pieces of the size being captured
        self._recording: list[_AttentionCall | _ExpandedCall] | None = None
        self._batch: ForwardBatch | None = None  # uncaptured: the real batch whose attention runs at each split
        self.capture_s = self.capture_mib = 0.0  # what the capture took (logged at start-up)
        # The static forward took MLA's expanded form (a prompt's), which only batches of mostly new tokens may replay:
        # a decode-like batch would expand its whole context's latents at every layer.
        self.expands = False
        if capture:
            try:
                self._capture()
            except RuntimeError as e:  # e.g. an operation the capture forbids (a host sync) in some model's layers
                advice = "start with --disable-piecewise-cuda-graph to run them eagerly"
                if isinstance(e, torch.OutOfMemoryError):  # e.g. a DeepSeek-V3 shape's 16K-token chunks on 80 GB
                    advice = (f"the GPU memory beside the KV pool is too small for a forward of {self.max_tokens} "
                              f"tokens: lower {runner.cfg.pool_flag}, --piecewise-cuda-graph-max-tokens or "
                              f"--chunked-prefill-size, or {advice}")  # fmt: skip
                raise RuntimeError(f"capturing piecewise CUDA graphs of prompt forwards failed ({e}); {advice}") from e

    def can_run(self, batch: ForwardBatch) -> bool:
        return 0 < batch.num_tokens <= self.max_tokens and (batch.layout.mostly_new or not self.expands)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """-> hidden states [T, hidden] of the batch's T tokens (a view of the size's static output: consume it
        before the next forward). can_run must hold."""
        n = batch.num_tokens
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        # The real tokens, then padding: token 0 at position 0 writing the sink slot.
        self._inputs[:, :n].copy_(torch.stack((batch.input_ids, batch.positions, batch.layout.out_loc)))
        self._inputs[:2, n:size].zero_()
        self.out_loc[n:size].fill_(self.pad_slot)
        if size not in self.pieces:  # uncaptured: the static forward, each split running the real attention
            self._batch = batch
            try:
                return self.runner.model(self._static_batch(size))[:n]
            finally:
                self._batch = None
        pieces, calls = self.pieces[size], self.calls[size]
        for piece, call in zip(pieces[:-1], calls, strict=True):  # each piece ends where an attention call starts
            piece.replay()
            call.attend(batch)
        pieces[-1].replay()
        return self.hidden[size][:n]

    def _split(self, call: _AttentionCall | _ExpandedCall) -> torch.Tensor:
        """A layer's attention call inside a static forward, its inputs already in the shared buffers: the piece
        ends there (uncaptured: the real batch's attention runs). -> the shared output buffer the next piece reads."""
        if self._batch is not None:
            call.attend(self._batch)
        elif self._capturing is not None:
            assert self._recording is not None
            self._recording.append(call)
            self._capturing[-1].capture_end()
            self._begin_piece()
        return call.out

    def _hold(self, t: torch.Tensor) -> torch.Tensor:
        """An attention input as its call keeps it: inside a capture an alias of the memory the piece writes it to
        (weak_alias), else the tensor itself (the uncaptured forward runs the call at once)."""
        return weak_alias(t) if self._capturing is not None else t

    def _buffer(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """[shape[0], *shape[1:]]: the first rows of the buffer every layer and token count share for this role,
        trailing shape and dtype (allocated by the first, eager, forward: never inside a capture)."""
        key = (role, tuple(shape[1:]), dtype)
        if key not in self._buffers:
            # zeros: the rows past a batch's tokens are read by the next piece (finite values keep padding harmless)
            self._buffers[key] = torch.zeros(self.max_tokens, *key[1], dtype=dtype, device=self.runner.device)
        return self._buffers[key][: shape[0]]

    def _static_batch(self, size: int) -> ForwardBatch:
        """A forward of ``size`` tokens over the static inputs; its attention calls go to _split."""
        device = self.runner.device
        none = empty_layout(device, self.page_table)
        layout = BatchLayout(rows=none.rows, prefix_lens=none.prefix_lens, extend_lens=none.extend_lens,
                             q_starts=none.q_starts, out_loc=self.out_loc[:size], page_table=self.page_table,
                             host_prefix_lens=[], host_extend_lens=[])  # fmt: skip
        return ForwardBatch(input_ids=self.input_ids[:size], positions=self.positions[:size], layout=layout,
                            kv_cache=self.runner.kv_cache, logits_index=none.out_loc, attn_backend=self._split_at,
                            attn_meta=None, moe_mode="normal")  # fmt: skip

    def _begin_piece(self) -> None:
        assert self._capturing is not None
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self._pool)
        self._capturing.append(graph)

    @torch.inference_mode()
    def _capture(self) -> None:
        start = time.perf_counter()
        device = self.runner.device
        free_before = free_before_capture(device)
        self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        self.page_table.sync_device()  # nothing may be left to copy inside a capture
        model = self.runner.model
        for size in reversed(self.sizes):
            batch = self._static_batch(size)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the capture: Triton compiles, the allocator settles
                    model(batch)
                torch.cuda.synchronize(device)
                self._capturing, self._recording = [], []
                try:
                    self._begin_piece()
                    self.hidden[size] = model(batch)
                    self._capturing[-1].capture_end()
                    self.pieces[size], self.calls[size] = self._capturing, self._recording
                finally:
                    self._capturing = self._recording = None
            torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the warm-ups' blocks, cached for the capture stream, which nothing else reuses
        self.capture_mib = used_since(device, free_before)
        self.capture_s = time.perf_counter() - start
        pieces = len(next(iter(self.pieces.values())))
        logger.info("captured piecewise CUDA graphs for prompt forwards of %s tokens (%d pieces each) in %.1f s, "
                    "%.0f MiB", _ranges(self.sizes), pieces, self.capture_s, self.capture_mib)  # fmt: skip


def weak_alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor over t's memory (same dtype, shape, strides) that does not own it: t's memory is freed, and may be
    reused, once t is gone, as for a raw pointer. torch's CUDA-graph trees rebuild graph outputs the same way."""
    storage = t.untyped_storage()
    unowned = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), t.device, storage.nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(unowned, t.storage_offset(), t.shape, t.stride())


def _ranges(sizes: tuple[int, ...]) -> str:
    return ", ".join(map(str, sizes)) if len(sizes) <= 8 else f"{sizes[0]}, {sizes[1]}, ... {sizes[-1]} ({len(sizes)})"
