"""Paged attention in pure torch: the CPU path and the reference every faster backend is tested against.

New K/V are written into the paged cache first, then each request's whole context is gathered into a padded
[B, L] block and attended with one scaled_dot_product_attention call under the batch's causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pd.engine.forward_batch import BatchLayout, ForwardBatch
from pd.engine.kv_cache import KVCache

if TYPE_CHECKING:
    from pd.attention import LatentExpand


@dataclass
class TorchAttentionMeta:
    """The padded layout SDPA takes. B requests, T new tokens, Q = max new tokens of a request, L = max context.

    kv_slots:     [B, L] int64, KV slot of every context position (padding points at a valid slot, masked).
    query_index:  [B, Q] int64, index into the T new tokens (padding repeats a valid index).
    mask:         [B, 1, Q, L] bool, True where a query may attend a key (causal within the request).
    token_index:  [T] int64, where each new token sits in the flattened [B*Q] padded layout.
    """

    kv_slots: torch.Tensor
    query_index: torch.Tensor
    mask: torch.Tensor
    token_index: torch.Tensor


class TorchAttentionBackend:
    name = "torch"

    def prepare(self, layout: BatchLayout, kv_cache: KVCache) -> TorchAttentionMeta:
        device = kv_cache.device
        q_lens = torch.tensor(layout.host_extend_lens, dtype=torch.int64)
        prefix = torch.tensor(layout.host_prefix_lens, dtype=torch.int64)
        num_reqs = len(q_lens)
        max_q, max_kv = max(layout.max_extend_len, 1), max(layout.max_context_len, 1)
        starts = torch.cumsum(q_lens, 0) - q_lens
        # Per-request query offsets [B, Q]; invalid (padding) entries are clamped into the request.
        offs = torch.arange(max_q, dtype=torch.int64)[None, :]
        valid_q = offs < q_lens[:, None]
        query_index = starts[:, None] + torch.minimum(offs, (q_lens[:, None] - 1).clamp(min=0))
        q_pos = torch.where(valid_q, prefix[:, None] + offs, torch.zeros_like(offs))
        key_pos = torch.arange(max_kv, dtype=torch.int64)
        mask = key_pos[None, None, :] <= q_pos[:, :, None]  # [B, Q, L]; padding queries see key 0 only
        token_index = (torch.arange(num_reqs)[:, None] * max_q + offs)[valid_q]
        if layout.page_table is None:
            kv_slots = torch.zeros(0, max_kv, dtype=torch.int64, device=device)
        else:
            key_pos_d = torch.arange(max_kv, dtype=torch.int64, device=device)
            kv_slots = layout.page_table.slots(layout.rows.long()[:, None], key_pos_d[None, :])
        return TorchAttentionMeta(
            kv_slots=kv_slots,
            query_index=query_index.to(device, non_blocking=True),
            mask=mask[:, None].to(device, non_blocking=True),
            token_index=token_index.to(device, non_blocking=True),
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
    ) -> torch.Tensor:
        meta: TorchAttentionMeta = batch.attn_meta  # type: ignore[assignment]
        cache = batch.kv_cache
        if v is None:  # MLA: one latent buffer; values are its first v_dim columns
            assert v_dim is not None
            cache.store(layer_id, batch.layout.out_loc, k)
            (k_all,) = cache.gather(layer_id, meta.kv_slots)
            v_all = k_all[..., :v_dim]
        else:
            if not kv_stored:
                cache.store(layer_id, batch.layout.out_loc, k, v)
            k_all, v_all = cache.gather(layer_id, meta.kv_slots)
        if kv_heads is not None and kv_heads != slice(0, k.shape[1]):
            k_all, v_all = k_all[:, :, kv_heads], v_all[:, :, kv_heads]
        result = attend(q, k_all.to(q.dtype), v_all.to(q.dtype), meta, scale)
        return result if out is None else out.copy_(result)

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
        meta: TorchAttentionMeta = batch.attn_meta  # type: ignore[assignment]
        cache = batch.kv_cache
        cache.store(layer_id, batch.layout.out_loc, latent)
        (latent_BL1X,) = cache.gather(layer_id, meta.kv_slots)
        num_reqs, length = meta.kv_slots.shape
        k_SHN, k_rope_S1R, v_SHV = expand(latent_BL1X.view(num_reqs * length, -1).to(q.dtype))
        k_SHD = torch.cat((k_SHN, k_rope_S1R.expand(-1, k_SHN.shape[1], -1)), dim=-1)
        result = attend(q, k_SHD.view(num_reqs, length, *k_SHD.shape[1:]),
                        v_SHV.reshape(num_reqs, length, *v_SHV.shape[1:]), meta, scale)  # fmt: skip
        return result if out is None else out.copy_(result)

    # CUDA graphs need static shapes; this backend's [B, L] gather has a data-dependent L.
    def init_graph_state(self, max_bs: int, kv_cache: KVCache, max_context_len: int,
                         facts: torch.Tensor | None = None) -> None:  # fmt: skip
        raise NotImplementedError("the torch attention backend cannot be captured in a CUDA graph; use triton")

    def capture_meta(self, bs: int, layout: BatchLayout) -> object:
        raise NotImplementedError("the torch attention backend cannot be captured in a CUDA graph; use triton")

    def replay_prepare(self, bs: int, layout: BatchLayout) -> None:
        raise NotImplementedError("the torch attention backend cannot be captured in a CUDA graph; use triton")


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TorchAttentionMeta, scale: float
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
