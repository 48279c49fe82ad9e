"""What one model forward sees: the new tokens of a batch of requests and where their KV lives.

A batch mixes requests at different stages: a prefill chunk is `extend_len` new tokens after `prefix_len`
tokens already in the KV cache, a decode step is one new token. The attention metadata is built once per
step (here, with tensor ops only) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pd.engine.kv_cache import KVCache


@dataclass
class AttentionMetadata:
    """Layout of a ragged batch for paged attention. B requests, T new tokens, Q = max new tokens of a request,
    L = max context (prefix + new) of a request.

    out_loc:      [T] int64, KV slot each new token writes.
    kv_slots:     [B, L] int64, KV slot of every context position (padding points at a valid slot, masked).
    query_index:  [B, Q] int64, index into the T new tokens (padding repeats a valid index).
    mask:         [B, 1, Q, L] bool, True where a query may attend a key (causal within the request).
    token_index:  [T] int64, where each new token sits in the flattened [B*Q] padded layout.
    max_q:        Q (1 for a decode-only batch).
    """

    out_loc: torch.Tensor
    kv_slots: torch.Tensor
    query_index: torch.Tensor
    mask: torch.Tensor
    token_index: torch.Tensor
    max_q: int


@dataclass
class ForwardBatch:
    """Inputs of one forward pass.

    input_ids:    [T] int64 new tokens, request after request.
    positions:    [T] int64 position of each new token in its sequence.
    logits_index: [S] int64 rows of the T tokens whose next-token logits are wanted.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    kv_cache: KVCache
    logits_index: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_forward_batch(
    input_ids: list[int],
    rows: list[int],
    prefix_lens: list[int],
    extend_lens: list[int],
    req_to_token: torch.Tensor,
    kv_cache: KVCache,
    logits_index: list[int] | None = None,
) -> ForwardBatch:
    """Builds the batch tensors on the KV cache's device.

    input_ids:    the T new tokens, request after request (T == sum(extend_lens)).
    rows:         each request's row in `req_to_token` ([R, max_context] int64 slot table).
    prefix_lens:  tokens of each request already in the cache.
    extend_lens:  new tokens of each request (>= 1).
    logits_index: token rows whose logits are wanted; default: the last new token of each request.
    """
    device = kv_cache.device
    num_reqs = len(rows)
    q_lens = torch.tensor(extend_lens, dtype=torch.int64)
    prefix = torch.tensor(prefix_lens, dtype=torch.int64)
    kv_lens = prefix + q_lens
    max_q, max_kv = int(q_lens.max()), int(kv_lens.max())
    starts = torch.cumsum(q_lens, 0) - q_lens
    if logits_index is None:
        logits_index = (starts + q_lens - 1).tolist()

    # Per-request query offsets [B, Q]; invalid (padding) entries are clamped into the request.
    offs = torch.arange(max_q, dtype=torch.int64)[None, :]
    valid_q = offs < q_lens[:, None]
    query_index = starts[:, None] + torch.minimum(offs, q_lens[:, None] - 1)
    q_pos = torch.where(valid_q, prefix[:, None] + offs, torch.zeros_like(offs))
    key_pos = torch.arange(max_kv, dtype=torch.int64)
    mask = key_pos[None, None, :] <= q_pos[:, :, None]  # [B, Q, L]; padding queries see key 0 only
    token_index = (torch.arange(num_reqs)[:, None] * max_q + offs)[valid_q]

    token_req = torch.repeat_interleave(torch.arange(num_reqs), q_lens)
    positions = torch.repeat_interleave(prefix, q_lens) + (torch.arange(int(q_lens.sum())) - starts[token_req])
    rows_t = torch.tensor(rows, dtype=torch.int64)
    table = req_to_token.to("cpu") if req_to_token.device.type != "cpu" else req_to_token
    out_loc = table[rows_t[token_req], positions]
    kv_slots = table[rows_t, :max_kv]

    attn = AttentionMetadata(
        out_loc=out_loc.to(device, non_blocking=True),
        kv_slots=kv_slots.to(device, non_blocking=True),
        query_index=query_index.to(device, non_blocking=True),
        mask=mask[:, None].to(device, non_blocking=True),
        token_index=token_index.to(device, non_blocking=True),
        max_q=max_q,
    )
    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.int64).to(device, non_blocking=True),
        positions=positions.to(device, non_blocking=True),
        attn=attn,
        kv_cache=kv_cache,
        logits_index=torch.tensor(logits_index, dtype=torch.int64).to(device, non_blocking=True),
    )


def empty_forward_batch(kv_cache: KVCache) -> ForwardBatch:
    """A batch of no requests and no tokens (an idle rank's share of a collective forward)."""
    device, none = kv_cache.device, torch.zeros(0, dtype=torch.int64, device=kv_cache.device)
    attn = AttentionMetadata(
        out_loc=none,
        kv_slots=torch.zeros(0, 1, dtype=torch.int64, device=device),
        query_index=torch.zeros(0, 1, dtype=torch.int64, device=device),
        mask=torch.zeros(0, 1, 1, 1, dtype=torch.bool, device=device),
        token_index=none,
        max_q=1,
    )
    return ForwardBatch(input_ids=none, positions=none, attn=attn, kv_cache=kv_cache, logits_index=none)
