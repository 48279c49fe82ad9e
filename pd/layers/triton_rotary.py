"""Rotary embedding of q and k as one Triton kernel (the reference's table lookup, casts, multiplies, adds and
concatenations are ~16 launches per layer: at decode sizes more time than the attention itself).

Each program rotates every head of q and k for one token, reading its cos/sin row of the float32 table once.
The rotation is computed in float32 and rounded once (the reference rounds each product to the input dtype;
in float32 the two agree to rounding, in bf16 this one is the closer to the float32 model).

Qwen3's per-head q/k RMSNorm before the rotation can run in the same kernel (``norms``): at decode it was two more
launches per layer. Its arithmetic is pd.layers.triton_rmsnorm's (sum of squares and scaling in float32, the
normalised head rounded to the input dtype, times the weight and rounded again), so fused or not the rotation sees
the same values up to the order of the sum of squares.

The kernel can also write the new tokens' K (rotated) and V straight into their slots of the paged KV cache
(``store``), the attention backend's two index copies per layer, when the cache holds the model's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, out_ptr, row_x, row_out, head_stride_x, head_stride_out, num_heads, cos, sin, w_ptr, eps,
                  HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr,
                  NORM: tl.constexpr):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (d < HALF)
    src = x_ptr + row_x + heads * head_stride_x
    if INTERLEAVED:  # pairs (2i, 2i+1): each head's row loaded whole and split, not as two stride-2 gathers
        first, second = 2 * d, 2 * d + 1
        d2 = tl.arange(0, 2 * BLOCK_D)[None, :]
        pairs = tl.load(src + d2, mask=(heads < num_heads) & (d2 < 2 * HALF), other=0.0).to(tl.float32)
        x0, x1 = tl.split(tl.reshape(pairs, (BLOCK_H, BLOCK_D, 2)))
    else:  # halves (i, i + dim/2)
        first, second = d, d + HALF
        x0 = tl.load(src + first, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(src + second, mask=mask, other=0.0).to(tl.float32)
    if NORM:  # RMSNorm of each head over its 2 * HALF values, rounded as triton_rmsnorm rounds
        dtype = out_ptr.dtype.element_ty
        rstd = 1.0 / tl.sqrt((tl.sum(x0 * x0, axis=1) + tl.sum(x1 * x1, axis=1)) / (2 * HALF) + eps)[:, None]
        w0 = tl.load(w_ptr + first, mask=d < HALF, other=0.0).to(tl.float32)
        w1 = tl.load(w_ptr + second, mask=d < HALF, other=0.0).to(tl.float32)
        x0 = (w0 * (x0 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    dst = out_ptr + row_out + heads * head_stride_out
    y0, y1 = (x0 * cos - x1 * sin).to(out_ptr.dtype.element_ty), (x1 * cos + x0 * sin).to(out_ptr.dtype.element_ty)
    if INTERLEAVED:  # joined back into pairs and stored as whole rows
        d2 = tl.arange(0, 2 * BLOCK_D)[None, :]
        tl.store(dst + d2, tl.reshape(tl.join(y0, y1), (BLOCK_H, 2 * BLOCK_D)),
                 mask=(heads < num_heads) & (d2 < 2 * HALF))  # fmt: skip
    else:
        tl.store(dst + first, y0, mask=mask)
        tl.store(dst + second, y1, mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, q_out, k_out, table_ptr, pos_ptr, q_stride, q_head_stride, k_stride,
                   k_head_stride, q_out_stride, q_out_head_stride, k_out_stride, k_out_head_stride, num_q_heads,
                   num_k_heads, qw_ptr, kw_ptr, q_eps, k_eps, v_ptr, v_out, loc_ptr,
                   v_stride, v_head_stride, v_dim, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, INTERLEAVED: tl.constexpr, NORM: tl.constexpr,
                   STORE: tl.constexpr):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    row = table_ptr + pos * (2 * HALF)  # the table is [max_position, 2, HALF]: cos then sin
    cos = tl.load(row + d, mask=d < HALF, other=0.0)
    sin = tl.load(row + HALF + d, mask=d < HALF, other=0.0)
    _rotate_heads(q_ptr, q_out, t * q_stride, t * q_out_stride, q_head_stride, q_out_head_stride, num_q_heads, cos,
                  sin, qw_ptr, q_eps, HALF, BLOCK_HQ, BLOCK_D, INTERLEAVED, NORM)  # fmt: skip
    # k_out is a [T, Hk, D] tensor, or with STORE the cache's K buffer [slots, Hk, D], row loc[t]
    k_row = tl.load(loc_ptr + t).to(tl.int64) if STORE else t
    _rotate_heads(k_ptr, k_out, t * k_stride, k_row * k_out_stride, k_head_stride, k_out_head_stride, num_k_heads,
                  cos, sin, kw_ptr, k_eps, HALF, BLOCK_HK, BLOCK_D, INTERLEAVED, NORM)  # fmt: skip
    if STORE:  # V [T, Hk, Dv] (strided) into the cache's V buffer [slots, Hk, Dv], row loc[t], as it is
        heads = tl.arange(0, BLOCK_HK)[:, None]
        dv = tl.arange(0, BLOCK_DV)[None, :]
        mask = (heads < num_k_heads) & (dv < v_dim)
        v = tl.load(v_ptr + t * v_stride + heads * v_head_stride + dv, mask=mask)
        tl.store(v_out + k_row * num_k_heads * v_dim + heads * v_dim + dv, v, mask=mask)


Norms = tuple[torch.Tensor, float, torch.Tensor, float]  # q's RMSNorm weight [D] and eps, then k's


KVStore = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # v, K buffer, V buffer, slots


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, table: torch.Tensor,
                 interleaved: bool, norms: Norms | None = None, store: KVStore | None = None,
                 inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """positions [T] int64; q [T, Hq, D], k [T, Hk, D] (strided rows and heads allowed, D contiguous); table
    [max_position, 2, D/2] float32 (cos, sin, scaling applied) -> new contiguous q, k rotated, in their dtypes.
    inplace: q and k themselves are overwritten and returned (views of a wider tensor stay views: MLA rotates the
    rope columns of its query and latent where they lie, so nothing is concatenated afterwards).
    norms: each head of q and k RMS-normalised over D with these weights first (Qwen3's q_norm / k_norm).
    store: (v [T, Hk, Dv], K buffer [S, Hk, D], V buffer [S, Hk, Dv], slots [T] int64): rotated K and V are
    written to rows slots of the (contiguous, q-dtype) cache buffers instead, and the k returned is None."""
    num_tokens, num_q, dim = q.shape
    num_k = k.shape[1]
    assert k.shape[0] == num_tokens and k.shape[2] == dim and dim % 2 == 0, (q.shape, k.shape)
    assert table.dtype == torch.float32 and table.shape[1:] == (2, dim // 2), table.shape
    if inplace:
        assert store is None and q.stride(-1) == 1 and k.stride(-1) == 1, "in place: strided rows, D contiguous"
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out = q if inplace else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if store is None:
        k_out = k if inplace else torch.empty(k.shape, dtype=k.dtype, device=k.device)
        v, v_out, loc = k, k_out, positions  # unread without store
    else:
        v, k_out, v_out, loc = store
        assert k_out.dtype == v_out.dtype == k.dtype == v.dtype, "the cache holds the model's dtype"
        assert k_out.is_contiguous() and v_out.is_contiguous() and v.stride(-1) == 1 and loc.dtype == torch.int64
        assert k_out.shape[1:] == k.shape[1:] and v_out.shape[1:] == v.shape[1:] and v.shape[:2] == k.shape[:2]
    if num_tokens == 0:
        return q_out, None if store is not None else k_out
    table = table.contiguous()
    if norms is not None:
        assert norms[0].shape == norms[2].shape == (dim,), (norms[0].shape, norms[2].shape, dim)
    q_w, q_eps, k_w, k_eps = norms if norms is not None else (table, 0.0, table, 0.0)  # unread without norms
    _rotary_kernel[(num_tokens,)](q, k, q_out, k_out, table, positions, q.stride(0), q.stride(1), k.stride(0),
                                  k.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
                                  num_q, num_k, q_w, k_w, q_eps, k_eps, v, v_out, loc, v.stride(0),
                                  v.stride(1), v.shape[-1], HALF=dim // 2, BLOCK_HQ=triton.next_power_of_2(num_q),
                                  BLOCK_HK=triton.next_power_of_2(num_k), BLOCK_D=triton.next_power_of_2(dim // 2),
                                  BLOCK_DV=triton.next_power_of_2(v.shape[-1]), INTERLEAVED=interleaved,
                                  NORM=norms is not None, STORE=store is not None, num_warps=4)  # fmt: skip
    return q_out, None if store is not None else k_out
