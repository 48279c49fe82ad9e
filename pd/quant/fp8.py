"""Block-wise FP8 weights in DeepSeek-V3's checkpoint format, and the reference linear that dequantizes them.

A weight W [N, K] is stored as ``weight`` float8_e4m3fn [N, K] plus ``weight_scale_inv`` float32
[ceil(N / bn), ceil(K / bk)] for a block of (bn, bk) = ``weight_block_size``:
W[n, k] = weight[n, k] * weight_scale_inv[n // bn, k // bk]. Edge blocks may be partial.

The reference path (CPU, and the oracle of any FP8 kernel) dequantizes to the compute dtype, in float32 then one
rounding: the result equals, bit for bit, a model loaded from the dequantized weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pd.layers import fused_kernels
from pd.layers.cpu_packed import mkldnn_packable, pack_weight, packed_linear, tensor_stamp
from pd.layers.split_k_parts import SplitKParts

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
DEFAULT_BLOCK = (128, 128)


class Fp8LayoutError(ValueError):
    """A shard boundary (tensor or expert parallelism) falls inside an FP8 scale block."""


@dataclass(frozen=True)
class Fp8Config:
    """``quantization_config`` of an FP8 checkpoint (or of ``--quantization fp8``).

    block: (bn, bk) rows x columns sharing one scale.
    modules_to_not_convert: module names (or dotted suffixes / infixes of them) kept in the compute dtype.
    """

    block: tuple[int, int] = DEFAULT_BLOCK
    modules_to_not_convert: tuple[str, ...] = ()

    def skips(self, module_name: str) -> bool:
        """Whether ``module_name`` stays unquantized: an entry equals a run of its dotted components."""
        parts = module_name.split(".")
        for entry in self.modules_to_not_convert:
            key = entry.split(".")
            if any(parts[i : i + len(key)] == key for i in range(len(parts) - len(key) + 1)):
                return True
        return False


def scale_shape(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the scales of a [rows, cols] weight."""
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def expand_scales(scale: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """scale [..., ceil(rows/bn), ceil(cols/bk)] -> [..., rows, cols], each scale repeated over its block."""
    full = scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return full[..., :rows, :cols]


def block_dequant(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """weight [..., N, K] float8_e4m3fn, scale_inv [..., ceil(N/bn), ceil(K/bk)] float32 -> [..., N, K] ``dtype``
    (the product in float32, rounded once)."""
    rows, cols = weight.shape[-2:]
    assert scale_inv.shape[-2:] == scale_shape(rows, cols, block), (tuple(scale_inv.shape), tuple(weight.shape))
    return (weight.float() * expand_scales(scale_inv.float(), block, rows, cols)).to(dtype)


def block_quant(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (any float dtype) -> (float8_e4m3fn [N, K], scale_inv float32 [ceil(N/bn), ceil(K/bk)]).

    Each block's largest magnitude maps to e4m3's largest finite value (448); an all-zero block gets scale 1.
    """
    rows, cols = weight.shape
    nb, kb = scale_shape(rows, cols, block)
    w = weight.float()
    padded = F.pad(w, (0, kb * block[1] - cols, 0, nb * block[0] - rows))
    amax = padded.view(nb, block[0], kb, block[1]).abs().amax(dim=(1, 3))
    # Divided by a tensor, not the Python float: CUDA divides by a scalar as a multiply by its reciprocal, an ulp
    # off the CPU's quotient at times, and FP8 checkpoints written on the CPU must load to the same bits.
    scale_inv = torch.where(amax > 0, amax / amax.new_full((), FP8_MAX), torch.ones_like(amax))
    q = (w / expand_scales(scale_inv, block, rows, cols)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv


def token_group_quant(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of the FP8 kernels' activation quantization: x [..., K] (any float dtype) ->
    (float8_e4m3fn [..., K], scale float32 [..., ceil(K / group)]). Per row and group of ``group`` columns (the
    last may be partial) scale = max(amax, 1e-10) / 448 and q = clamp(x / scale, -448, 448) rounded to nearest,
    so q * scale is x within e4m3's rounding (SGLang's per_token_group_quant_fp8)."""
    cols = x.shape[-1]
    groups = math.ceil(cols / group)
    padded = F.pad(x.float(), (0, groups * group - cols)).unflatten(-1, (groups, group))
    scale = padded.abs().amax(dim=-1).clamp_min(1e-10) / FP8_MAX
    q = (padded / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2)[..., :cols], scale


def scale_range(start: int, length: int, total: int, block: int, what: str) -> tuple[int, int]:
    """The scale rows (or columns) ``(start, length)`` of the weight slice [start, start + length) of ``total``.

    Raises:
        Fp8LayoutError: the slice starts inside a block, or ends inside one before the end of the tensor.
    """
    end = start + length
    if start % block or (end % block and end != total):
        raise Fp8LayoutError(
            f"{what}: the shard [{start}, {end}) of {total} cuts the FP8 scale blocks of {block}; choose a "
            f"parallel size whose shards are multiples of {block}"
        )
    first = start // block
    return first, math.ceil(end / block) - first


class Fp8Linear(nn.Module):
    """A bias-optional linear whose weight is block-FP8: ``weight`` float8_e4m3fn [out, in] and
    ``weight_scale_inv`` float32 [ceil(out/bn), ceil(in/bk)] (checkpoint names, so they load 1:1); ``bias`` in
    the compute dtype.

    On CUDA forward runs the W8A8 block-FP8 GEMM (pd.layers.triton_fp8_gemm: activations quantized per token and
    group of bk columns, fp8 products, float32 accumulation), which differs from the dequantized reference by the
    activations' e4m3 rounding. Elsewhere forward is the reference path: on CPU, where every linear computes with a
    oneDNN-packed copy of its weight (pd.layers.cpu_packed), it packs the dequantized weight once (rebuilt if the
    FP8 tensors change) and equals a PackedLinear of the dequantized weight bit for bit; the FP8 tensors stay the
    parameters. On other devices, and with autograd recording, it dequantizes on every call and runs F.linear."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, block: tuple[int, int], dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.in_features, self.out_features, self.block, self.dtype = in_features, out_features, block, dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)  # fmt: skip
        scales = scale_shape(out_features, in_features, block)
        self.weight_scale_inv = nn.Parameter(torch.empty(scales, dtype=torch.float32, device=device),
                                             requires_grad=False)  # fmt: skip
        self.bias: nn.Parameter | None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._packed: torch.Tensor | None = None
        self._stamp: tuple[object, ...] | None = None

    @classmethod
    def like(cls, linear: nn.Linear, block: tuple[int, int]) -> Fp8Linear:
        """An empty Fp8Linear of ``linear``'s shape, device and compute dtype (its bias parameter is reused)."""
        new = cls(linear.in_features, linear.out_features, False, block, linear.weight.dtype, linear.weight.device)
        new.bias = linear.bias
        return new

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[out, in] in ``dtype`` (default: the compute dtype), a fresh tensor."""
        return block_dequant(self.weight, self.weight_scale_inv, self.block, dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out], x's dtype."""
        grad = torch.is_grad_enabled() and x.requires_grad
        if fused_kernels.enabled(x) and not grad:
            from pd.layers.triton_fp8_gemm import w8a8_block_linear

            return w8a8_block_linear(x, self.weight, self.weight_scale_inv, self.block, self.bias)
        if grad or not mkldnn_packable(x.dtype, x.device):
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        stamp = (tensor_stamp(self.weight), tensor_stamp(self.weight_scale_inv), x.dtype)
        if self._packed is None or self._stamp != stamp:
            self._packed, self._stamp = pack_weight(self.dequantized_weight(x.dtype)), stamp
        return packed_linear(x, self._packed, self.bias)

    def forward_unsummed(self, x: torch.Tensor) -> torch.Tensor | SplitKParts:
        """forward, except that a decode-sized x on the fused kernels may come back as the split-K GEMM's unsummed
        partials (pd.layers.split_k_parts), for a consumer that sums them itself."""
        if fused_kernels.enabled(x) and not (torch.is_grad_enabled() and x.requires_grad):
            from pd.layers.triton_fp8_gemm import w8a8_block_linear

            return w8a8_block_linear(x, self.weight, self.weight_scale_inv, self.block, self.bias, defer_sums=True)
        return self(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """A linear's weight [out, in] in its compute dtype, dequantized when it is an Fp8Linear."""
    if isinstance(linear, Fp8Linear):
        return linear.dequantized_weight()
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)
    return weight
