"""Triton decode attention over the paged KV cache: one new token per request, KV split in two stages.

Stage 1 splits each request's context into ``num_kv_splits`` contiguous parts; one program serves BLOCK_H query
heads that share a KV head (grouped-query attention; MLA is one KV head shared by all query heads) over one part,
reading K/V rows in place through the page table, and writes the part's normalised output (fp32) and the base-2
log-sum-exp of its scaled scores (-inf for an empty part). Stage 2 merges the parts of each (request, head), and
for a block-FP8 o_proj can also write the merged row in e4m3 with its scales (the o_proj's quantization launch).
Shapes depend only on the batch size, head counts and the split count, never on the lengths, so a CUDA graph can
capture both launches and replay them with new lengths.

The head dimension is handled in up to two power-of-two pieces: Dk = D1 + D2 (MLA: 512 latent + 64 rope) when
D2 is a power of two >= 16, else one piece padded to the next power of two (offsets past Dk are clamped onto
column Dk - 1 and the padded query columns are zero, so K/V loads keep their vector width and need no mask).
When V is a view of the first Dv columns of K's rows (MLA's latent), the K tile is used as V: one read.

The pure-torch reference these kernels must equal is the torch attention backend (pd.attention.torch_backend);
tests/test_attention_kernels.py checks both against an oracle on ragged batches.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pd.layers.triton_fp8_gemm import e4m3_groups

LOG2E = 1.4426950408889634

# Block sizes of the decode kernels on Hopper (H100/H200), keyed by (head dim of K, head dim of V) for bf16/fp16.
# The (128, 128) and (576, 512) rows are the best of `python benchmarks/bench_attention.py --sweep` on an H200
# (2026-12-01, batch 64 x 4096, page size 16; benchmarks/results/attention_h200.md): GQA 16 heads x 64-token tiles
# at 4 warps (87.6% of copy bandwidth); MLA 64 heads x 32-token tiles at 8 warps (16.6%, twice the 32-head
# choice: each latent row is read by 2 programs instead of 4, and the QK/PV products are large enough for wgmma).
# The other rows come from sm_90a compiles (registers, spills, shared memory) and traffic arithmetic; shapes
# nobody tuned get DEFAULT_DECODE_CONFIG (halved tile for fp32).
DECODE_CONFIGS: dict[tuple[int, int], dict[str, int]] = {
    (64, 64): {"BLOCK_H": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    (128, 128): {"BLOCK_H": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    (192, 128): {"BLOCK_H": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    (256, 256): {"BLOCK_H": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    (576, 512): {"BLOCK_H": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
}
DEFAULT_DECODE_CONFIG = {"BLOCK_H": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
MAX_KV_SPLITS = 32
MIN_TOKENS_PER_SPLIT = 256  # a part shorter than this costs more in stage 2 than it saves in stage 1


def head_dim_blocks(dim: int) -> tuple[int, int]:
    """(B1, B2) power-of-two tile widths covering a head dimension: dim = B1 + B2 exactly when B2 (> 0) is a power
    of two >= 16 (tl.dot's smallest K), else B2 = 0 and B1 = the next power of two >= max(dim, 16)."""
    low = triton.next_power_of_2(dim) if dim & (dim - 1) == 0 else triton.next_power_of_2(dim) // 2
    rest = dim - low
    if rest >= 16 and rest & (rest - 1) == 0:
        return low, rest
    return max(triton.next_power_of_2(dim), 16), 0


def v_is_k_prefix(k_buffer: torch.Tensor, v_buffer: torch.Tensor, block_dk: int) -> bool:
    """True when V's rows are the first block_dk columns of K's (MLA's latent): the kernels then load them once."""
    return (
        v_buffer.data_ptr() == k_buffer.data_ptr()
        and v_buffer.stride() == k_buffer.stride()
        and v_buffer.shape[-1] == block_dk <= k_buffer.shape[-1]
    )


def check_paged_inputs(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, out: torch.Tensor,
                       page_table: torch.Tensor, page_size: int,
                       k_rope: torch.Tensor | None = None) -> None:  # fmt: skip
    """Shape/dtype/layout checks shared by the decode and extend launchers (host metadata only, no sync). k_rope:
    the keys' last columns held apart ([S, 1 or Hk, Dr], see extend_attention)."""
    assert q.dim() == 3 and k_buffer.dim() == 3 and v_buffer.dim() == 3 and out.dim() == 3, "[N, heads, dim] each"
    assert k_buffer.shape[:2] == v_buffer.shape[:2], f"K {tuple(k_buffer.shape)} vs V {tuple(v_buffer.shape)}"
    k_dim = k_buffer.shape[-1]
    if k_rope is not None:
        assert k_rope.dim() == 3 and k_rope.shape[0] == k_buffer.shape[0], f"k_rope {tuple(k_rope.shape)}"
        assert k_rope.shape[1] in (1, k_buffer.shape[1]) and k_rope.stride(-1) == 1, f"k_rope {tuple(k_rope.shape)}"
        assert k_rope.dtype == k_buffer.dtype, "k_rope and K share one dtype"
        k_dim += k_rope.shape[-1]
    assert q.shape[-1] == k_dim, f"q dim {q.shape[-1]} != K dim {k_dim}"
    assert out.shape == (q.shape[0], q.shape[1], v_buffer.shape[-1]), f"out {tuple(out.shape)}"
    assert q.shape[1] % k_buffer.shape[1] == 0, f"{q.shape[1]} query heads over {k_buffer.shape[1]} KV heads"
    assert q.dtype == out.dtype, "q and out share one dtype"
    # K and V hold q's dtype, or FP8 (--kv-cache-dtype), converted to q's dtype as they are loaded.
    assert k_buffer.dtype == v_buffer.dtype in (q.dtype, torch.float8_e4m3fn, torch.float8_e5m2), "K/V dtype"
    for name, t in (("q", q), ("k_buffer", k_buffer), ("v_buffer", v_buffer), ("out", out)):
        assert t.stride(-1) == 1, f"{name}: the head dimension must be contiguous"
    assert page_table.dtype == torch.int32 and page_table.dim() == 2 and page_table.stride(1) == 1, "page table"
    assert page_size >= 1 and page_size & (page_size - 1) == 0, f"page size {page_size}: a power of two"
    assert k_buffer.shape[0] % page_size == 0, "the cache holds whole pages"


@triton.jit
def _decode_stage1_kernel(
    q_ptr, k_ptr, v_ptr, page_table_ptr, req_rows_ptr, kv_lens_ptr, partial_ptr, lse_ptr,
    scale_log2, num_splits,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_page_row,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_BLOCKS_PER_KV: tl.constexpr, PAGE_SIZE: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_DV: tl.constexpr, V_IS_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # Head blocks vary fastest: the programs reading the same KV rows (MLA: every head block) run side by side.
    head_block = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kv_head = head_block // HEAD_BLOCKS_PER_KV
    in_group = (head_block % HEAD_BLOCKS_PER_KV) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = in_group < GROUP
    heads = kv_head * GROUP + in_group

    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_dk = offs_dk
    kv_dv = offs_dv
    if BLOCK_DK > DK:  # padded head dim: stay inside the row; zero query columns cancel the duplicates
        kv_dk = tl.minimum(offs_dk, DK - 1)
    if BLOCK_DV > DV:
        kv_dv = tl.minimum(offs_dv, DV - 1)
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_rows + offs_dk[None, :], mask=mask_h[:, None] & (offs_dk[None, :] < DK), other=0.0)
    if BLOCK_DR > 0:
        offs_dr = BLOCK_DK + tl.arange(0, BLOCK_DR)
        q_rest = tl.load(q_rows + offs_dr[None, :], mask=mask_h[:, None], other=0.0)

    kv_len = tl.load(kv_lens_ptr + b)
    row = tl.load(req_rows_ptr + b).to(tl.int64)
    per_split = tl.cdiv(tl.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, kv_len)
    lse_ptrs = lse_ptr + b * stride_lb + heads * stride_lh + split
    if start < end:
        page_row = page_table_ptr + row * stride_page_row
        k_head = k_ptr + kv_head * stride_kh
        v_head = v_ptr + kv_head * stride_vh
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            mask_n = pos < end
            page = tl.load(page_row + pos // PAGE_SIZE, mask=mask_n, other=0)
            slot = page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
            k = tl.load(k_head + slot[:, None] * stride_kt + kv_dk[None, :], mask=mask_n[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
            if BLOCK_DR > 0:
                k_rest = tl.load(k_head + slot[:, None] * stride_kt + offs_dr[None, :], mask=mask_n[:, None],
                                 other=0.0)  # fmt: skip
                qk = tl.dot(q_rest, tl.trans(k_rest.to(q.dtype)), qk, input_precision=DOT_PRECISION)
            qk = tl.where(mask_n[None, :], qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if V_IS_K:
                v = k
            else:
                v = tl.load(v_head + slot[:, None] * stride_vt + kv_dv[None, :], mask=mask_n[:, None], other=0.0)
            acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
        partial = partial_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_dv[None, :]
        tl.store(partial, acc / l_i[:, None], mask=mask_h[:, None] & (offs_dv[None, :] < DV))
        tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=mask_h)
    else:
        tl.store(lse_ptrs, tl.full([BLOCK_H], float("-inf"), tl.float32), mask=mask_h)


@triton.jit
def _decode_stage2_kernel(
    partial_ptr, lse_ptr, out_ptr, q8_ptr, qs_ptr, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh, stride_q8b, stride_qsb,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, QUANT_GROUP: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    lse_row = lse_ptr + b * stride_lb + head * stride_lh
    offs_s = tl.arange(0, BLOCK_S)
    lse = tl.load(lse_row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no part at all (a zero-length request): output zeros, not NaN
    # The largest part weighs exp2(0) = 1, so denom >= 1 whenever any part is non-empty; max() only acts on none.
    denom = tl.maximum(tl.sum(tl.exp2(lse - m), 0), 1.0)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < DV
    partial_row = partial_ptr + b * stride_pb + head * stride_ph + offs_dv
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s in range(num_splits):
        lse_s = tl.load(lse_row + s)
        part = tl.load(partial_row + s * stride_ps, mask=mask_dv, other=0.0)
        # an empty part's output was never written (the workspace may hold anything, NaN included): dropped
        acc += tl.where(lse_s > float("-inf"), tl.exp2(lse_s - m) * part, 0.0)
    result = (acc / denom).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_dv, result, mask=mask_dv)
    if QUANT_GROUP > 0:  # the head's row also in e4m3 per group of columns (BLOCK_DV == DV here), for o_proj
        q, q_scale = e4m3_groups(tl.reshape(result.to(tl.float32), (BLOCK_DV // QUANT_GROUP, QUANT_GROUP)),
                                 q8_ptr.dtype.element_ty)  # fmt: skip
        tl.store(q8_ptr + b * stride_q8b + head * DV + offs_dv, tl.reshape(q, (BLOCK_DV,)))
        groups = tl.arange(0, BLOCK_DV // QUANT_GROUP)
        tl.store(qs_ptr + b * stride_qsb + head * (DV // QUANT_GROUP) + groups, q_scale)


def fp8_rows_fit(head_dim_v: int, group: int) -> bool:
    """Whether stage 2 can quantize its rows per ``group`` columns: groups inside one head's row (a power of two
    from 16 dividing Dv, itself a power of two: the row is one unpadded block)."""
    return 16 <= group <= head_dim_v and group & (group - 1) == 0 and head_dim_v & (head_dim_v - 1) == 0


def decode_config(num_q_heads: int, num_kv_heads: int, head_dim_k: int, head_dim_v: int,
                  dtype: torch.dtype) -> dict[str, int]:  # fmt: skip
    """Block sizes for a shape: DECODE_CONFIGS' entry, else the default; fp32 halves the KV tile (twice the bytes)."""
    config = dict(DECODE_CONFIGS.get((head_dim_k, head_dim_v), DEFAULT_DECODE_CONFIG))
    if dtype == torch.float32:
        config["BLOCK_N"] = max(16, config["BLOCK_N"] // 2)
    group = num_q_heads // num_kv_heads
    config["BLOCK_H"] = min(config["BLOCK_H"], max(16, triton.next_power_of_2(group)))
    return config


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # an H100/H200: what the split choice is made for when planning off the GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_kv_splits(
    batch_size: int,
    max_context_len: int | None = None,
    device: torch.device | str | None = None,
    *,
    num_q_heads: int | None = None,
    num_kv_heads: int | None = None,
    head_dim_k: int = 128,
    head_dim_v: int | None = None,
) -> int:
    """Stage 1's split count: enough (request, head block, part) programs for about four per SM (two when each
    part's fp32 output is large: Hq * Dv >= 16384, as MLA's 128 x 512), each part at least MIN_TOKENS_PER_SPLIT
    tokens of a ``max_context_len`` context, at most MAX_KV_SPLITS.

    A CUDA graph bakes the count into its launch, so call this once per graph bucket (batch size) with the
    server's context limit (not the batch's current lengths) and keep the result for every replay of that bucket.
    Without head counts, four head blocks per request are assumed (e.g. 32 query / 4 KV heads, or MLA's 128 heads
    at BLOCK_H 32); giving them sizes the grid exactly.
    """
    head_blocks, per_sm = 4, 4
    if num_q_heads is not None and num_kv_heads is not None:
        config = decode_config(num_q_heads, num_kv_heads, head_dim_k, head_dim_v or head_dim_k, torch.bfloat16)
        head_blocks = num_kv_heads * triton.cdiv(num_q_heads // num_kv_heads, config["BLOCK_H"])
        per_sm = 2 if num_q_heads * (head_dim_v or head_dim_k) >= 16384 else 4
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    splits = max(1, per_sm * _num_sms(dev) // max(1, batch_size * head_blocks))
    if max_context_len is not None:
        splits = min(splits, max(1, max_context_len // MIN_TOKENS_PER_SPLIT))
    return min(splits, MAX_KV_SPLITS)


def decode_workspace(batch_size: int, num_q_heads: int, head_dim_v: int, num_kv_splits: int,
                     device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Stage 1's outputs: (partial_out [B, Hq, splits, Dv] fp32, lse [B, Hq, splits] fp32). A CUDA graph allocates
    them once for its largest batch and passes views ([:bs]) to every capture."""
    partial = torch.empty(batch_size, num_q_heads, num_kv_splits, head_dim_v, dtype=torch.float32, device=device)
    lse = torch.empty(batch_size, num_q_heads, num_kv_splits, dtype=torch.float32, device=device)
    return partial, lse


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    page_table: torch.Tensor,
    req_rows: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    page_size: int,
    num_kv_splits: int,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    config: dict[str, int] | None = None,
    fp8_rows: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Attention of one new token per request over its whole cached context (its own K/V already stored).

    Args:
        q: [B, Hq, Dk] model dtype (bf16/fp16/fp32); any strides with the last one 1.
        k_buffer: [S, Hk, Dk] the layer's keys, S = pages * page_size slots; strided views are fine.
        v_buffer: [S, Hk, Dv] values; may be ``k_buffer[..., :Dv]`` (MLA's latent, read once).
        out: [B, Hq, Dv] model dtype, written in place.
        page_table: [R, P] int32 on the device: page ids of each row; position p of a request in row r sits in
            slot page_table[r, p // page_size] * page_size + p % page_size.
        req_rows: [B] int32 (or int64): each request's row. kv_lens: [B] int32 (or int64): context length
            including the new token (0 gives a zero output).
        scale: softmax scale. page_size: tokens per page (a power of two).
        num_kv_splits: parts each context is split into (fixed per CUDA-graph bucket; see default_num_kv_splits).
        workspace: (partial_out [>=B, Hq, splits, Dv] fp32, lse [>=B, Hq, splits] fp32), last dims contiguous
            (rows past B are not touched, so one workspace for a graph's largest batch serves every bucket);
            allocated when None (decode_workspace).
        config: block sizes overriding decode_config (BLOCK_H, BLOCK_N, num_warps, num_stages).
        fp8_rows: (q [B, Hq * Dv] float8_e4m3fn, scale [B, Hq * Dv / group] float32, group): stage 2 also writes
            each request's output row quantized as token_group_quant would quantize ``out.reshape(B, -1)``, for a
            block-FP8 o_proj (pd.layers.fp8_rows); needs fp8_rows_fit(Dv, group). Rows with unit last stride.

    Returns:
        out. Asynchronous: two launches, no host sync, shapes independent of the lengths (CUDA-graph capturable).
    """
    check_paged_inputs(q, k_buffer, v_buffer, out, page_table, page_size)
    batch, num_q_heads, head_dim_k = q.shape
    num_kv_heads, head_dim_v = k_buffer.shape[1], v_buffer.shape[-1]
    assert req_rows.shape == (batch,) and kv_lens.shape == (batch,), "req_rows and kv_lens: [B]"
    assert num_kv_splits >= 1
    if workspace is None:
        workspace = decode_workspace(batch, num_q_heads, head_dim_v, num_kv_splits, q.device)
    partial, lse = workspace
    assert partial.shape[0] >= batch and partial.shape[1:] == (num_q_heads, num_kv_splits, head_dim_v), "partial_out"
    assert lse.shape[0] >= batch and lse.shape[1:] == (num_q_heads, num_kv_splits), "lse"
    assert partial.dtype == lse.dtype == torch.float32 and partial.stride(-1) == 1 and lse.stride(-1) == 1
    if batch == 0:
        return out

    cfg = config or decode_config(num_q_heads, num_kv_heads, head_dim_k, head_dim_v, q.dtype)
    group = num_q_heads // num_kv_heads
    block_h = cfg["BLOCK_H"]
    head_blocks_per_kv = triton.cdiv(group, block_h)
    block_dk, block_dr = head_dim_blocks(head_dim_k)
    block_dv = max(triton.next_power_of_2(head_dim_v), 16)
    v_is_k = v_is_k_prefix(k_buffer, v_buffer, block_dk) and block_dk <= head_dim_k
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (num_kv_heads * head_blocks_per_kv, num_kv_splits, batch)
    _decode_stage1_kernel[grid](
        q, k_buffer, v_buffer, page_table, req_rows, kv_lens, partial, lse,
        scale * LOG2E, num_kv_splits,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        page_table.stride(0), partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_BLOCKS_PER_KV=head_blocks_per_kv, PAGE_SIZE=page_size, DK=head_dim_k, DV=head_dim_v,
        BLOCK_H=block_h, BLOCK_N=cfg["BLOCK_N"], BLOCK_DK=block_dk, BLOCK_DR=block_dr, BLOCK_DV=block_dv,
        V_IS_K=v_is_k, DOT_PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    q8, q_scale, quant_group = fp8_rows if fp8_rows is not None else (out, lse, 0)  # (pointers never read)
    if fp8_rows is not None:
        assert fp8_rows_fit(head_dim_v, quant_group), (head_dim_v, quant_group)
        assert q8.dtype == torch.float8_e4m3fn and q8.shape == (batch, num_q_heads * head_dim_v), q8.shape
        assert q_scale.shape == (batch, num_q_heads * head_dim_v // quant_group) and q_scale.dtype == torch.float32
        assert q8.stride(1) == 1 and q_scale.stride(1) == 1, (q8.stride(), q_scale.stride())
    _decode_stage2_kernel[(num_q_heads, batch)](
        partial, lse, out, q8, q_scale, num_kv_splits,
        partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), q8.stride(0), q_scale.stride(0),
        DV=head_dim_v, BLOCK_DV=block_dv, BLOCK_S=triton.next_power_of_2(num_kv_splits), QUANT_GROUP=quant_group,
        # one warp up to 128 columns: 3.45 us a launch quantizing, 4.04 us with 4 warps (H200, batch 64 x 32 heads,
        # 2 splits, in a graph; 3.1 us either way without quantizing)
        num_warps=1 if block_dv <= 128 else 4,
    )  # fmt: skip
    return out
