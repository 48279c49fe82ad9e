"""The fused-MoE grouped GEMM (Triton) and its block-size tables.

One kernel serves both expert GEMMs. Its rows are the blocks of pd.moe.runner.moe_align: each program takes one
block of BLOCK_M rows (one expert) and one block of BLOCK_N output columns, gathers the A rows of the block's
pairs, multiplies by that expert's weight read transposed from its stored [E, N, K] layout, and writes each row
at its pair index of a per-pair [N_tokens * top_k, N] output. Blocks past the used rows exit at once and write
nothing, so the grid can be sized for the worst case (static shapes, CUDA-graph safe).

- gate_up: A = hidden [N_tokens, H] (row = pair // top_k), B = w13 [E, 2I, H] -> [pairs, 2I].
- down: A = act(gate) * up [pairs, I] (row = pair), B = w2 [E, H, I], times the routing weight -> [pairs, H].

Its batched variant (``invoke_batched_moe_gemm``) takes rows already grouped per expert, A = [E, max_rows, K] with a
row count per expert (the batched dispatch format): program (row block, column block, expert) multiplies rows
[0, count_e) of expert e by its weight and writes them unweighted at the same place of C = [E, max_rows, N];
programs whose row block starts past the count (read on the device) exit at once. No alignment, no sort, and a
grid fixed by max_rows (static shapes, CUDA-graph safe).

Block-FP8 experts (``BlockFp8``): A and B are float8_e4m3fn, A with one float32 scale per row and group of GROUP_K
columns (pd.layers.triton_fp8_gemm.token_group_quant), B with one per (GROUP_N x GROUP_K) block of each expert
(pd.quant.fp8's layout). BLOCK_K divides GROUP_K, so each k-step is one fp8 ``tl.dot`` times a row-scale vector and
a column-scale vector, accumulated in float32 (SGLang's fused_moe_kernel with use_fp8_w8a8 and block_shape).

Block sizes come from JSON tables in ``configs/`` (one per GEMM shape, dtype and GPU, mapping a token count to
a config, as SGLang and vLLM store them), written by benchmarks/tune_fused_moe.py; a GPU without its own table
takes one of a GPU of the same die (an H100's, an H200's); ``default_config`` covers shapes nobody tuned.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from pd.env_choice import env_choice
from pd.layers.tma import has_tma
from pd.layers.triton_fp8_gemm import TL_DTYPES, e4m3_groups

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
CONFIG_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")

_FP8 = torch.float8_e4m3fn
# GPUs built on one die (same SMs, shared memory and registers; only the memory differs): a table tuned on one of
# them is the best guess for the others, far better than the untuned defaults.
SAME_DIE = (
    ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H100", "NVIDIA H200 NVL", "NVIDIA H100 NVL", "NVIDIA GH200 480GB"),
)


@dataclass(frozen=True)
class BlockFp8:
    """The scales of a block-FP8 expert GEMM (A and B float8_e4m3fn; C in the model dtype).

    a_scale: float32, one per A row and group of block[1] columns: [X, ceil(K / block[1])] (standard layout) or
        [E, max_rows, ceil(K / block[1])] (batched), unit stride along the groups not required. None (standard
        layout only): A is in the model dtype and each k-step quantizes its tile as token_group_quant would (the
        same e4m3 values and scales), for decode-sized batches where the weights, not this work, bound the GEMM.
    b_scale: [E, S, ceil(K / block[1])] float32, the weights' block scales.
    block: (GROUP_N, GROUP_K) of B's scale blocks; A's groups are GROUP_K wide.
    split: B's output rows [0, split) and [split, N) were quantized apart (gate and up of w13, whose scale rows
        are gate's ceil(I / GROUP_N) then up's): row n's scale row is n // GROUP_N below split and
        ceil(split / GROUP_N) + (n - split) // GROUP_N from it. N for a weight quantized whole (w2).
    """

    a_scale: torch.Tensor | None
    b_scale: torch.Tensor
    block: tuple[int, int]
    split: int


@triton.jit
def _b_scale_rows(offs_n, split, GROUP_N: tl.constexpr):
    """Each column's row of B's scales (see BlockFp8.split)."""
    split_rows = (split + GROUP_N - 1) // GROUP_N
    return tl.where(offs_n < split, offs_n // GROUP_N, split_rows + (offs_n - split) // GROUP_N)


@triton.jit
def _b_scale_ptrs(bs_expert_ptr, pid_n, offs_n, split, stride_bsn, GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr,
                  SCALAR_B: tl.constexpr):  # fmt: skip
    """Pointers to the column block's rows of B's scales (at group 0): one pointer with SCALAR_B (the block's
    first column's row is every column's), else one per column."""
    # One return statement: Triton compiles a function whose returns differ in type (a pointer, a block of them)
    # as an error even when a constexpr picks one (its interpreter does not).
    if SCALAR_B:
        ptrs = bs_expert_ptr + _b_scale_rows(pid_n * BLOCK_N, split, GROUP_N) * stride_bsn
    else:
        ptrs = bs_expert_ptr + _b_scale_rows(offs_n, split, GROUP_N) * stride_bsn
    return ptrs


@triton.jit
def _load_b(b_ptrs, b_desc, b_row, k, k_left, EVEN_K: tl.constexpr, B_DESC: tl.constexpr, BLOCK_K: tl.constexpr):
    """The k-th [BLOCK_K, BLOCK_N] tile of B: through a tensor descriptor (TMA on Hopper: BLOCK_N rows of the
    [E * N, K] weights from row ``b_row``, K past its end read as zeros) or through pointers."""
    if B_DESC:
        b = b_desc.load([b_row, k * BLOCK_K]).T
    elif EVEN_K:
        b = tl.load(b_ptrs)
    else:
        b = tl.load(b_ptrs, mask=tl.arange(0, BLOCK_K)[:, None] < k_left, other=0.0)
    return b


@triton.jit
def _accumulate_fp8(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, a_rows_valid, K, stride_ak, stride_bk, stride_ask, stride_bsk,
                    EVEN_K: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, SCALAR_B: tl.constexpr, QUANTIZE_A: tl.constexpr = False,
                    b_desc=None, b_row=0, B_DESC: tl.constexpr = False):  # fmt: skip
    """_accumulate for float8_e4m3fn A and B: each k-step's fp8 product times A's row scales (``as_ptrs`` at group
    0) and B's column scales (``bs_ptrs`` at group 0), summed in float32.

    QUANTIZE_A: A is in the model dtype and BLOCK_K == GROUP_K: each k-step quantizes its A tile per row with
    token_group_quant's arithmetic (``as_ptrs`` unread), so the products are those of the prequantized A.

    SCALAR_B: the tile's columns share one scale row (``bs_ptrs`` one pointer), so a k-step scales its product by
    one per-row vector, a multiply-add per element instead of two multiplies and an add.

    (Issuing two k-steps' products before scaling either, so one's scaling could overlap the other's MMA, was
    measured slower on an H200 at every size: benchmarks/results/h200_2026-12-03, ninth run. Warp-specializing this
    loop, ``tl.range(..., warp_specialize=True)``, does not compile with 4 warps on Triton 3.6 for Hopper and
    changes nothing with 8: benchmarks/results/h200_2026-12-04, thirteenth run.)

    B_DESC: B's tiles come through ``b_desc`` (see _load_b), ``b_ptrs`` unread."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs, mask=a_rows_valid[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=a_rows_valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = _load_b(b_ptrs, b_desc, b_row, k, k_left, EVEN_K, B_DESC, BLOCK_K)
        group = (k * BLOCK_K) // GROUP_K
        if QUANTIZE_A:  # rows outside a_rows_valid are zeros: scale 1e-10 / 448, products 0
            a, a_s = e4m3_groups(a.to(tl.float32), b.dtype)
        else:
            a_s = tl.load(as_ptrs + group * stride_ask, mask=a_rows_valid, other=0.0)
        b_s = tl.load(bs_ptrs + group * stride_bsk)
        if SCALAR_B:
            acc += tl.dot(a, b) * (a_s * b_s)[:, None]
        else:
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _accumulate(a_ptrs, b_ptrs, a_rows_valid, K, stride_ak, stride_bk, EVEN_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, b_desc=None, b_row=0, B_DESC: tl.constexpr = False):  # fmt: skip
    """[BLOCK_M, BLOCK_N] float32: the A rows (``a_ptrs`` at k = 0, rows outside ``a_rows_valid`` read as zeros)
    times the B tile (``b_ptrs``, read transposed; or through ``b_desc``, see _load_b), over all of K."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs, mask=a_rows_valid[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=a_rows_valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = _load_b(b_ptrs, b_desc, b_row, k, k_left, EVEN_K, B_DESC, BLOCK_K)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit(do_not_specialize=["num_pairs"])
def _fused_moe_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_of_block_ptr, num_rows_post_pad_ptr,
    as_ptr, bs_ptr, num_pairs, N, K, scale_split,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
    A_ROW_DIVISOR: tl.constexpr, MUL_WEIGHT: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, OUT_DTYPE: tl.constexpr, USE_FP8: tl.constexpr, QUANTIZE_A: tl.constexpr,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, SCALAR_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    b_desc=None, B_DESC: tl.constexpr = False,
):  # fmt: skip
    # Programs in groups of GROUP_M row blocks that walk the column blocks together, so the A rows of a group
    # stay in L2 while the group sweeps N (the Triton matmul tutorial's ordering).
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    if pid_m * BLOCK_M >= tl.load(num_rows_post_pad_ptr):
        return
    expert = tl.load(expert_of_block_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs  # padding rows hold the sentinel num_pairs
    a_rows = (pairs // A_ROW_DIVISOR).to(tl.int64)
    # Columns wrap around N so B loads need no mask; the store masks the wrapped ones.
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    # With B_DESC, rows of the [E * N, K] weights: a column block past N reads the next expert's rows (or zeros
    # past the last), columns the store drops.
    b_row = (expert * N + pid_n * BLOCK_N).to(tl.int32)
    if USE_FP8:
        as_ptrs = as_ptr + a_rows * stride_asm
        bs_ptrs = _b_scale_ptrs(bs_ptr + expert * stride_bse, pid_n, offs_n, scale_split, stride_bsn, GROUP_N,
                                BLOCK_N, SCALAR_B)  # fmt: skip
        acc = _accumulate_fp8(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, valid, K, stride_ak, stride_bk, stride_ask,
                              stride_bsk, EVEN_K, GROUP_K, BLOCK_M, BLOCK_N, BLOCK_K, SCALAR_B, QUANTIZE_A,
                              b_desc, b_row, B_DESC)  # fmt: skip
    else:
        acc = _accumulate(a_ptrs, b_ptrs, valid, K, stride_ak, stride_bk, EVEN_K, DOT_PRECISION, BLOCK_M, BLOCK_N,
                          BLOCK_K, b_desc, b_row, B_DESC)  # fmt: skip

    if MUL_WEIGHT:
        # The expert output in the model dtype, times the float32 routing weight, cast: the reference's order.
        w = tl.load(weights_ptr + pairs, mask=valid, other=0.0)
        out = (acc.to(OUT_DTYPE).to(tl.float32) * w[:, None]).to(OUT_DTYPE)
    else:
        out = acc.to(OUT_DTYPE)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + pairs[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, out, mask=valid[:, None] & (cols[None, :] < N))


def invoke_fused_moe_gemm(
    a_XK: torch.Tensor,
    b_ENK: torch.Tensor,
    c_PN: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_of_block: torch.Tensor,
    num_rows_post_pad: torch.Tensor,
    top_k: int,
    a_per_pair: bool,
    config: dict[str, int],
    topk_weights_P: torch.Tensor | None = None,
    fp8: BlockFp8 | None = None,
    tma: bool | None = None,
) -> torch.Tensor:
    """c[p] = a[row(p)] @ b[expert(p)].T (times weight[p]) for every pair p in ``sorted_ids``. Asynchronous.

    Args:
        a_XK: [X, K] model dtype (float8_e4m3fn with ``fp8``), unit stride along K. X = N_tokens
            (row(p) = p // top_k) or, with ``a_per_pair``, X = N_tokens * top_k (row(p) = p).
        b_ENK: [E, N, K] model dtype (float8_e4m3fn with ``fp8``): weights as stored (nn.Linear layout per expert),
            read transposed.
        c_PN: [N_tokens * top_k, N] model dtype output, written only at the pairs in sorted_ids (the other rows
            keep whatever they held).
        sorted_ids, expert_of_block, num_rows_post_pad: from moe_align.align_pairs_to_blocks with
            block_m == config["BLOCK_SIZE_M"] (int32: [max_rows], [max_rows // BLOCK_M], [1]).
        top_k: K slots per token.
        a_per_pair: whether a_XK holds one row per pair.
        config: CONFIG_KEYS -> int.
        topk_weights_P: [N_tokens * top_k] float32, multiplied into each output row (in float32, after
            rounding the GEMM result to the model dtype), or None.
        fp8: the scales of float8_e4m3fn A and B (a_scale [X, ceil(K / GROUP_K)]); config's BLOCK_SIZE_K must
            divide GROUP_K. With a_scale None, A is in C's dtype and quantized by the kernel (BLOCK_SIZE_K must be
            GROUP_K). None: A, B and C share the model dtype.

    Returns:
        c_PN.
    """
    block_m, block_n, block_k = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    num_pairs, n = c_PN.shape
    e, n_b, k = b_ENK.shape
    assert a_XK.dim() == 2 and a_XK.shape[1] == k and a_XK.stride(1) == 1, (a_XK.shape, b_ENK.shape)
    assert a_XK.shape[0] * (1 if a_per_pair else top_k) == num_pairs and n_b == n, (a_XK.shape, c_PN.shape)
    _check_operands(a_XK, b_ENK, c_PN, fp8, block_k)
    assert sorted_ids.dtype == expert_of_block.dtype == num_rows_post_pad.dtype == torch.int32
    assert sorted_ids.numel() == expert_of_block.numel() * block_m, (sorted_ids.shape, expert_of_block.shape)
    assert topk_weights_P is None or (topk_weights_P.dtype == torch.float32 and topk_weights_P.shape == (num_pairs,))
    assert len({t.device for t in (a_XK, b_ENK, c_PN, sorted_ids, expert_of_block)}) == 1
    weights = topk_weights_P if topk_weights_P is not None else c_PN  # a pointer the kernel never reads
    if fp8 is not None and fp8.a_scale is not None:
        assert fp8.a_scale.shape[0] == a_XK.shape[0], (fp8.a_scale.shape, a_XK.shape)
    a_s, b_s, a_s_strides, b_s_strides, group, split = _scale_args(fp8, c_PN, 2, n)
    wanted = weight_descriptor_wanted(b_ENK.device) if tma is None else tma
    b_desc = _weight_descriptor(b_ENK, block_n, block_k) if wanted else None
    grid = (expert_of_block.numel() * triton.cdiv(n, block_n),)
    _fused_moe_kernel[grid](
        a_XK, b_ENK, c_PN, weights, sorted_ids, expert_of_block, num_rows_post_pad,
        a_s, b_s, num_pairs, n, k, split,
        a_XK.stride(0), a_XK.stride(1), b_ENK.stride(0), b_ENK.stride(1), b_ENK.stride(2),
        c_PN.stride(0), c_PN.stride(1), *a_s_strides, *b_s_strides,
        A_ROW_DIVISOR=1 if a_per_pair else top_k, MUL_WEIGHT=topk_weights_P is not None,
        EVEN_K=k % block_k == 0, DOT_PRECISION="ieee" if a_XK.dtype == torch.float32 else "tf32",
        OUT_DTYPE=TL_DTYPES[c_PN.dtype], USE_FP8=fp8 is not None,
        QUANTIZE_A=fp8 is not None and fp8.a_scale is None, GROUP_N=group[0], GROUP_K=group[1],
        SCALAR_B=_scalar_b(fp8, n, block_n),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=config["GROUP_SIZE_M"],
        b_desc=b_desc, B_DESC=b_desc is not None,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return c_PN


def weight_descriptor_wanted(device: torch.device) -> bool:
    """PD_MOE_TMA: 1 (default) reads the experts' weight tiles through tensor descriptors (TMA) on GPUs that have
    it (compute capability 9 and up), 0 through pointers everywhere. On an H200 the descriptors gave FP8 experts at
    8192 tokens 6-7% more TFLOP/s and left bf16 and decode sizes as they were (benchmarks/results/h200_2026-12-04)."""
    return env_choice("PD_MOE_TMA", "1", ("0", "1")) == "1" and has_tma(device)


def _weight_descriptor(b_ENK: torch.Tensor, block_n: int, block_k: int) -> Any:
    """A [block_n, block_k] tensor descriptor over the [E * N, K] rows of contiguous weights, or None where the
    layout does not allow one (TMA: 16-byte aligned base and row stride, a box row of 16 bytes or more)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    e, n, k = b_ENK.shape
    size = b_ENK.element_size()
    if (not b_ENK.is_contiguous() or b_ENK.data_ptr() % 16 or (k * size) % 16 or block_k * size < 16
            or block_n > 256 or block_k > 256 or e * n == 0):  # fmt: skip
        return None
    return TensorDescriptor.from_tensor(b_ENK.view(e * n, k), [block_n, block_k])


def _check_operands(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, fp8: BlockFp8 | None, block_k: int) -> None:
    """A and B in C's dtype, or float8_e4m3fn with scales whose groups hold whole k-steps."""
    assert c.dtype in TL_DTYPES, c.dtype
    if fp8 is None:
        assert a.dtype == b.dtype == c.dtype, (a.dtype, b.dtype, c.dtype)
        return
    group_n, group_k = fp8.block
    k = b.shape[2]
    assert b.dtype == _FP8 and fp8.b_scale.dtype == torch.float32, (b.dtype, fp8.b_scale.dtype)
    if fp8.a_scale is None:  # quantized by the kernel, one k-step per scale group
        assert a.dtype == c.dtype and block_k == group_k, (a.dtype, c.dtype, block_k, group_k)
    else:
        assert a.dtype == _FP8 and fp8.a_scale.dtype == torch.float32, (a.dtype, fp8.a_scale.dtype)
        assert fp8.a_scale.shape[-1] == triton.cdiv(k, group_k), (fp8.a_scale.shape, k, group_k)
    rows = triton.cdiv(fp8.split, group_n) + triton.cdiv(b.shape[1] - fp8.split, group_n)
    assert fp8.b_scale.shape == (b.shape[0], rows, triton.cdiv(k, group_k)), (fp8.b_scale.shape, b.shape, fp8)
    assert group_k % block_k == 0, f"BLOCK_SIZE_K {block_k} must divide the scale group {group_k}"


def _scalar_b(fp8: BlockFp8 | None, n: int, block_n: int) -> bool:
    """Whether every column block of BLOCK_N lies inside one row of B's scales: BLOCK_N divides GROUP_N and the
    gate/up split (if any) falls on a GROUP_N edge. (Wrapped columns past N may read another row: never stored.)"""
    if fp8 is None:
        return False
    group_n = fp8.block[0]
    return group_n % block_n == 0 and (fp8.split == n or fp8.split % group_n == 0)


_ScaleArgs = tuple[torch.Tensor, torch.Tensor, tuple[int, ...], tuple[int, ...], tuple[int, int], int]


def _scale_args(fp8: BlockFp8 | None, dummy: torch.Tensor, a_dims: int, n: int) -> _ScaleArgs:
    """The kernels' scale arguments: (a_scale, b_scale, a_scale strides, b_scale strides, (GROUP_N, GROUP_K),
    split); placeholders the kernel never reads without FP8."""
    if fp8 is None:
        return dummy, dummy, (0,) * a_dims, (0, 0, 0), (1, 1), n
    if fp8.a_scale is None:  # quantized in the kernel: a placeholder it never reads
        return dummy, fp8.b_scale, (0,) * a_dims, fp8.b_scale.stride(), fp8.block, fp8.split
    return fp8.a_scale, fp8.b_scale, fp8.a_scale.stride(), fp8.b_scale.stride(), fp8.block, fp8.split


@triton.jit
def _batched_moe_kernel(
    a_ptr, b_ptr, c_ptr, counts_ptr, as_ptr, bs_ptr, max_rows, N, K, scale_split,
    stride_ae, stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_ce, stride_cm, stride_cn,
    stride_ase, stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, OUT_DTYPE: tl.constexpr, USE_FP8: tl.constexpr,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, SCALAR_B: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Column blocks of one row block are neighbours, so they read the block's A rows while those are in L2.
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_pid_n
    pid_n = tl.program_id(0) % num_pid_n
    expert = tl.program_id(1)
    rows_used = tl.minimum(tl.load(counts_ptr + expert), max_rows)  # a count past the rows must not write past them
    if pid_m * BLOCK_M >= rows_used:
        return
    expert = expert.to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = rows < rows_used
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # wrapped, as in _fused_moe_kernel
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + expert * stride_ae + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    if USE_FP8:
        as_ptrs = as_ptr + expert * stride_ase + rows.to(tl.int64) * stride_asm
        bs_ptrs = _b_scale_ptrs(bs_ptr + expert * stride_bse, pid_n, offs_n, scale_split, stride_bsn, GROUP_N,
                                BLOCK_N, SCALAR_B)  # fmt: skip
        acc = _accumulate_fp8(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, valid, K, stride_ak, stride_bk, stride_ask,
                              stride_bsk, EVEN_K, GROUP_K, BLOCK_M, BLOCK_N, BLOCK_K, SCALAR_B)  # fmt: skip
    else:
        acc = _accumulate(a_ptrs, b_ptrs, valid, K, stride_ak, stride_bk, EVEN_K, DOT_PRECISION, BLOCK_M, BLOCK_N,
                          BLOCK_K)  # fmt: skip

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + expert * stride_ce + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(OUT_DTYPE), mask=valid[:, None] & (cols[None, :] < N))


def invoke_batched_moe_gemm(
    a_EMK: torch.Tensor,
    b_ENK: torch.Tensor,
    c_EMN: torch.Tensor,
    counts_E: torch.Tensor,
    config: dict[str, int],
    fp8: BlockFp8 | None = None,
) -> torch.Tensor:
    """c[e, j] = a[e, j] @ b[e].T for every expert e and row j < counts_E[e]. Asynchronous, no host sync.

    Args:
        a_EMK: [E, max_rows, K] model dtype (float8_e4m3fn with ``fp8``), any strides (rows past a count are not
            read).
        b_ENK: [E, N, K] model dtype (float8_e4m3fn with ``fp8``): weights as stored (nn.Linear layout per
            expert), read transposed.
        c_EMN: [E, max_rows, N] model dtype output; rows past a count keep whatever they held.
        counts_E: [E] int32 rows used per expert (on the device; values past max_rows are clamped to it).
        config: CONFIG_KEYS -> int (GROUP_SIZE_M unused: one expert's row blocks are few).
        fp8: the scales of float8_e4m3fn A and B (a_scale [E, max_rows, ceil(K / GROUP_K)]); config's BLOCK_SIZE_K
            must divide GROUP_K. None: A, B and C share the model dtype.

    Returns:
        c_EMN.
    """
    block_m, block_n, block_k = config["BLOCK_SIZE_M"], config["BLOCK_SIZE_N"], config["BLOCK_SIZE_K"]
    e, max_rows, k = a_EMK.shape
    e_b, n, k_b = b_ENK.shape
    assert (e_b, k_b) == (e, k) and c_EMN.shape == (e, max_rows, n), (a_EMK.shape, b_ENK.shape, c_EMN.shape)
    _check_operands(a_EMK, b_ENK, c_EMN, fp8, block_k)
    assert fp8 is None or fp8.a_scale is not None, "the batched kernel takes prequantized A"
    assert fp8 is None or fp8.a_scale.shape[:2] == (e, max_rows), (fp8.a_scale.shape if fp8 else None)
    assert counts_E.shape == (e,) and counts_E.dtype == torch.int32, (counts_E.shape, counts_E.dtype)
    assert len({t.device for t in (a_EMK, b_ENK, c_EMN, counts_E)}) == 1
    if e == 0 or max_rows == 0 or n == 0:
        return c_EMN
    a_s, b_s, a_s_strides, b_s_strides, group, split = _scale_args(fp8, c_EMN, 3, n)
    grid = (triton.cdiv(max_rows, block_m) * triton.cdiv(n, block_n), e)
    _batched_moe_kernel[grid](
        a_EMK, b_ENK, c_EMN, counts_E, a_s, b_s, max_rows, n, k, split,
        a_EMK.stride(0), a_EMK.stride(1), a_EMK.stride(2), b_ENK.stride(0), b_ENK.stride(1), b_ENK.stride(2),
        c_EMN.stride(0), c_EMN.stride(1), c_EMN.stride(2), *a_s_strides, *b_s_strides,
        EVEN_K=k % block_k == 0, DOT_PRECISION="ieee" if a_EMK.dtype == torch.float32 else "tf32",
        OUT_DTYPE=TL_DTYPES[c_EMN.dtype], USE_FP8=fp8 is not None, GROUP_N=group[0], GROUP_K=group[1],
        SCALAR_B=_scalar_b(fp8, n, block_n),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    return c_EMN


def config_file_name(num_experts: int, n: int, k: int, dtype: torch.dtype, device_name: str) -> str:
    """``E=128,N=1536,K=2048,dtype=bfloat16,device=NVIDIA_H200.json``: the table of one GEMM shape on one GPU."""
    dtype_name = str(dtype).removeprefix("torch.")
    return f"E={num_experts},N={n},K={k},dtype={dtype_name},device={device_name.replace(' ', '_')}.json"


@functools.cache
def load_config_table(path: str) -> dict[int, dict[str, int]] | None:
    """A tuned table (token count -> config), or None when the file does not exist.

    Raises:
        ValueError: the file is not a table of complete configs.
    """
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        raw = json.load(f)
    try:
        table = {int(m): {key: int(cfg[key]) for key in CONFIG_KEYS} for m, cfg in raw.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: expected {{token count: {{{', '.join(CONFIG_KEYS)}}}}}: {e!r}") from e
    if not table:
        raise ValueError(f"{path}: empty table")
    return table


def default_config(num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes for a shape nobody tuned, from the mean rows per expert.

    Few rows per expert (decode): 16-row blocks and narrow column blocks, so the weights (the whole cost) are
    streamed by many programs at once. Many rows (prefill): large tiles that reuse each weight tile over
    64-128 rows.
    """
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    if dtype == _FP8:  # k-steps of 128 fp8 columns: one scale group of DeepSeek's 128x128 blocks, half the bytes
        if rows_per_expert <= 16:
            cfg = (16, 64, 128, 1, 4, 4)
        elif rows_per_expert <= 64:
            cfg = (32, 64, 128, 8, 4, 4)
        elif rows_per_expert <= 256:
            cfg = (64, 128, 128, 8, 4, 3)
        else:
            cfg = (128, 128, 128, 8, 8, 3)
        return dict(zip(CONFIG_KEYS, cfg, strict=True))
    wide = 2 if dtype == torch.float32 else 1  # float32 tiles take twice the shared memory
    if rows_per_expert <= 16:
        cfg = (16, 64, 128 // wide, 1, 4, 4)
    elif rows_per_expert <= 64:
        cfg = (32, 64, 128 // wide, 8, 4, 4)
    elif rows_per_expert <= 256:
        cfg = (64, 128, 64 // wide, 8, 4, 3)
    else:
        cfg = (128, 128, 64 // wide, 8, 8, 3)
    return dict(zip(CONFIG_KEYS, cfg, strict=True))


def find_config_table(num_experts: int, n: int, k: int, dtype: torch.dtype, device_name: str,
                      config_dir: str = CONFIG_DIR) -> dict[int, dict[str, int]] | None:  # fmt: skip
    """The table of this shape and dtype tuned on this GPU, else on a GPU of the same die (SAME_DIE), else None."""
    table = load_config_table(os.path.join(config_dir, config_file_name(num_experts, n, k, dtype, device_name)))
    if table is not None:
        return table
    for die in SAME_DIE:
        if device_name in die:
            for other in die:
                table = load_config_table(os.path.join(config_dir, config_file_name(num_experts, n, k, dtype, other)))
                if table is not None:
                    return table
    return None


def get_config(num_experts: int, n: int, k: int, dtype: torch.dtype, num_tokens: int, top_k: int,
               device_name: str, config_dir: str = CONFIG_DIR) -> dict[str, int]:  # fmt: skip
    """Block sizes for one GEMM (B = [E, n, k] of ``dtype``: the model dtype, or float8_e4m3fn for block-FP8
    experts, whose tables are their own) at ``num_tokens`` tokens: the tuned entry of the nearest token count when
    a table exists for this shape and dtype on this GPU or one of its die (``find_config_table``), else
    ``default_config``."""
    table = find_config_table(num_experts, n, k, dtype, device_name, config_dir)
    if table is None:
        return default_config(num_tokens, top_k, num_experts, dtype)
    nearest = min(table, key=lambda m: (abs(m - num_tokens), m))
    return dict(table[nearest])


def describe(config: dict[str, Any]) -> str:
    """A config on one line, for logs and benchmark tables."""
    return "M{BLOCK_SIZE_M} N{BLOCK_SIZE_N} K{BLOCK_SIZE_K} G{GROUP_SIZE_M} w{num_warps} s{num_stages}".format(**config)
