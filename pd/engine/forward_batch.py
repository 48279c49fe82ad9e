"""What one model forward sees: the new tokens of a batch of requests and where their KV lives.

A batch mixes requests at different stages: a prefill chunk is `extend_len` new tokens after `prefix_len`
tokens already in the KV cache, a decode step is one new token. The scheduler's facts about the batch (page-table
rows, prefix and new lengths, the slots the new tokens write) are gathered once per step in a `BatchLayout`;
the attention backend builds its own metadata from them, and every layer shares both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pd.engine.kv_cache import KVCache, ReqToToken

if TYPE_CHECKING:
    from pd.attention import AttentionBackend

# A batch's new token ids: a list, or an int64 array (prompt chunks are slices of each request's prompt array).
TokenIds = list[int] | np.ndarray


@dataclass
class BatchLayout:
    """The backend-neutral facts of a ragged batch of B requests and T new tokens (device tensors on the KV
    cache's device, plus the host values a backend may plan with).

    rows:         [B] int32, each request's row of the page table.
    prefix_lens:  [B] int32, tokens of each request already in the cache.
    extend_lens:  [B] int32, new tokens of each request (>= 1).
    q_starts:     [B] int32, first of each request's rows among the T new tokens.
    out_loc:      [T] int64, KV slot each new token writes.
    page_table:   the [R, P] int32 page table the rows index (kernels read pages through it, in place); None
                  for an empty batch.
    host_prefix_lens, host_extend_lens: the same lengths as Python lists.
    kv_lens:      [B] int32, prefix + extend (built with the batch's other facts; None where a layout is made
                  elsewhere, and a backend then adds them up).
    """

    rows: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    q_starts: torch.Tensor
    out_loc: torch.Tensor
    page_table: ReqToToken | None
    host_prefix_lens: list[int]
    host_extend_lens: list[int]
    kv_lens: torch.Tensor | None = None

    @property
    def num_reqs(self) -> int:
        return len(self.host_extend_lens)

    @property
    def max_extend_len(self) -> int:
        return max(self.host_extend_lens, default=0)

    @property
    def max_context_len(self) -> int:
        return max((p + e for p, e in zip(self.host_prefix_lens, self.host_extend_lens, strict=True)), default=0)

    @property
    def is_decode(self) -> bool:
        """Every request adds exactly one token (a decode step)."""
        return self.max_extend_len == 1

    @property
    def mostly_new(self) -> bool:
        """Not a decode step, and no more cached tokens than new ones (a prompt's forward): MLA then attends with
        per-head keys and values expanded from the context's latents (pd.models.mla), which costs a GEMM over the
        whole context, instead of in the latent space."""
        return not self.is_decode and sum(self.host_prefix_lens) <= sum(self.host_extend_lens)


@dataclass
class ForwardBatch:
    """Inputs of one forward pass.

    input_ids:    [T] int64 new tokens, request after request.
    positions:    [T] int64 position of each new token in its sequence.
    logits_index: [S] int64 rows of the T tokens whose next-token logits are wanted.
    layout:       the batch's neutral facts.
    attn_backend: the attention backend every layer calls; attn_meta: what it built from ``layout``.
    moe_mode:     the forward's dispatch mode, "normal" or "low_latency" (every rank of an instance runs the same;
                  under --deepep-mode auto it picks each MoE layer's dispatcher). Set where the batch is built,
                  read by the layers: nothing else holds a current mode.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    layout: BatchLayout
    kv_cache: KVCache
    logits_index: torch.Tensor
    attn_backend: AttentionBackend
    attn_meta: object
    moe_mode: str = "normal"

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_forward_batch(
    input_ids: TokenIds,
    rows: list[int],
    prefix_lens: list[int],
    extend_lens: list[int],
    page_table: ReqToToken,
    kv_cache: KVCache,
    attn_backend: AttentionBackend,
    logits_index: list[int] | None = None,
    moe_mode: str = "normal",
    token_source: torch.Tensor | None = None,
) -> ForwardBatch:
    """Builds the batch tensors on the KV cache's device (one host-to-device copy, from pinned memory on CUDA, so
    the host does not wait for a step still running).

    input_ids:    the T new tokens, request after request (T == sum(extend_lens)).
    rows:         each request's row in ``page_table``.
    prefix_lens:  tokens of each request already in the cache.
    extend_lens:  new tokens of each request (>= 1).
    logits_index: token rows whose logits are wanted; default: the last new token of each request.
    token_source: [R] int64 on the device, each page-table row's newest sampled token; a negative entry of
                  input_ids is read from it (a token the host has not seen yet, under overlap scheduling).
    """
    device = kv_cache.device
    # Requests admitted since the last forward: their pages travel in this batch's copy, and reach the device table
    # before any kernel reads it (one pinned buffer and one copy less than a sync of their own).
    entries = page_table.unsynced_entries()
    num_tokens, num_reqs = len(input_ids), len(rows)
    # The host arithmetic is numpy's: torch's CPU ops cost microseconds each, and repeat_interleave opens a
    # parallel region per call, which on a many-core host (or one with more threads than cores) costs milliseconds.
    q_lens = np.asarray(extend_lens, dtype=np.int64)
    prefix = np.asarray(prefix_lens, dtype=np.int64)
    rows_np = np.asarray(rows, dtype=np.int64)
    ends = np.cumsum(q_lens)
    starts = ends - q_lens
    logits = ends - 1 if logits_index is None else np.asarray(logits_index, dtype=np.int64)
    positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(prefix - starts, q_lens)
    token_rows = np.repeat(rows_np, q_lens)
    # One host-to-device copy of everything: tokens, positions, rows, logits rows, KV slots (int64), then the five
    # per-request facts (int32, written as such: no conversion launch on the device), then the page-table entries
    # (int64 indices, int32 values). Every piece starts 16 bytes into the buffer (padding): Triton compiles a kernel
    # variant per pointer alignment, so alignments that moved with the batch's sizes compiled a variant the warm-up
    # had not met, on a request.
    out_loc = page_table.host_slots(token_rows, positions)
    pieces = (np.asarray(input_ids, dtype=np.int64), positions, token_rows, logits, out_loc)
    if entries is not None:
        pieces += (entries[0],)
    lengths = [len(p) for p in pieces]
    padded = [-(-n // 2) * 2 for n in lengths]  # int64s, to a multiple of 16 bytes
    facts_width = -(-num_reqs // 4) * 4  # int32s: each row of [5, facts_width] stays 16-byte aligned
    num_values = 0 if entries is None else -(-len(entries[1]) // 4) * 4
    # empty, not zeros: the padding between pieces is never read, and zeroing is one more parallel region (above)
    host = torch.empty(sum(padded) + (5 * facts_width + num_values) // 2, dtype=torch.int64,
                       pin_memory=device.type == "cuda")  # fmt: skip
    buf = host.numpy()
    starts_at, offset = [], 0
    for piece, width in zip(pieces, padded, strict=True):
        buf[offset : offset + len(piece)] = piece
        starts_at.append(offset)
        offset += width
    int32s = buf[offset:].view(np.int32)
    int32s[: 5 * facts_width].reshape(5, facts_width)[:, :num_reqs] = (rows_np, prefix, q_lens, starts,
                                                                       prefix + q_lens)  # fmt: skip
    if entries is not None:
        int32s[5 * facts_width : 5 * facts_width + len(entries[1])] = entries[1]
    tokens = host.to(device, non_blocking=True)
    ids_d, positions_d, token_rows_d, logits_d, out_loc_d, *index_d = (tokens[o : o + n]
                                                                       for o, n in zip(starts_at, lengths, strict=True))
    int32s_d = tokens[offset:].view(torch.int32)
    facts = int32s_d[: 5 * facts_width].view(5, facts_width)[:, :num_reqs]
    if entries is not None:
        page_table.scatter_entries(index_d[0], int32s_d[5 * facts_width : 5 * facts_width + len(entries[1])])
    if token_source is not None:
        read_device_tokens(pieces[0], ids_d, token_source, token_rows_d)
    layout = BatchLayout(
        rows=facts[0],
        prefix_lens=facts[1],
        extend_lens=facts[2],
        q_starts=facts[3],
        out_loc=out_loc_d,
        page_table=page_table,
        host_prefix_lens=list(prefix_lens),
        host_extend_lens=list(extend_lens),
        kv_lens=facts[4],
    )
    return ForwardBatch(
        input_ids=ids_d,
        positions=positions_d,
        layout=layout,
        kv_cache=kv_cache,
        logits_index=logits_d,
        attn_backend=attn_backend,
        attn_meta=attn_backend.prepare(layout, kv_cache),
        moe_mode=moe_mode,
    )


def read_device_tokens(host_ids: np.ndarray, ids_d: torch.Tensor, token_source: torch.Tensor,
                       rows_d: torch.Tensor) -> None:  # fmt: skip
    """Overwrites, in place, the tokens ids_d [T] whose host id is negative (sampled by the step in flight, under
    overlap scheduling) with their page-table row's newest token, token_source[rows_d]. Which tokens is decided on
    the host: a decode step under overlap reads every one from the device (one gather), most other steps none."""
    from_device = host_ids < 0
    if from_device.all():
        torch.index_select(token_source, 0, rows_d, out=ids_d)
    elif from_device.any():
        torch.where(ids_d < 0, token_source[rows_d], ids_d, out=ids_d)


def empty_layout(device: torch.device, page_table: ReqToToken | None = None) -> BatchLayout:
    """The layout of no requests."""
    none32 = torch.zeros(0, dtype=torch.int32, device=device)
    return BatchLayout(rows=none32, prefix_lens=none32, extend_lens=none32, q_starts=none32, out_loc=none32.long(),
                       page_table=page_table, host_prefix_lens=[], host_extend_lens=[])  # fmt: skip


def empty_forward_batch(kv_cache: KVCache, attn_backend: AttentionBackend, moe_mode: str = "normal") -> ForwardBatch:
    """A batch of no requests and no tokens (an idle rank's share of a collective forward)."""
    layout = empty_layout(kv_cache.device)
    none64 = layout.out_loc
    return ForwardBatch(input_ids=none64, positions=none64, layout=layout, kv_cache=kv_cache, logits_index=none64,
                        attn_backend=attn_backend, attn_meta=attn_backend.prepare(layout, kv_cache),
                        moe_mode=moe_mode)  # fmt: skip
