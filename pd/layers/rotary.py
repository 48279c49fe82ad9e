"""Rotary position embedding with a per-position cos/sin table (default, linear, llama3 and YaRN scaling).

The table is computed the way the reference models compute it on the fly (float32 positions times float32
inverse frequencies), so looking it up gives the same numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pd.layers import fused_kernels
from pd.layers.norm import RMSNorm

KVStore = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # v, K buffer, V buffer, slots



def _yarn_inv_freq(dim: int, base: float, params: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings") or max_position
    if factor is None:
        factor = max_position / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp below would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, float(attention_factor)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low_freq_factor, old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(dim: int, params: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] float32 and the cos/sin scaling for the config's rope type."""
    base = float(params["rope_theta"])
    rope_type = params.get("rope_type", "default")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / params["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, base, params, max_position)
    raise ValueError(f"rope type {rope_type!r} is not supported (supported: default, linear, llama3, yarn)")


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q and k at given positions.

    interleaved=False rotates the halves (x[:d/2], x[d/2:]) (Llama/Qwen/Mixtral); interleaved=True rotates
    adjacent pairs (x[2i], x[2i+1]) (DeepSeek).
    """

    def __init__(self, dim: int, params: dict[str, Any], max_position: int, interleaved: bool = False) -> None:
        super().__init__()
        inv_freq, self.scaling = rope_inv_freq(dim, params, max_position)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleaved = interleaved
        self.max_position = max_position
        self._table: torch.Tensor | None = None  # [max_position, 2, dim/2] float32: cos, sin

    def _table_on(self, device: torch.device) -> torch.Tensor:
        # Built once per device for every position the model accepts, so lookups never sync with the host.
        if self._table is None or self._table.device != device:
            pos = torch.arange(self.max_position, device=device, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq.to(device, torch.float32)[None, :]
            self._table = torch.stack((freqs.cos() * self.scaling, freqs.sin() * self.scaling), dim=1)
        return self._table

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cs = self._table_on(positions.device)[positions]
        return cs[:, 0], cs[:, 1]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, dim]; cos/sin: [T, 1, dim/2] in x's dtype
        if self.interleaved:
            x0, x1 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
        x0, x1 = x.chunk(2, dim=-1)
        return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None, kv_store: KVStore | None = None, inplace: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """positions [T] int64; q [T, Hq, dim], k [T, Hk, dim] -> rotated q, k (same shapes and dtypes).
        q_norm, k_norm: per-head RMSNorms applied first (Qwen3), both or neither.
        kv_store: (v, the layer's K and V cache buffers, the new tokens' slots): where the Triton kernel runs, it
        writes the rotated K and V into the cache itself and returns None for k; elsewhere it is ignored and the
        caller stores the k returned. inplace: q and k (views allowed) are overwritten and returned."""
        assert (q_norm is None) == (k_norm is None), "q_norm and k_norm go together"
        if fused_kernels.enabled(q):  # one kernel for both, norms and the KV store included (pd.layers.triton_rotary)
            from pd.layers.triton_rotary import apply_rotary

            norms = None if q_norm is None or k_norm is None else (q_norm.weight, q_norm.eps, k_norm.weight, k_norm.eps)
            return apply_rotary(positions, q, k, self._table_on(q.device), self.interleaved, norms, kv_store, inplace)
        q_in, k_in = q, k
        if q_norm is not None and k_norm is not None:
            q, k = q_norm(q), k_norm(k)
        cos, sin = self._cos_sin(positions)
        cos, sin = cos[:, None, :].to(q.dtype), sin[:, None, :].to(q.dtype)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if inplace:
            return q_in.copy_(q), k_in.copy_(k)
        return q, k
