"""Linears over one input run as one GEMM: their weights (block-FP8 scales, biases) concatenated by rows into one
linear, each original's parameters made views of it, so a later load into them still reaches the GEMM. One launch
instead of several (at decode sizes each is launch-bound; a block-FP8 one also quantizes its input once) and no
concatenation of their outputs: q/k/v (Attention.fuse_qkv) and an MLP's gate and up (DenseMLP.fuse_gate_up)."""

from __future__ import annotations

import torch
from torch import nn

from pd.quant.fp8 import Fp8Linear


def fuse_linears(linears: tuple[nn.Module, ...]) -> nn.Module | None:
    """The fused linear of ``linears`` (its output: theirs side by side, in order), or None where they cannot
    fuse: mixed dtypes or biases, not all plain linears nor all block-FP8 ones, FP8 blocks that differ, or FP8 rows
    (but the last linear's) that end inside a scale block (the scales would not concatenate like the weights).
    CPU-packed linears are neither."""
    if len({m.bias is None for m in linears}) != 1 or len({m.weight.dtype for m in linears}) != 1:
        return None
    kinds = {type(m) for m in linears}
    if kinds == {Fp8Linear}:
        block = linears[0].block
        if any(m.block != block for m in linears) or any(m.out_features % block[0] for m in linears[:-1]):
            return None
    elif kinds != {nn.Linear}:
        return None
    with torch.no_grad():
        fused = _concatenated(linears, sum(m.out_features for m in linears))
        for name in ("weight", "weight_scale_inv", "bias"):
            whole = getattr(fused, name, None)
            if whole is None:
                continue
            rows = [getattr(m, name).shape[0] for m in linears]  # scales: rows of blocks
            for part, m in zip(whole.split(rows), linears, strict=True):
                setattr(m, name, nn.Parameter(part, requires_grad=False))
    return fused


def _concatenated(linears: tuple[nn.Module, ...], out_features: int) -> nn.Module:
    """A linear whose weight (scales, bias) is the row-wise concatenation of ``linears``'."""
    first = linears[0]
    has_bias = first.bias is not None
    weight = torch.cat([m.weight for m in linears])  # type: ignore[misc]
    if isinstance(first, Fp8Linear):
        fused: nn.Module = Fp8Linear(first.in_features, out_features, has_bias, first.block, first.dtype, "meta")
        fused.weight_scale_inv = nn.Parameter(torch.cat([m.weight_scale_inv for m in linears]),  # type: ignore[misc]
                                              requires_grad=False)  # fmt: skip
    else:
        fused = nn.Linear(first.in_features, out_features, has_bias, device="meta")  # type: ignore[arg-type]
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False)  # type: ignore[misc]
    return fused
