"""Paged attention on Triton kernels (the CUDA default): KV pages are read in place through the device page table.

A decode step (one new token per request) runs the split-KV decode kernel; any other batch (prefill chunks,
mixed with decode tokens or not) runs the extend kernel, which takes each request's cached prefix and new tokens
with the causal mask inside. MLA runs on the same kernels as one shared KV head of width C + R whose values are
the first C columns of the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from pd.attention.triton_decode import decode_attention, default_num_kv_splits, fp8_rows_fit
from pd.attention.triton_extend import extend_attention
from pd.engine.forward_batch import BatchLayout, ForwardBatch
from pd.engine.kv_cache import KVCache
from pd.layers import fp8_rows

if TYPE_CHECKING:
    from pd.attention import LatentExpand


@dataclass
class TritonAttentionMeta:
    """What the kernels take, all on the device. B requests.

    rows, prefix_lens, extend_lens, q_starts: [B] int32 (the layout's); kv_lens: [B] int32 = prefix + extend.
    max_extend_len: host int, sizes the extend grid. decode: the batch is one token per request.
    max_context_len: host int, the longest context (a CUDA graph's: the server's context limit).
    num_kv_splits: the decode kernel's KV split count per attention shape (Hq, Hk, Dk, Dv), chosen at the first
        layer of that shape and kept for the forward (and, under a CUDA graph, baked into the capture).
    """

    rows: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    q_starts: torch.Tensor
    kv_lens: torch.Tensor
    max_extend_len: int
    decode: bool
    max_context_len: int
    num_kv_splits: dict[tuple[int, int, int, int], int] = field(default_factory=dict)
    context: ExpandedContext | None = None  # forward_expanded's, built at its first layer and kept for the forward


@dataclass(frozen=True)
class ExpandedContext:
    """Where forward_expanded finds each request's context: its S context tokens (prefix, then new) laid out
    request after request, the extend kernel's keys addressed directly (contiguous).

    slots: [S] int64, the KV slot of each context token (to read its latent back from the cache).
    firsts: [B, 1] int32, the row of request b's first key in the expanded keys and values.
    rows:  [B] int32, 0..B-1 (request b reads row b of firsts).
    new_only: no request has cached tokens, so the context is the batch's new tokens in their own order.
    """

    slots: torch.Tensor
    firsts: torch.Tensor
    rows: torch.Tensor
    new_only: bool = False


def expanded_context(layout: BatchLayout) -> ExpandedContext:
    """The batch's ExpandedContext: lengths from the host, page-table rows looked up on the device (one copy, a
    gather; no sync). A batch of prompts without cached prefixes (the usual prompt forward) needs none of that: its
    context is its new tokens, whose slots and starts the batch already holds on the device."""
    assert layout.page_table is not None
    device = layout.rows.device
    if not any(layout.host_prefix_lens):
        rows = torch.arange(layout.num_reqs, dtype=torch.int32, device=device)
        return ExpandedContext(layout.out_loc, layout.q_starts.unsqueeze(1), rows, new_only=True)
    prefix = np.asarray(layout.host_prefix_lens, dtype=np.int64)
    lengths = prefix + np.asarray(layout.host_extend_lens, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    total, num_reqs = int(lengths.sum()), len(lengths)
    positions = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
    request = np.repeat(np.arange(num_reqs, dtype=np.int64), lengths)
    host = torch.empty(2 * total + num_reqs, dtype=torch.int64, pin_memory=device.type == "cuda")
    buf = host.numpy()
    buf[:total], buf[total : 2 * total], buf[2 * total :] = positions, request, starts
    facts = host.to(device, non_blocking=True)
    positions_d, request_d = facts[:total], facts[total : 2 * total]
    slots = layout.page_table.slots(layout.rows.long()[request_d], positions_d)
    firsts = facts[2 * total :].view(num_reqs, 1).to(torch.int32)
    return ExpandedContext(slots, firsts, torch.arange(num_reqs, dtype=torch.int32, device=device))


@dataclass
class _GraphState:
    """Static buffers a captured decode graph reads: request rows and context lengths of up to max_bs requests."""

    rows: torch.Tensor
    prefix_lens: torch.Tensor
    kv_lens: torch.Tensor
    ones: torch.Tensor
    q_starts: torch.Tensor
    max_context_len: int


class TritonAttentionBackend:
    name = "triton"
    writes_fp8_rows = True  # forward takes fp8_group (pd.layers.attention.paged_attention asks for it)

    def __init__(self) -> None:
        self.graph: _GraphState | None = None

    def prepare(self, layout: BatchLayout, kv_cache: KVCache) -> TritonAttentionMeta:
        return TritonAttentionMeta(
            rows=layout.rows,
            prefix_lens=layout.prefix_lens,
            extend_lens=layout.extend_lens,
            q_starts=layout.q_starts,
            kv_lens=layout.prefix_lens + layout.extend_lens if layout.kv_lens is None else layout.kv_lens,
            max_extend_len=layout.max_extend_len,
            decode=layout.is_decode,
            max_context_len=layout.max_context_len,
        )

    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor | None,
        batch: ForwardBatch,
        scale: float,
        kv_heads: slice | None = None,
        v_dim: int | None = None,
        kv_stored: bool = False,
        out: torch.Tensor | None = None,
        fp8_group: int | None = None,
    ) -> torch.Tensor:
        """The AttentionBackend protocol's forward. fp8_group: a decode batch's output also comes quantized per that
        many columns of its [T, Hq * Dv] rows, attached to it (pd.layers.fp8_rows) for a block-FP8 o_proj; other
        batches (and head dims the kernel cannot group) come without."""
        meta: TritonAttentionMeta = batch.attn_meta  # type: ignore[assignment]
        cache = batch.kv_cache
        if v is None:  # MLA: one latent buffer; values are its first v_dim columns (a strided view)
            assert v_dim is not None
            cache.store(layer_id, batch.layout.out_loc, k)
            (k_buf,) = cache.buffers[layer_id]
            v_buf = k_buf[..., :v_dim]
        else:
            if not kv_stored:
                cache.store(layer_id, batch.layout.out_loc, k, v)
            k_buf, v_buf = cache.buffers[layer_id]
            if kv_heads is not None and kv_heads != slice(0, k.shape[1]):
                k_buf, v_buf = k_buf[:, kv_heads], v_buf[:, kv_heads]
        if out is None:
            out = q.new_empty(q.shape[0], q.shape[1], v_buf.shape[-1])
        assert batch.layout.page_table is not None
        pages, page_size = batch.layout.page_table.pages, cache.page_size
        if meta.decode:
            shape = (q.shape[1], k_buf.shape[1], k_buf.shape[2], v_buf.shape[2])
            splits = meta.num_kv_splits.get(shape)
            if splits is None:
                splits = meta.num_kv_splits[shape] = default_num_kv_splits(
                    q.shape[0], meta.max_context_len, q.device, num_q_heads=shape[0], num_kv_heads=shape[1],
                    head_dim_k=shape[2], head_dim_v=shape[3])  # fmt: skip
            quant = None
            if fp8_group and fp8_rows_fit(v_buf.shape[-1], fp8_group):
                width = q.shape[1] * v_buf.shape[-1]
                quant = (torch.empty(q.shape[0], width, dtype=torch.float8_e4m3fn, device=q.device),
                         torch.empty(q.shape[0], width // fp8_group, dtype=torch.float32, device=q.device), fp8_group)
            decode_attention(q, k_buf, v_buf, out, pages, meta.rows, meta.kv_lens, scale, page_size, splits,
                             fp8_rows=quant)  # fmt: skip
            if quant is not None:
                fp8_rows.attach(out, quant[0].view(out.shape), quant[1], fp8_group)
        else:
            extend_attention(q, k_buf, v_buf, out, pages, meta.rows, meta.q_starts, meta.extend_lens,
                             meta.prefix_lens, meta.max_extend_len, scale, page_size)  # fmt: skip
        return out

    def forward_expanded(
        self,
        layer_id: int,
        q: torch.Tensor,
        latent: torch.Tensor,
        expand: LatentExpand,
        v_dim: int,
        batch: ForwardBatch,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        meta: TritonAttentionMeta = batch.attn_meta  # type: ignore[assignment]
        cache = batch.kv_cache
        cache.store(layer_id, batch.layout.out_loc, latent)
        if meta.context is None:
            meta.context = expanded_context(batch.layout)
        context = meta.context
        if context.new_only and cache.dtype == latent.dtype:
            latent_S1X = latent  # what the gather would read back: the latents just stored, in the same order
        else:
            (latent_S1X,) = cache.gather(layer_id, context.slots)
        k_SHN, k_rope_S1R, v_SHV = expand(latent_S1X.flatten(1).to(q.dtype))
        if out is None:
            out = q.new_empty(q.shape[0], q.shape[1], v_dim)
        extend_attention(q, k_SHN, v_SHV, out, context.firsts, context.rows, meta.q_starts, meta.extend_lens,
                         meta.prefix_lens, meta.max_extend_len, scale, page_size=1, k_rope=k_rope_S1R,
                         contiguous=True)  # fmt: skip
        return out

    # ---- CUDA graphs (decode batches) ----
    def init_graph_state(self, max_bs: int, kv_cache: KVCache, max_context_len: int,
                         facts: torch.Tensor | None = None) -> None:  # fmt: skip
        """Static buffers for up to ``max_bs`` requests; decode split counts are sized for ``max_context_len``."""
        device = kv_cache.device
        if facts is None:
            facts = torch.zeros(3, max_bs, dtype=torch.int32, device=device)
            facts[2].fill_(1)
        assert facts.shape == (3, max_bs) and facts.dtype == torch.int32, (facts.shape, facts.dtype)
        self.graph = _GraphState(
            rows=facts[0],
            prefix_lens=facts[1],
            kv_lens=facts[2],
            ones=torch.ones(max_bs, dtype=torch.int32, device=device),
            q_starts=torch.arange(max_bs, dtype=torch.int32, device=device),
            max_context_len=max_context_len,
        )

    def capture_meta(self, bs: int, layout: BatchLayout) -> TritonAttentionMeta:
        g = self.graph
        assert g is not None, "init_graph_state first"
        return TritonAttentionMeta(rows=g.rows[:bs], prefix_lens=g.prefix_lens[:bs], extend_lens=g.ones[:bs],
                                   q_starts=g.q_starts[:bs], kv_lens=g.kv_lens[:bs], max_extend_len=1,
                                   decode=True, max_context_len=g.max_context_len)  # fmt: skip

    def replay_prepare(self, bs: int, layout: BatchLayout) -> None:
        """Real requests first; padding requests (up to bs) read one slot of row 0 and are discarded."""
        g = self.graph
        assert g is not None, "init_graph_state first"
        n = layout.num_reqs
        g.rows[:n].copy_(layout.rows)
        g.prefix_lens[:n].copy_(layout.prefix_lens)
        torch.add(layout.prefix_lens, layout.extend_lens, out=g.kv_lens[:n])
        g.rows[n:bs].zero_()
        g.prefix_lens[n:bs].zero_()
        g.kv_lens[n:bs].fill_(1)
