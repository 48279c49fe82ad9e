"""Gated activations used by the MLPs and experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pd.layers import fused_kernels


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [..., 2*I] (gate first, then up) -> silu(gate) * up: [..., I]. With the fused kernels (CUDA), 2-D
    rows go through one Triton launch (pd.layers.triton_activation: torch's formula and rounding, within an ulp or
    two) instead of torch's two and their float intermediate."""
    if gate_up.dim() == 2 and gate_up.stride(1) == 1 and fused_kernels.enabled(gate_up):
        from pd.layers.triton_activation import silu_and_mul_rows

        return silu_and_mul_rows(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
