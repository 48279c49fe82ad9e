"""RMSNorm computed in float32 and cast back, matching the reference models bit for bit in fp32 (on the CPU; on
CUDA one Triton kernel computes the same formula, pd.layers.triton_rmsnorm), alone or after the residual add."""

from __future__ import annotations

import torch
from torch import nn

from pd.layers import fused_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., hidden] any float dtype -> same shape and dtype."""
        if fused_kernels.enabled(x):
            from pd.layers.triton_rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, norm(x + delta)); delta None means zero. On CUDA one kernel does both (the decoder layers'
        residual adds, which would otherwise each be a launch of their own)."""
        if delta is None:
            return x, self(x)
        if fused_kernels.enabled(x):
            from pd.layers.triton_rmsnorm import add_rms_norm

            return add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)
