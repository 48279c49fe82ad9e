"""Paged attention over a ragged batch (pure torch; the reference every faster backend is tested against).

New K/V are written into the paged cache first, then each request's whole context is gathered into a padded
[B, L] block and attended with one scaled_dot_product_attention call under the batch's causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pd.engine.forward_batch import AttentionMetadata, ForwardBatch


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, Hq, D]; k [B, L, Hk, D]; v [B, L, Hk, Dv] (Hq a multiple of Hk) -> [T, Hq, Dv] in q's dtype."""
    num_heads = q.shape[1]
    q_b = q[meta.query_index].transpose(1, 2)  # [B, Hq, Q, D]
    out = F.scaled_dot_product_attention(
        q_b,
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=meta.mask,
        scale=scale,
        enable_gqa=num_heads != k.shape[2],
    )  # [B, Hq, Q, Dv]
    out = out.transpose(1, 2).reshape(-1, num_heads, v.shape[-1])
    return out[meta.token_index]


def paged_attention(
    layer_id: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    kv_heads: slice | None = None,
) -> torch.Tensor:
    """Multi-head / grouped-query attention. q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] -> [T, Hq, Dv].
    All Hk heads are cached; the queries attend over ``kv_heads`` of them (default all), a tensor-parallel
    rank's share."""
    batch.kv_cache.store(layer_id, batch.attn.out_loc, k, v)
    k_all, v_all = batch.kv_cache.gather(layer_id, batch.attn.kv_slots)
    if kv_heads is not None and kv_heads != slice(0, k.shape[1]):
        k_all, v_all = k_all[:, :, kv_heads], v_all[:, :, kv_heads]
    return attend(q, k_all, v_all, batch.attn, scale)
