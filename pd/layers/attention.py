"""The attention call every model layer makes: the batch's backend stores the new KV and attends (pd.attention)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pd.engine.forward_batch import ForwardBatch

# MLA's expansion of context latents [S, C + R] into per-head keys and values (pd.models.mla.MLAttention._expand),
# handed to AttentionBackend.forward_expanded: (the keys' first Dk - R columns [S, H, Dk - R], their last R columns
# that every head shares [S, 1, R], values [S, H, Dv]); a key is the first two concatenated. (Defined here, not in
# pd.attention: the backends build on this package's kernels, not the reverse.)
LatentExpand = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def paged_attention(
    layer_id: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    kv_heads: slice | None = None,
    kv_stored: bool = False,
    fp8_group: int | None = None,
) -> torch.Tensor:
    """Multi-head / grouped-query attention. q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv] -> [T, Hq, Dv].
    All Hk heads are cached; the queries attend over ``kv_heads`` of them (default all), a tensor-parallel
    rank's share. kv_stored: the caller has written k and v into the cache already (the fused rotary kernel).
    fp8_group: the output may also come quantized per that many columns of its [T, Hq * Dv] rows, attached
    (pd.layers.fp8_rows), where the backend can write it (writes_fp8_rows: the Triton backend's decode batches)."""
    if batch.num_tokens == 0:
        return q.new_zeros(0, q.shape[1], v.shape[-1])
    if fp8_group and getattr(batch.attn_backend, "writes_fp8_rows", False):
        return batch.attn_backend.forward(layer_id, q, k, v, batch, scale, kv_heads=kv_heads, kv_stored=kv_stored,
                                          fp8_group=fp8_group)  # fmt: skip
    return batch.attn_backend.forward(layer_id, q, k, v, batch, scale, kv_heads=kv_heads, kv_stored=kv_stored)


def latent_attention(
    layer_id: int, q: torch.Tensor, latent: torch.Tensor, v_dim: int, batch: ForwardBatch, scale: float
) -> torch.Tensor:
    """MLA in the latent space: q [T, H, C + R] (nope part absorbed into the key projection), latent [T, 1, C + R]
    (the cached row) -> [T, H, v_dim], the attention-weighted first ``v_dim`` (= C) latent columns."""
    if batch.num_tokens == 0:
        return q.new_zeros(0, q.shape[1], v_dim)
    return batch.attn_backend.forward(layer_id, q, latent, None, batch, scale, v_dim=v_dim)


def expanded_latent_attention(
    layer_id: int,
    q: torch.Tensor,
    latent: torch.Tensor,
    expand: LatentExpand,
    v_dim: int,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """MLA as multi-head attention (a prompt's forward): q [T, H, Dk] (not absorbed), latent [T, 1, C + R] (the
    cached row); expand maps context latents [S, C + R] to per-head keys [S, H, Dk] and values [S, H, v_dim].
    -> [T, H, v_dim]."""
    if batch.num_tokens == 0:
        return q.new_zeros(0, q.shape[1], v_dim)
    return batch.attn_backend.forward_expanded(layer_id, q, latent, expand, v_dim, batch, scale)
