"""RMSNorm computed in float32 and cast back, matching the reference models bit for bit in fp32 (on the CPU; on
CUDA one Triton kernel computes the same formula, pd.layers.triton_rmsnorm), alone or after the residual add."""

from __future__ import annotations

import torch
from torch import nn

from pd.layers import fused_kernels
from pd.layers.split_k_parts import SplitKParts


class RMSNorm(nn.Module):
    """``quant_group``: set when the norm's output feeds a block-FP8 linear (pd.layers.fp8_rows): on CUDA the
    add-and-norm kernel then also writes decode-sized outputs in e4m3 per group of that many columns."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.quant_group: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., hidden] any float dtype -> same shape and dtype."""
        if fused_kernels.enabled(x):
            from pd.layers.triton_rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_forward(self, x: torch.Tensor,
                    delta: torch.Tensor | SplitKParts | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(x + delta, norm(x + delta)); delta None means zero, a SplitKParts a split-K GEMM's unsummed result
        (pd.layers.split_k_parts: the kernel sums it). On CUDA one kernel does both (the decoder layers' residual
        adds, which would otherwise each be a launch of their own)."""
        if delta is None:
            return x, self(x)
        if isinstance(delta, SplitKParts) and not fused_kernels.enabled(x):
            delta = delta.summed()
        if fused_kernels.enabled(x):
            from pd.layers import fp8_scaled_mm
            from pd.layers.triton_fp8_gemm import SPLIT_K_MAX_ROWS
            from pd.layers.triton_rmsnorm import add_rms_norm

            # only the split-K GEMM (decode-sized rows, PD_FP8_GEMM=auto) reads the attached quantization
            decode_rows = x.dim() == 2 and x.shape[0] <= SPLIT_K_MAX_ROWS
            reads = self.quant_group and decode_rows and fp8_scaled_mm.mode() == "auto"
            group = self.quant_group if reads else None
            return add_rms_norm(x, delta, self.weight, self.eps, group)
        x = x + delta
        return x, self(x)
