"""Triton extend attention over the paged KV cache: new tokens of a ragged batch (prefill chunks, decode tokens)
attend to their request's cached prefix and to each other, causally, in one flash-attention style kernel.

Every key is read in place through the page table: the caller stores the new tokens' K/V before the call, so a
request's keys are its context positions [0, prefix + extend). One program takes BLOCK_M new tokens of one query
head of one request; new token i (position prefix + i) sees keys j <= prefix + i. Keys before the block's first
position are visible to all its rows and run without any mask; the few blocks on the diagonal run with the causal
mask; blocks past the last row's position are never loaded. Head dimensions, MLA's shared latent and padding are
handled as in pd.attention.triton_decode.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from pd.attention.triton_decode import LOG2E, check_paged_inputs, head_dim_blocks, v_is_k_prefix
from pd.layers.tma import has_tma

# Block sizes on Hopper (H100/H200), keyed by (head dim of K, head dim of V), bf16/fp16. The D=128 row is the best
# of `python benchmarks/bench_attention.py --sweep` on an H200 (2026-12-01, 8 x 1024 causal, 32/4 heads: 0.99x the
# time of SDPA's flash backend; 8 warps gave 1.11x); smaller dims keep BLOCK_M 128 with 4 warps;
# MLA (576/512) keeps a [32, 512] fp32 accumulator per program; (192, 128), MLA's expanded prefill (keys 128 + 64
# shared): the best of `bench_attention.py --mla-prefill-only --sweep` on an H200 (2026-12-03, 8 x 1024, 128 heads:
# 1.40 ms against 2.76 ms with 8 warps; torch SDPA 0.73 ms), swept with heads varying fastest; with each head's
# query blocks together (2026-12-04) 1.10 ms; re-swept with keys and values read through tensor descriptors (KV_DESC,
# contiguous keys only, 2026-12-05): 1.07 ms against 1.13 ms without, the same block sizes best either way.
# `python benchmarks/bench_attention.py --sweep` times alternatives; shapes nobody tuned get DEFAULT_EXTEND_CONFIG;
# fp32 halves both tiles.
EXTEND_CONFIGS: dict[tuple[int, int], dict[str, int]] = {
    (64, 64): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    (128, 128): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    (192, 128): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "KV_DESC": True},
    (256, 256): {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    (576, 512): {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
}
DEFAULT_EXTEND_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


@triton.jit
def _online_softmax(qk, m_i, l_i, scale_log2, pos, q_pos, MASKED: tl.constexpr):
    """The online softmax's step over one tile of raw scores: (running max, running sum, the tile's weights
    exp2(score - max), the factor alpha that rescales what was accumulated before). MASKED: key j counts for the
    row at position q_pos only when j <= q_pos."""
    qk *= scale_log2
    if MASKED:
        qk = tl.where(pos[None, :] <= q_pos[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), p, alpha


@triton.jit
def _attend_block(q, q_rest, m_i, l_i, acc, page_row, k_head, kr_head, v_head, stride_kt, stride_krt, stride_vt,
                  scale_log2, n0, kv_end, q_pos, kv_dk, offs_r, kv_dv, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_DR: tl.constexpr, V_IS_K: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  CONTIGUOUS: tl.constexpr):  # fmt: skip
    """One online-softmax step over keys [n0, n0 + BLOCK_N). MASKED: a diagonal block (keys past kv_end are not
    loaded, key j counts for the row at position q_pos only when j <= q_pos); else every key is visible to all."""
    pos = n0 + tl.arange(0, BLOCK_N)
    mask_n = pos < kv_end
    if CONTIGUOUS:  # the request's keys are rows [0, kv_end) past its heads' pointers: no page lookup
        slot = pos.to(tl.int64)
    else:
        if MASKED:
            page = tl.load(page_row + pos // PAGE_SIZE, mask=mask_n, other=0)
        else:
            page = tl.load(page_row + pos // PAGE_SIZE)
        slot = page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
    k_rows = k_head + slot[:, None] * stride_kt
    if MASKED:
        k = tl.load(k_rows + kv_dk[None, :], mask=mask_n[:, None], other=0.0)
    else:
        k = tl.load(k_rows + kv_dk[None, :])
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
    if BLOCK_DR > 0:  # the key's last BLOCK_DR columns, from their own rows (MLA's rope part: one shared head)
        kr_rows = kr_head + slot[:, None] * stride_krt
        if MASKED:
            k_rest = tl.load(kr_rows + offs_r[None, :], mask=mask_n[:, None], other=0.0)
        else:
            k_rest = tl.load(kr_rows + offs_r[None, :])
        qk = tl.dot(q_rest, tl.trans(k_rest.to(q.dtype)), qk, input_precision=DOT_PRECISION)
    m_new, l_i, p, alpha = _online_softmax(qk, m_i, l_i, scale_log2, pos, q_pos, MASKED)
    if V_IS_K:
        v = k
    else:
        v_ptrs = v_head + slot[:, None] * stride_vt + kv_dv[None, :]
        if MASKED:
            v = tl.load(v_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_block_desc(q, q_rest, m_i, l_i, acc, k_desc, kr_desc, v_desc, first, k_col, kr_col, v_col, scale_log2,
                       n0, kv_end, q_pos, BLOCK_N: tl.constexpr, BLOCK_DR: tl.constexpr, V_IS_K: tl.constexpr,
                       MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """_attend_block with the request's keys consecutive rows read through tensor descriptors (TMA on Hopper): K,
    its rope part and V at rows first + n0 and columns k_col / kr_col / v_col. A diagonal block's rows
    past kv_end are read too (the next request's keys, or zeros past the buffer) and count for nothing: masked out of
    the scores, their values zeroed."""
    pos = n0 + tl.arange(0, BLOCK_N)
    row = first + n0
    k = k_desc.load([row, k_col])
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
    if BLOCK_DR > 0:
        k_rest = kr_desc.load([row, kr_col])
        qk = tl.dot(q_rest, tl.trans(k_rest.to(q.dtype)), qk, input_precision=DOT_PRECISION)
    m_new, l_i, p, alpha = _online_softmax(qk, m_i, l_i, scale_log2, pos, q_pos, MASKED)
    if V_IS_K:
        v = k
    else:
        v = v_desc.load([row, v_col])
    if MASKED:  # rows past the request's keys: a zero weight times whatever they hold must stay zero
        v = tl.where((pos < kv_end)[:, None], v, tl.zeros_like(v))
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _extend_kernel(
    q_ptr, k_ptr, kr_ptr, v_ptr, out_ptr, page_table_ptr, req_rows_ptr, q_starts_ptr, extend_lens_ptr,
    prefix_lens_ptr, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_krt, stride_krh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_page_row,
    GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    V_IS_K: tl.constexpr, DOT_PRECISION: tl.constexpr, CONTIGUOUS: tl.constexpr, HEADS_FASTEST: tl.constexpr,
    k_desc=None, kr_desc=None, v_desc=None, KV_DESC: tl.constexpr = False,
):  # fmt: skip
    # HEADS_FASTEST: a KV head's query heads run together and read its keys from L2 (grouped heads); else one head's
    # query blocks do (a head with keys of its own: MLA's 128 expanded heads hold 64 MB of keys per 1024-token
    # request, more than L2, so head after head would read them again for every query block). Either way the last
    # query blocks, which see the most keys, start first.
    if HEADS_FASTEST:
        head = tl.program_id(0)
        m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        m_block = tl.num_programs(0) - 1 - tl.program_id(0)
        head = tl.program_id(1)
    b = tl.program_id(2)
    extend_len = tl.load(extend_lens_ptr + b)
    if m_block * BLOCK_M < extend_len:
        prefix = tl.load(prefix_lens_ptr + b)
        q_start = tl.load(q_starts_ptr + b)
        row = tl.load(req_rows_ptr + b).to(tl.int64)
        kv_head = head // GROUP

        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < extend_len
        offs_dk = tl.arange(0, BLOCK_DK)
        offs_dv = tl.arange(0, BLOCK_DV)
        kv_dk = offs_dk
        kv_dv = offs_dv
        if BLOCK_DK > DK:  # padded head dim: stay inside the row; zero query columns cancel the duplicates
            kv_dk = tl.minimum(offs_dk, DK - 1)
        if BLOCK_DV > DV:
            kv_dv = tl.minimum(offs_dv, DV - 1)
        tokens = (q_start + offs_m).to(tl.int64)
        q_rows = q_ptr + tokens[:, None] * stride_qt + head * stride_qh
        q = tl.load(q_rows + offs_dk[None, :], mask=mask_m[:, None] & (offs_dk[None, :] < DK), other=0.0)
        offs_r = offs_dk  # placeholders when Dk is one piece
        q_rest = q
        if BLOCK_DR > 0:
            offs_r = tl.arange(0, BLOCK_DR)
            q_rest = tl.load(q_rows + BLOCK_DK + offs_r[None, :], mask=mask_m[:, None], other=0.0)

        page_row = page_table_ptr + row * stride_page_row
        k_head = k_ptr + kv_head * stride_kh
        kr_head = kr_ptr + kv_head * stride_krh
        v_head = v_ptr + kv_head * stride_vh
        if CONTIGUOUS:  # the table's row holds the request's first key row
            first = tl.load(page_row).to(tl.int64)
            k_head += first * stride_kt
            kr_head += first * stride_krt
            v_head += first * stride_vt
        q_pos = prefix + offs_m
        # keys [0, full_end): before the block's first position, seen by every row, whole BLOCK_N tiles
        full_end = (prefix + m_block * BLOCK_M) // BLOCK_N * BLOCK_N
        # keys [full_end, kv_end): the diagonal, up to the block's last row's position
        kv_end = prefix + tl.minimum((m_block + 1) * BLOCK_M, extend_len)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        if KV_DESC:  # (contiguous keys: see _attend_block_desc)
            first_row = tl.load(page_row).to(tl.int32)
            k_col, kr_col, v_col = kv_head * stride_kh, kv_head * stride_krh, kv_head * stride_vh
            for n0 in range(0, full_end, BLOCK_N):
                m_i, l_i, acc = _attend_block_desc(
                    q, q_rest, m_i, l_i, acc, k_desc, kr_desc, v_desc, first_row, k_col, kr_col, v_col, scale_log2,
                    n0, kv_end, q_pos, BLOCK_N, BLOCK_DR, V_IS_K, False, DOT_PRECISION,
                )  # fmt: skip
            for n0 in range(full_end, kv_end, BLOCK_N):
                m_i, l_i, acc = _attend_block_desc(
                    q, q_rest, m_i, l_i, acc, k_desc, kr_desc, v_desc, first_row, k_col, kr_col, v_col, scale_log2,
                    n0, kv_end, q_pos, BLOCK_N, BLOCK_DR, V_IS_K, True, DOT_PRECISION,
                )  # fmt: skip
        else:
            for n0 in range(0, full_end, BLOCK_N):
                m_i, l_i, acc = _attend_block(
                    q, q_rest, m_i, l_i, acc, page_row, k_head, kr_head, v_head, stride_kt, stride_krt, stride_vt,
                    scale_log2, n0, kv_end, q_pos, kv_dk, offs_r, kv_dv, PAGE_SIZE, BLOCK_N, BLOCK_DR, V_IS_K,
                    False, DOT_PRECISION, CONTIGUOUS,
                )  # fmt: skip
            for n0 in range(full_end, kv_end, BLOCK_N):
                m_i, l_i, acc = _attend_block(
                    q, q_rest, m_i, l_i, acc, page_row, k_head, kr_head, v_head, stride_kt, stride_krt, stride_vt,
                    scale_log2, n0, kv_end, q_pos, kv_dk, offs_r, kv_dv, PAGE_SIZE, BLOCK_N, BLOCK_DR, V_IS_K,
                    True, DOT_PRECISION, CONTIGUOUS,
                )  # fmt: skip
        out = out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_dv[None, :]
        tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & (offs_dv[None, :] < DV))  # fmt: skip


def extend_config(head_dim_k: int, head_dim_v: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes for a shape: EXTEND_CONFIGS' entry, else the default; fp32 halves both tiles."""
    config = dict(EXTEND_CONFIGS.get((head_dim_k, head_dim_v), DEFAULT_EXTEND_CONFIG))
    if dtype == torch.float32:
        config["BLOCK_M"] = max(16, config["BLOCK_M"] // 2)
        config["BLOCK_N"] = max(16, config["BLOCK_N"] // 2)
        config["num_stages"] = min(config["num_stages"], 2)
    return config


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    page_table: torch.Tensor,
    req_rows: torch.Tensor,
    q_starts: torch.Tensor,
    extend_lens: torch.Tensor,
    prefix_lens: torch.Tensor,
    max_extend_len: int,
    scale: float,
    page_size: int,
    *,
    k_rope: torch.Tensor | None = None,
    contiguous: bool = False,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Causal attention of a ragged batch's new tokens over their requests' cached prefixes and themselves.

    Args:
        q: [T, Hq, Dk] model dtype (bf16/fp16/fp32): the new tokens of B requests, request after request.
        k_buffer: [S, Hk, Dk], v_buffer: [S, Hk, Dv]: the layer's cache, already holding every key of the batch
            (prefix and new tokens); strided views are fine, V may be ``k_buffer[..., :Dv]`` (MLA's latent).
        out: [T, Hq, Dv] model dtype, written in place (rows of no request are left as they were).
        page_table: [R, P] int32 on the device (see decode_attention). req_rows: [B] int32 (or int64).
        q_starts: [B] first row of each request in q. extend_lens: [B] new tokens (0 skips the request).
        prefix_lens: [B] tokens cached before them. All int32 (or int64) on the device.
        max_extend_len: host int >= max(extend_lens): sizes the grid (programs past a request's length exit).
        scale: softmax scale. page_size: tokens per page (a power of two).
        k_rope: [S, 1 or Hk, Dr]: the keys' last Dr columns, apart (one head: shared by all heads); the keys are
            then k_buffer's columns followed by these, k_buffer [S, Hk, Dk - Dr]. When Dk - Dr and Dr are Dk's two
            tile widths (MLA's prefill: 128 expanded columns per head and the 64 roped ones every head shares) the
            kernel reads both where they lie; other splits are concatenated first.
        contiguous: each request's keys are consecutive rows of k_buffer (and k_rope, v_buffer), page_table[row, 0]
            the first (page_size 1): keys are addressed directly instead of through a table lookup per key.
        config: block sizes overriding extend_config (BLOCK_M, BLOCK_N, num_warps, num_stages; HEADS_FASTEST, the
            program order: by default heads vary fastest when query heads share KV heads, query blocks otherwise;
            KV_DESC: with contiguous keys, read K, its rope part and V through tensor descriptors where the GPU has
            TMA and the layout allows, else through pointers).

    Returns:
        out. Asynchronous: one launch, no host sync.
    """
    check_paged_inputs(q, k_buffer, v_buffer, out, page_table, page_size, k_rope)
    assert not contiguous or page_size == 1, "contiguous keys are addressed per row (page size 1)"
    if k_rope is not None and (k_buffer.shape[-1], k_rope.shape[-1]) != head_dim_blocks(q.shape[-1]):
        # head dims that are not two tiles (small test models): the kernel reads one concatenated key
        k_buffer = torch.cat((k_buffer, k_rope.expand(-1, k_buffer.shape[1], -1)), dim=-1)
        k_rope = None
    batch = req_rows.shape[0]
    assert q_starts.shape == extend_lens.shape == prefix_lens.shape == (batch,), "per-request tensors: [B]"
    num_q_heads, head_dim_k = q.shape[1], q.shape[2]
    num_kv_heads, head_dim_v = k_buffer.shape[1], v_buffer.shape[-1]
    if batch == 0 or max_extend_len <= 0:
        return out
    cfg = config or extend_config(head_dim_k, head_dim_v, q.dtype)
    block_dk, block_dr = head_dim_blocks(head_dim_k)
    if k_rope is not None:
        rope_head_stride = 0 if k_rope.shape[1] == 1 else k_rope.stride(1)
    else:  # one tensor: its last block_dr columns (a view; unread when block_dr is 0)
        k_rope = k_buffer[..., block_dk:] if block_dr else k_buffer
        rope_head_stride = k_rope.stride(1)
    block_dv = max(triton.next_power_of_2(head_dim_v), 16)
    v_is_k = v_is_k_prefix(k_buffer, v_buffer, block_dk) and block_dk <= head_dim_k
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    descs = None
    if contiguous and cfg.get("KV_DESC", False) and (q.device.type == "cpu" or has_tma(q.device)):
        descs = _kv_descriptors(k_buffer, k_rope, v_buffer, cfg["BLOCK_N"], block_dk, block_dr, block_dv, v_is_k)
    heads_fastest = cfg.get("HEADS_FASTEST", num_q_heads > num_kv_heads)
    m_blocks = triton.cdiv(max_extend_len, cfg["BLOCK_M"])
    grid = (num_q_heads, m_blocks, batch) if heads_fastest else (m_blocks, num_q_heads, batch)
    _extend_kernel[grid](
        q, k_buffer, k_rope, v_buffer, out, page_table, req_rows, q_starts, extend_lens, prefix_lens,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), k_rope.stride(0), rope_head_stride,
        v_buffer.stride(0), v_buffer.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        GROUP=num_q_heads // num_kv_heads, PAGE_SIZE=page_size, DK=head_dim_k, DV=head_dim_v,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DK=block_dk, BLOCK_DR=block_dr, BLOCK_DV=block_dv,
        V_IS_K=v_is_k, DOT_PRECISION=precision, CONTIGUOUS=contiguous, HEADS_FASTEST=bool(heads_fastest),
        k_desc=descs[0] if descs else None, kr_desc=descs[1] if descs else None, v_desc=descs[2] if descs else None,
        KV_DESC=descs is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out


def _kv_descriptors(k_buffer: torch.Tensor, k_rope: torch.Tensor, v_buffer: torch.Tensor, block_n: int, block_dk: int,
                    block_dr: int, block_dv: int, v_is_k: bool) -> tuple[Any, Any, Any] | None:  # fmt: skip
    """Tensor descriptors of K, K's rope part and V for the kernel's KV_DESC path, or None where one of them cannot
    be read through TMA (head dims other than their tiles, unaligned rows)."""
    k = _rows_descriptor(k_buffer, block_n, block_dk)
    kr = _rows_descriptor(k_rope, block_n, block_dr) if block_dr else k
    v = k if v_is_k else _rows_descriptor(v_buffer, block_n, block_dv)
    return None if k is None or kr is None or v is None else (k, kr, v)


def _rows_descriptor(t_SHD: torch.Tensor, block_rows: int, block_cols: int) -> Any:
    """A [block_rows, D] descriptor over the rows of [S, H, D] (head h's D columns at column h * stride(1) of a
    row), or None where TMA cannot read it: D not its tile's width, a base, row or head stride not a multiple of 16
    bytes, a tile row under 16 bytes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows, heads, d = t_SHD.shape
    size = t_SHD.element_size()
    row_stride, head_stride = t_SHD.stride(0), t_SHD.stride(1) if heads > 1 else 0
    if (d != block_cols or t_SHD.stride(2) != 1 or t_SHD.data_ptr() % 16 or (row_stride * size) % 16
            or (head_stride * size) % 16 or d * size < 16 or d > 256 or rows == 0):  # fmt: skip
        return None
    return TensorDescriptor(t_SHD, [rows, (heads - 1) * head_stride + d], [row_stride, 1], [block_rows, d])
