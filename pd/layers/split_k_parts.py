"""A split-K GEMM's result before its splits are summed, handed to the one kernel that consumes it.

The block-FP8 split-K GEMM (pd.layers.triton_fp8_gemm.w8a8_split_k_linear) writes one float32 partial sum per split
of K and sums them in a second small launch. After a decoder layer's o_proj the only reader of the result is the
post-attention add-and-RMSNorm, which can sum the partials itself as it loads them (pd.layers.triton_rmsnorm,
the same order and rounding, so the same bits): one launch fewer per layer at decode sizes. A SplitKParts is not a
tensor, so code that does not know it fails loudly instead of reading an unsummed result; ``summed()`` is the
two-launch result for any such reader.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SplitKParts:
    """part: [splits, M, N] float32 partial sums in split order; bias: [N] or None (added after the partials);
    dtype: the result's dtype (the sum rounds once to it)."""

    part: torch.Tensor
    bias: torch.Tensor | None
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.part.shape[1:]

    def summed(self) -> torch.Tensor:
        """The result as the split-K GEMM's own sums launch gives it: [M, N] in dtype."""
        from pd.layers.triton_fp8_gemm import sum_splits

        return sum_splits(self.part, self.bias, self.dtype)
