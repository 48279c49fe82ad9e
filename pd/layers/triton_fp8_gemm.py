"""W8A8 block-FP8 GEMM in Triton: activations quantized per token and group of GROUP_K columns on the fly, weights in
DeepSeek-V3's block format (pd.quant.fp8), products of float8_e4m3fn tiles accumulated in float32.

Three kernels:

- ``token_group_quant``: x [..., M, K] (float32/bf16/fp16) -> float8_e4m3fn [..., M, K] and float32 scales
  [..., M, ceil(K / group)]: per row and group of ``group`` columns, scale = max(amax, 1e-10) / 448 and
  q = clamp(x / scale, -448, 448) rounded to nearest e4m3 (SGLang's ``per_token_group_quant_fp8``; the torch
  reference is pd.quant.fp8.token_group_quant). With per-expert row counts (the MoE runner's batched layout) the
  rows past a count are neither read nor written.
- ``w8a8_block_gemm``: C [M, N] = (A * a_scale) @ (W * w_scale).T (+ bias), one K-block of BLOCK_K columns sharing
  one activation scale per row and one weight scale per column block, so each k-step is one fp8 ``tl.dot`` times
  the two scale vectors. Rows of A past M and columns past N wrap (no load masks); the store masks them.
- ``w8a8_split_k_linear``, for decode-sized M (up to 64 rows): K split over programs, so a projection's few
  column blocks still spread its weight over every SM; the splits' float32 partials are summed by a second small
  launch. The activations are quantized once by token_group_quant before it (default, PD_FP8_SPLIT_K_QUANT=before)
  or inside the GEMM (``inside``: one launch fewer, but every column block's programs quantize the same rows
  again). On an H200, a batch-64 FP8 decode step of Qwen3-30B-A3B widths (8 layers, CUDA graphs) takes 1.933 ms of
  GPU with ``before`` and 1.964 ms with ``inside`` (benchmarks/results/h200_2026-12-03, tenth run); inside, at
  M = 64 the GEMM took ~10 us plus ~2.3 us of sums against cuBLAS's block-scaled GEMM's ~11.5 us plus ~1.5 us of
  quantization (ninth run). Activations whose producer already wrote them in e4m3 (pd.layers.fp8_rows: the norm
  before a fused q/k/v projection) are not quantized again. (Summing the splits in the GEMM's last program per
  column block instead of a second launch was measured slower: 161 us against 99.5 + 36.9 us per step, eleventh
  run: every program then waits for its partial to be visible before it counts itself in.)

The reference every result is compared with is the dequantized model (pd.quant.fp8.Fp8Linear on CPU): this path
adds the activations' e4m3 rounding to it, about 2.5-3% relative L2 error on a layer's output.

Block sizes by M, autotune-free (``gemm_config``): decode-sized M streams the weight over many narrow programs;
prefill-sized M uses 128-row tiles. BLOCK_K always divides the scale group (one scale per k-step). The defaults
follow SGLang's FP8 tables in shape and are not yet measured here (benchmarks/bench_fp8_gemm.py --sweep does).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from pd.env_choice import env_choice
from pd.layers import fp8_rows, fp8_scaled_mm
from pd.layers.split_k_parts import SplitKParts

FP8_DTYPE = torch.float8_e4m3fn  # pd.quant.fp8.FP8_DTYPE (not imported: this module is the GPU path it dispatches to)
# torch dtype -> Triton dtype of the kernels' model-dtype inputs and outputs (the FP8 GEMM, MoE and activation kernels)
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_QUANT_ROWS = 16  # rows per program of the quantization kernel
CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


@triton.jit
def e4m3_groups(x, dtype: tl.constexpr):
    """Each row of float32 x [R, G] (one scale group per row) quantized as token_group_quant does: (q [R, G] in
    ``dtype``, float32 scale [R]). Every kernel that quantizes activations calls this, so their e4m3 values and
    scales are the same bits."""
    # 448: e4m3's largest finite value; the 1e-10 floor turns an all-zero group into zeros rather than NaN.
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-10) / 448.0
    return tl.clamp(x / scale[:, None], -448.0, 448.0).to(dtype), scale


@triton.jit
def _token_group_quant_kernel(x_ptr, q_ptr, s_ptr, counts_ptr, rows, cols, stride_xb, stride_xm, stride_qb,
                              stride_qm, stride_sb, stride_sm, stride_sg, HAS_COUNTS: tl.constexpr,
                              GROUP: tl.constexpr, GROUP_P2: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    batch = tl.program_id(2)
    rows_used = rows
    if HAS_COUNTS:
        rows_used = tl.minimum(tl.load(counts_ptr + batch), rows)
    first = tl.program_id(0) * ROWS
    if first >= rows_used:
        return
    group = tl.program_id(1)
    offs_m = (first + tl.arange(0, ROWS)).to(tl.int64)
    offs_k = group * GROUP + tl.arange(0, GROUP_P2)
    inside = (offs_m[:, None] < rows_used) & (offs_k[None, :] < cols) & (tl.arange(0, GROUP_P2)[None, :] < GROUP)
    batch = batch.to(tl.int64)
    x = tl.load(x_ptr + batch * stride_xb + offs_m[:, None] * stride_xm + offs_k[None, :], mask=inside, other=0.0)
    q, scale = e4m3_groups(x.to(tl.float32), q_ptr.dtype.element_ty)
    tl.store(q_ptr + batch * stride_qb + offs_m[:, None] * stride_qm + offs_k[None, :], q, mask=inside)
    tl.store(s_ptr + batch * stride_sb + offs_m * stride_sm + group * stride_sg, scale, mask=offs_m < rows_used)


def token_group_quant(x: torch.Tensor, group: int, counts: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Quantize activations per row and group of ``group`` columns to e4m3. Asynchronous, no host sync.

    Args:
        x: [M, K] or [B, M, K] float32/bfloat16/float16, unit stride along K (other strides free).
        group: columns per scale (the weight's block width; the last group may be partial).
        counts: [B] int32 on x's device, rows used per batch entry (3-D x only; values past M are clamped): rows past
            a count are neither read nor written in the outputs.

    Returns:
        (q, scale): q float8_e4m3fn of x's shape, contiguous; scale float32 [..., M, ceil(K / group)], contiguous.
    """
    assert x.dim() in (2, 3) and x.stride(-1) == 1 and x.dtype in TL_DTYPES, (x.shape, x.stride(), x.dtype)
    assert counts is None or (x.dim() == 3 and counts.shape == (x.shape[0],) and counts.dtype == torch.int32)
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    batch, rows, cols = x3.shape
    q = torch.empty(x3.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(batch, rows, triton.cdiv(cols, group), dtype=torch.float32, device=x.device)
    _launch_quant(x3, q, scale, group, counts)
    return (q, scale) if x.dim() == 3 else (q[0], scale[0])


def _launch_quant(x3: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int,
                  counts: torch.Tensor | None = None) -> None:  # fmt: skip
    """The quantization of x3 [B, M, K] into q [B, >= M, K] and scale [B, >= M, groups] (any strides but K's)."""
    batch, rows, cols = x3.shape
    if batch * rows * cols:
        grid = (triton.cdiv(rows, _QUANT_ROWS), triton.cdiv(cols, group), batch)
        _token_group_quant_kernel[grid](
            x3, q, scale, counts if counts is not None else scale, rows, cols, x3.stride(0), x3.stride(1),
            q.stride(0), q.stride(1), scale.stride(0), scale.stride(1), scale.stride(2),
            HAS_COUNTS=counts is not None, GROUP=group, GROUP_P2=triton.next_power_of_2(group), ROWS=_QUANT_ROWS,
        )  # fmt: skip


def token_group_quant_for_cublas(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """token_group_quant of x [M, K] in the layout cuBLAS's block-scaled GEMM takes (pd.layers.fp8_scaled_mm):
    q [M4, K] and scales [M4, ceil(K / group)] stored column-major (strides (1, M4)), M4 = M rounded up to a
    multiple of 4; rows past M are left unwritten (their output rows are dropped)."""
    assert x.dim() == 2 and x.stride(-1) == 1 and x.dtype in TL_DTYPES, (x.shape, x.stride(), x.dtype)
    rows, cols = x.shape
    padded = -(-rows // 4) * 4
    q = torch.empty(1, padded, cols, dtype=FP8_DTYPE, device=x.device)
    scale_t = torch.empty(1, triton.cdiv(cols, group), padded, dtype=torch.float32, device=x.device)
    _launch_quant(x.unsqueeze(0), q, scale_t.transpose(1, 2), group)
    return q[0], scale_t[0].t()


@triton.jit
def _w8a8_block_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K,
    stride_am, stride_asm, stride_ask, stride_bn, stride_bsn, stride_bsk, stride_cm,
    HAS_BIAS: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, EVEN_K: tl.constexpr,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SCALAR_B: tl.constexpr,
):  # fmt: skip
    # Groups of GROUP_M row blocks walk the column blocks together, so their A rows stay in L2 (Triton's tutorial).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # wrapped: loads need no row or column mask
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + cols[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    as_ptrs = as_ptr + rows.to(tl.int64) * stride_asm
    if SCALAR_B:  # the column block lies inside one row of scales (wrapped columns past N are never stored)
        bs_ptrs = bs_ptr + (pid_n * BLOCK_N // GROUP_N) * stride_bsn
    else:
        bs_ptrs = bs_ptr + (cols // GROUP_N) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        k_group = (k * BLOCK_K) // GROUP_K
        a_s = tl.load(as_ptrs + k_group * stride_ask)
        b_s = tl.load(bs_ptrs + k_group * stride_bsk)
        if SCALAR_B:  # one multiply-add per element
            acc += tl.dot(a, b) * (a_s * b_s)[:, None]
        else:
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    c_ptrs = c_ptr + out_rows[:, None] * stride_cm + out_cols[None, :]
    tl.store(c_ptrs, acc.to(OUT_DTYPE), mask=(out_rows[:, None] < M) & (out_cols[None, :] < N))


def kernel_block_k(block_k: int, group_k: int) -> int:
    """The k-step for a config's BLOCK_SIZE_K and a scale group of ``group_k`` columns: the largest divisor of
    both, so each k-step lies inside one scale group."""
    return math.gcd(block_k, group_k)


def gemm_config(m: int, n: int, k: int, group_k: int) -> dict[str, int]:
    """Block sizes for an [m, k] x [k, n] block-FP8 GEMM, by m.

    Decode-sized m: the weight is the whole cost, so narrow column blocks (32 wide, 5 stages in flight) spread it
    over many programs. Prefill: 64x128 tiles of 4 warps. Chosen by `benchmarks/bench_fp8_gemm.py --sweep` on an
    H200 over DeepSeek-V3's and Qwen3's projection shapes: the fastest candidate at m in (1, 16) in 9 of 16 cases;
    64x128 tiles the fastest at m in (1024, 4096, 8192) in 21 of 24 (these exact ones in 15; 15-20% faster than
    the 128x128 tiles of 8 warps used before; the other three preferred 64x256).
    """
    if m <= 16:
        cfg = (16, 32, 128, 1, 4, 5)
    elif m <= 64:
        cfg = (64, 64, 128, 1, 4, 4)
    else:
        cfg = (64, 128, 128, 8, 4, 3)
    config = dict(zip(CONFIG_KEYS, cfg, strict=True))
    config["BLOCK_SIZE_K"] = kernel_block_k(config["BLOCK_SIZE_K"], group_k)
    return config


def w8a8_block_gemm(
    a_q: torch.Tensor,
    a_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    block: tuple[int, int],
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """C = dequant(a_q) @ dequant(weight).T (+ bias), float32 accumulation, one rounding to ``out_dtype``.
    Asynchronous.

    Args:
        a_q: [M, K] float8_e4m3fn, unit stride along K; a_scale: [M, ceil(K / block[1])] float32 (token_group_quant
            with group = block[1]).
        weight: [N, K] float8_e4m3fn, unit stride along K; weight_scale: [ceil(N / block[0]), ceil(K / block[1])]
            float32 (pd.quant.fp8's layout, ``weight_scale_inv`` in checkpoints).
        block: (bn, bk) of the weight's scale blocks.
        out_dtype: float32, bfloat16 or float16.
        bias: [N] or None, added in float32 before the rounding.
        config: CONFIG_KEYS -> int; default gemm_config(M, N, K). BLOCK_SIZE_K must divide block[1].

    Returns:
        [M, N] ``out_dtype``, contiguous.
    """
    m, k = a_q.shape
    n = weight.shape[0]
    group_n, group_k = block
    assert a_q.dtype == weight.dtype == FP8_DTYPE and weight.shape == (n, k), (a_q.dtype, weight.dtype, weight.shape)
    assert a_q.stride(1) == 1 and weight.stride(1) == 1, (a_q.stride(), weight.stride())
    assert a_scale.shape == (m, triton.cdiv(k, group_k)) and a_scale.dtype == torch.float32, a_scale.shape
    assert weight_scale.shape == (triton.cdiv(n, group_n), triton.cdiv(k, group_k)), weight_scale.shape
    assert weight_scale.dtype == torch.float32 and out_dtype in TL_DTYPES, (weight_scale.dtype, out_dtype)
    assert bias is None or bias.shape == (n,), bias.shape
    cfg = config or gemm_config(m, n, k, group_k)
    block_m, block_n, block_k = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    assert group_k % block_k == 0, f"BLOCK_SIZE_K {block_k} must divide the scale group {group_k}"
    out = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _w8a8_block_gemm_kernel[grid](
        a_q, a_scale, weight, weight_scale, bias if bias is not None else out, out, m, n, k,
        a_q.stride(0), a_scale.stride(0), a_scale.stride(1), weight.stride(0), weight_scale.stride(0),
        weight_scale.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, GROUP_N=group_n, GROUP_K=group_k, EVEN_K=k % block_k == 0,
        OUT_DTYPE=TL_DTYPES[out_dtype], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=cfg["GROUP_SIZE_M"], SCALAR_B=group_n % block_n == 0, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out


@triton.jit
def _w8a8_split_k_kernel(
    x_ptr, xs_ptr, b_ptr, bs_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_xsm, stride_xsg, stride_bn,
    stride_bsn, stride_bsk, stride_os, stride_om, PREQUANTIZED: tl.constexpr, HAS_BIAS: tl.constexpr,
    GROUP_N: tl.constexpr, STEPS: tl.constexpr, ONE_SPLIT: tl.constexpr, SCALAR_B: tl.constexpr,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (column block, split): all M rows times one BLOCK_N-wide column block over the split's STEPS
    k-steps (one scale group each, BLOCK_K == GROUP_K). The activations are quantized here as token_group_quant
    does, from the compute-dtype rows x; or, PREQUANTIZED, x is token_group_quant's e4m3 output and xs its scales.
    Writes the float32 partial sum at [split] of out (or, with one split, the result in OUT_DTYPE with the bias)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # wrapped: B loads need no column mask
    groups = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, STEPS):
        group = split * STEPS + step
        offs_k = group * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K  # false everywhere past the last group: the step adds zeros
        # (past the last group the product is zero: any group's finite scales do, so read the last one's)
        last = tl.minimum(group, groups - 1)
        if PREQUANTIZED:
            a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            a_s = tl.load(xs_ptr + rows.to(tl.int64) * stride_xsm + last * stride_xsg, mask=row_ok, other=0.0)
        else:
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
            a, a_s = e4m3_groups(x, b_ptr.dtype.element_ty)  # the two-launch path's quantized activations
        b = tl.load(b_ptr + cols[None, :].to(tl.int64) * stride_bn + offs_k[:, None], mask=k_ok[:, None], other=0.0)
        at_group = last * stride_bsk
        if SCALAR_B:  # the column block inside one row of scales: one multiply-add per element
            b_s = tl.load(bs_ptr + (pid_n * BLOCK_N // GROUP_N) * stride_bsn + at_group)
            acc += tl.dot(a, b) * (a_s * b_s)[:, None]
        else:
            b_s = tl.load(bs_ptr + (cols // GROUP_N) * stride_bsn + at_group)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]

    out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (out_cols[None, :] < N)
    ptrs = out_ptr + split * stride_os + rows[:, None].to(tl.int64) * stride_om + out_cols[None, :]
    if ONE_SPLIT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        tl.store(ptrs, acc.to(OUT_DTYPE), mask=mask)
    else:
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _sum_splits_kernel(part_ptr, bias_ptr, out_ptr, N, stride_ps, stride_pm, stride_om, SPLITS: tl.constexpr,
                       HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Row, column block: the splits' partial sums in split order (+ bias), rounded once to OUT_DTYPE."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        acc += tl.load(part_ptr + split * stride_ps + row * stride_pm + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, acc.to(OUT_DTYPE), mask=ok)


# Decode-sized rows (up to this many) take the split-K kernel by default (see w8a8_block_linear).
SPLIT_K_MAX_ROWS = 64
# 32-wide column blocks and 4 stages: the fastest or within 1% of it for Qwen3-30B-A3B's q/k/v and o_proj at 64 rows
# on an H200 (`benchmarks/bench_fp8_gemm.py --sweep-split-k`, 6-9% faster than 64 wide and 3 stages); q/k/v's 160
# column blocks then need no split, so no sums launch.
SPLIT_K_CONFIG = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 4}
_MAX_SPLITS = 8
_SUM_BLOCK_N = 1024


def split_k_fits(rows: int, block: tuple[int, int]) -> bool:
    """Whether w8a8_split_k_linear takes [rows, K] activations with this weight block: rows up to
    SPLIT_K_MAX_ROWS, and a scale group that is one tl.dot k-step (a power of two from 16)."""
    group_k = block[1]
    return rows <= SPLIT_K_MAX_ROWS and group_k >= 16 and group_k & (group_k - 1) == 0


def split_count(n: int, k: int, group_k: int, programs: int, block_n: int = SPLIT_K_CONFIG["BLOCK_N"]) -> int:
    """Splits of K for an [M <= 64, K] x [K, n] GEMM: enough (column blocks x splits) programs to fill about
    ``programs`` (two per SM), at most _MAX_SPLITS (each split writes an [M, n] float32 partial) and at most the
    k-steps; then as few as give every split the same number of k-steps."""
    steps = triton.cdiv(k, group_k)
    wanted = max(1, min(_MAX_SPLITS, steps, programs // triton.cdiv(n, block_n)))
    return triton.cdiv(steps, triton.cdiv(steps, wanted))


@functools.cache
def _programs_to_fill(device: torch.device) -> int:
    if device.type != "cuda":
        return 264  # an H100/H200's 132 SMs, twice: what the interpreter tests then split like
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def split_k_quantizes_before() -> bool:
    """Whether w8a8_split_k_linear quantizes the activations in a launch of their own (PD_FP8_SPLIT_K_QUANT=before,
    the default: 31 us less GPU per batch-64 decode step on an H200) rather than inside the GEMM (``inside``: one
    launch fewer, but every column block's programs quantize the same rows again)."""
    return env_choice("PD_FP8_SPLIT_K_QUANT", "before", ("inside", "before")) == "before"


def w8a8_split_k_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, block: tuple[int, int],
                        bias: torch.Tensor | None = None, splits: int | None = None,
                        quantize_before: bool | None = None,
                        quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
                        config: dict[str, int] | None = None,
                        defer_sums: bool = False) -> torch.Tensor | SplitKParts:  # fmt: skip
    """The block-FP8 linear for decode-sized x [M <= SPLIT_K_MAX_ROWS, K] (split_k_fits): the activations are
    quantized inside the GEMM (the same values as token_group_quant) or by token_group_quant before it, and K is
    split over programs so the few column blocks of a small N still spread the weight over every SM, each split's
    float32 partial summed by a second launch (none with one split). No host sync.

    Args:
        x: [M, K] float32/bfloat16/float16, unit stride along K.
        weight, weight_scale, block, bias: as w8a8_block_gemm.
        splits: K splits (default split_count for this device).
        quantize_before: quantize in a launch of its own (default split_k_quantizes_before()).
        quantized: x already quantized by its producer, (e4m3 [M, K], float32 scales [M, ceil(K / block[1])]) as
            token_group_quant gives them: no quantization here.
        config: BLOCK_N, num_warps, num_stages of the GEMM (default SPLIT_K_CONFIG; benchmarks sweep them).
        defer_sums: with more than one split, return the partials unsummed (pd.layers.split_k_parts) for a
            consumer that sums them as it loads them.

    Returns:
        [M, N] in x's dtype, contiguous; or with defer_sums and several splits, a SplitKParts.
    """
    m, k = x.shape
    n = weight.shape[0]
    group_n, group_k = block
    assert split_k_fits(m, block) and x.stride(1) == 1 and x.dtype in TL_DTYPES, (x.shape, x.stride(), block)
    assert weight.dtype == FP8_DTYPE and weight.shape == (n, k) and weight.stride(1) == 1, (weight.shape, weight.dtype)
    assert weight_scale.shape == (triton.cdiv(n, group_n), triton.cdiv(k, group_k)), weight_scale.shape
    assert bias is None or bias.shape == (n,), bias.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    cfg = config or SPLIT_K_CONFIG
    splits = splits or split_count(n, k, group_k, _programs_to_fill(x.device), cfg["BLOCK_N"])
    steps = triton.cdiv(triton.cdiv(k, group_k), splits)
    splits = triton.cdiv(triton.cdiv(k, group_k), steps)  # no split left without a k-step
    part = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    bias_arg = bias if bias is not None else out  # a pointer the kernels never read without HAS_BIAS
    before = quantized is not None or (split_k_quantizes_before() if quantize_before is None else quantize_before)
    if quantized is not None:
        a, a_scale = quantized
        assert a.shape == x.shape and a.dtype == FP8_DTYPE and a_scale.shape == (m, triton.cdiv(k, group_k))
    else:
        a, a_scale = token_group_quant(x, group_k) if before else (x, out)  # (out: a pointer never read inside)
    _w8a8_split_k_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), splits)](
        a, a_scale, weight, weight_scale, bias_arg, part, m, n, k, a.stride(0), a_scale.stride(0),
        a_scale.stride(-1), weight.stride(0), weight_scale.stride(0), weight_scale.stride(1),
        part.stride(0) if splits > 1 else 0, part.stride(-2), PREQUANTIZED=before, HAS_BIAS=bias is not None,
        GROUP_N=group_n, STEPS=steps, ONE_SPLIT=splits == 1,
        SCALAR_B=group_n % cfg["BLOCK_N"] == 0, OUT_DTYPE=TL_DTYPES[x.dtype],
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=group_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if splits > 1:
        if defer_sums:
            return SplitKParts(part, bias, x.dtype)
        sum_splits(part, bias, x.dtype, out)
    return out


def sum_splits(part: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """[M, N] in dtype: the float32 partials part [splits, M, N] summed in split order, plus the bias, rounded once
    (the split-K GEMM's second launch)."""
    splits, m, n = part.shape
    assert part.dtype == torch.float32 and part.stride(-1) == 1, (part.dtype, part.stride())
    out = torch.empty(m, n, dtype=dtype, device=part.device) if out is None else out
    _sum_splits_kernel[(m, triton.cdiv(n, _SUM_BLOCK_N))](
        part, bias if bias is not None else out, out, n, part.stride(0), part.stride(1), out.stride(0),
        SPLITS=splits, HAS_BIAS=bias is not None, OUT_DTYPE=TL_DTYPES[dtype], BLOCK_N=_SUM_BLOCK_N,
    )  # fmt: skip
    return out


def w8a8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, block: tuple[int, int],
                      bias: torch.Tensor | None = None,
                      defer_sums: bool = False) -> torch.Tensor | SplitKParts:  # fmt: skip
    """A block-FP8 linear on x [..., K] (float32/bfloat16/float16) -> [..., N] in x's dtype. Three launches at
    most (two with PD_FP8_SPLIT_K_QUANT=inside), no host sync (CUDA-graph safe). By PD_FP8_GEMM
    (pd.layers.fp8_scaled_mm.mode):
    - auto (default): decode-sized rows (split_k_fits) take w8a8_split_k_linear; more rows cuBLAS's block-scaled
      FP8 GEMM where it runs (fp8_scaled_mm.use_cublas), else token_group_quant then w8a8_block_gemm;
    - triton: token_group_quant then w8a8_block_gemm at every size;
    - cublas: cuBLAS at every size where it runs.
    defer_sums: a 2-D x whose GEMM is the split-K one may come back as its unsummed partials (SplitKParts)."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if fp8_scaled_mm.mode() == "auto" and split_k_fits(rows.shape[0], block):
        # a 2-D x may come quantized by its producer (pd.layers.fp8_rows; a reshaped view has lost it)
        quantized = fp8_rows.attached(x, block[1]) if x.dim() == 2 else None
        out = w8a8_split_k_linear(rows, weight, weight_scale, block, bias, quantized=quantized,
                                  defer_sums=defer_sums and x.dim() == 2)  # fmt: skip
        if isinstance(out, SplitKParts):
            return out
    elif fp8_scaled_mm.use_cublas(rows.shape[0], weight, block, x.dtype):
        a_q, a_scale = token_group_quant_for_cublas(rows, block[1])
        out = fp8_scaled_mm.block_scaled_mm(a_q, a_scale, weight, weight_scale, x.dtype, bias)[: rows.shape[0]]
    else:
        a_q, a_scale = token_group_quant(rows, block[1])
        out = w8a8_block_gemm(a_q, a_scale, weight, weight_scale, block, x.dtype, bias)
    return out.view(*x.shape[:-1], weight.shape[0])
