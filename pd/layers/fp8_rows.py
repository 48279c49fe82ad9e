"""Activations that arrive already quantized for a block-FP8 linear.

A kernel that produces a linear's input (the add-and-RMSNorm before a decoder layer's fused q/k/v projection) can
also write it in e4m3 with one float32 scale per row and group of columns, as token_group_quant would, saving the
linear a launch of its own. The quantized copy travels attached to the compute-dtype tensor as an attribute, so
every other reader of that tensor, and every path that cannot use the copy, is unchanged: a view or a copy of the
tensor does not carry it, and the linear then quantizes as before.
"""

from __future__ import annotations

import torch

_ATTRIBUTE = "_fp8_rows"


def attach(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int) -> None:
    """Record q (e4m3, x's shape as rows [M, K]) and scale ([M, ceil(K / group)] float32) as x's quantization."""
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32, (q.dtype, scale.dtype)
    assert q.shape[-1] == x.shape[-1], (q.shape, x.shape)
    setattr(x, _ATTRIBUTE, (q, scale, group))


def attached(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x's quantization per ``group`` columns as (q [M, K], scale [M, groups]) if a kernel attached one, else None."""
    found = getattr(x, _ATTRIBUTE, None)
    if found is None or found[2] != group:
        return None
    return found[0], found[1]


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """x [M, ...] as [M, K] (a reshape), carrying x's attached quantization along (its q reshaped the same way)."""
    rows = x.reshape(x.shape[0], -1)
    found = getattr(x, _ATTRIBUTE, None)
    if found is not None:
        attach(rows, found[0].reshape(rows.shape), found[1], found[2])
    return rows
