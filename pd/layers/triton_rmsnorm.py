"""RMSNorm as one Triton kernel: the reference's seven elementwise and reduction kernels per norm (cast up, square,
mean, rsqrt, scale, cast down, weight) read and write the activations in float32 several times; at prefill sizes
they were a quarter of a layer's GPU time, and at decode sizes as many launches as the rest of the layer.

Numerics follow `pd.layers.norm.RMSNorm`: the sum of squares and the scaling in float32, the normalised row cast to
the input dtype, then multiplied by the weight and rounded once more (the reference's `weight * x.to(dtype)`).

`add_rms_norm` also adds the residual branch first (`x + delta`, rounded to the dtype as torch's add rounds it) and
returns the sum beside its norm: the decoder layers' residual adds then cost no launch of their own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pd.layers import fp8_rows
from pd.layers.split_k_parts import SplitKParts
from pd.layers.triton_fp8_gemm import FP8_DTYPE, e4m3_groups


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, n_cols, x_stride, out_stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = (x * rstd).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_stride + cols, out, mask=mask)


@triton.jit
def _add_rmsnorm_kernel(x_ptr, d_ptr, bias_ptr, w_ptr, sum_ptr, out_ptr, q_ptr, s_ptr, n_cols, x_stride, d_stride,
                        d_split_stride, sum_stride, out_stride, q_stride, s_stride, eps, BLOCK: tl.constexpr,
                        QUANT_GROUP: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    a = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if SPLITS > 0:  # delta is a split-K GEMM's float32 partials: summed as its sums launch does, then rounded
        acc = tl.zeros([BLOCK], tl.float32)
        for split in tl.static_range(SPLITS):
            acc += tl.load(d_ptr + split * d_split_stride + row * d_stride + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = acc.to(sum_ptr.dtype.element_ty).to(tl.float32)
    else:
        b = tl.load(d_ptr + row * d_stride + cols, mask=mask, other=0.0).to(tl.float32)
    total = (a + b).to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * sum_stride + cols, total, mask=mask)
    x = total.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = (x * rstd).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_stride + cols, out, mask=mask)
    if QUANT_GROUP > 0:  # the normed row also in e4m3 per group of columns
        groups = tl.reshape(out.to(tl.float32), (BLOCK // QUANT_GROUP, QUANT_GROUP))
        q, scale = e4m3_groups(groups, q_ptr.dtype.element_ty)
        tl.store(q_ptr + row * q_stride + cols, tl.reshape(q, (BLOCK,)), mask=mask)
        first = tl.arange(0, BLOCK // QUANT_GROUP) * QUANT_GROUP
        tl.store(s_ptr + row * s_stride + first // QUANT_GROUP, scale, mask=first < n_cols)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, N] with the last dimension contiguous (a view when it can be)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | SplitKParts, weight: torch.Tensor, eps: float,
                 quant_group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """x, delta [..., N] of one dtype, weight [N] -> (x + delta, rms_norm(x + delta)), both new contiguous tensors
    in x's dtype, in one launch. delta may be a split-K GEMM's unsummed partials (x 2-D): summed here as the
    GEMM's sums launch would. With ``quant_group`` (a power of two dividing N's next power of two) the norm's
    rows are also quantized to e4m3 per group of that many columns, as token_group_quant would, and attached to
    the norm (pd.layers.fp8_rows) for the block-FP8 linear that reads it."""
    n = x.shape[-1]
    a = _rows(x)
    if isinstance(delta, SplitKParts):
        assert x.dim() == 2 and delta.shape == x.shape and delta.dtype == x.dtype, (x.shape, delta.shape)
        b, splits, bias = delta.part, delta.part.shape[0], delta.bias
        assert b.stride(-1) == 1 and (bias is None or bias.shape == (n,)), (b.stride(), bias)
    else:
        assert delta.shape == x.shape and delta.dtype == x.dtype, (x.shape, delta.shape)
        b, splits, bias = _rows(delta), 0, None
    assert weight.shape == (n,), (weight.shape, n)
    rows = a.shape[0]
    total = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    out = torch.empty_like(total)
    block = triton.next_power_of_2(n)
    if quant_group:
        assert block % quant_group == 0 and quant_group & (quant_group - 1) == 0, (n, quant_group)
        q = torch.empty((rows, n), dtype=FP8_DTYPE, device=x.device)
        scale = torch.empty((rows, triton.cdiv(n, quant_group)), dtype=torch.float32, device=x.device)
    else:
        q, scale = out, total  # pointers the kernel never reads
    if rows:
        _add_rmsnorm_kernel[(rows,)](a, b, bias if bias is not None else weight, weight, total, out, q, scale, n,
                                     a.stride(0), b.stride(-2), b.stride(0) if splits else 0, total.stride(0),
                                     out.stride(0), q.stride(0), scale.stride(0), eps, BLOCK=block,
                                     QUANT_GROUP=quant_group or 0, SPLITS=splits, HAS_BIAS=bias is not None,
                                     num_warps=min(max(block // 256, 1), 16))  # fmt: skip
    normed = out.view(x.shape)
    if quant_group:
        fp8_rows.attach(normed, q, scale, quant_group)
    return total.view(x.shape), normed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., N] (rows may be strided, the last dimension contiguous), weight [N] -> [..., N] in x's dtype, a new
    contiguous tensor. Any float dtype; fp32 accumulation."""
    n = x.shape[-1]
    assert weight.shape == (n,), (weight.shape, n)
    rows = x.reshape(-1, n)  # a view when the leading dimensions are contiguous over rows
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0:
        return out.view(x.shape)
    block = triton.next_power_of_2(n)
    num_warps = min(max(block // 256, 1), 16)
    _rmsnorm_kernel[(rows.shape[0],)](rows, weight, out, n, rows.stride(0), out.stride(0), eps, BLOCK=block,
                                      num_warps=num_warps)  # fmt: skip
    return out.view(x.shape)
