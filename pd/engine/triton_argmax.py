"""Greedy sampling's argmax over the vocabulary in two Triton launches, equal to ``torch.argmax(dim=-1)``.

torch's row reduction gives each row one block of threads: at a decode batch of 64 rows of 151,936 logits that is 64
blocks on an H200's 132 SMs, 24 us for 19 MB that the card reads in under 5. Here each row is cut into chunks of
CHUNK columns read by programs of their own (rows x chunks of them); a second launch picks each row's best chunk.

Equal to torch's result, ties and specials included: the first index of the largest value, any NaN counting as the
largest (torch's rule), -0.0 equal to 0.0. Values are compared as int32 keys whose order is the floats' (sign bit
folded), NaN mapped above +inf; chunks keep index order, so the first best chunk holds the first best index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096


@triton.jit
def _order_key(x):
    """int32 keys in the order of the float32 values x: NaN above +inf, -0.0 equal to 0.0."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 as +0.0
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negatives: larger magnitude, smaller key
    return tl.where(x != x, 0x7FFFFFFF, key)


@triton.jit
def _chunk_argmax_kernel(x_ptr, key_ptr, idx_ptr, n_cols, stride_x, chunks, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=ok, other=float("-inf")).to(tl.float32)
    key = tl.where(ok, _order_key(x), -0x7FFFFFFF - 1)  # past the row: below every value
    # the largest key, then the first column holding it: two plain reductions (cheaper than one over pairs)
    best = tl.max(key, axis=0)
    first = tl.min(tl.where(key == best, cols, 0x7FFFFFFF), axis=0)
    tl.store(key_ptr + row * chunks + chunk, best)
    tl.store(idx_ptr + row * chunks + chunk, first)


@triton.jit
def _rows_argmax_kernel(key_ptr, idx_ptr, out_ptr, chunks, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < chunks
    key = tl.load(key_ptr + row * chunks + offs, mask=ok, other=-0x7FFFFFFF - 1)
    best = tl.max(key, axis=0)
    first = tl.min(tl.where(ok & (key == best), offs, BLOCK), axis=0)  # chunks in column order: the first best
    tl.store(out_ptr + row, tl.load(idx_ptr + row * chunks + first).to(tl.int64))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """[S, V] float32/bfloat16/float16 -> [S] int64: ``logits.argmax(dim=-1)``, in two launches, no host sync."""
    assert logits.dim() == 2 and logits.dtype in (torch.float32, torch.bfloat16, torch.float16), logits.dtype
    rows, cols = logits.shape
    assert cols > 0, "argmax of an empty row"
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    chunks = triton.cdiv(cols, CHUNK)
    keys = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    idx = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    _chunk_argmax_kernel[(rows, chunks)](logits, keys, idx, cols, logits.stride(0), chunks, CHUNK=CHUNK,
                                         num_warps=8)  # fmt: skip
    _rows_argmax_kernel[(rows,)](keys, idx, out, chunks, BLOCK=max(16, triton.next_power_of_2(chunks)),
                                 num_warps=1)  # fmt: skip
    return out
