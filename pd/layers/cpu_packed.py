"""oneDNN pre-packed linear layers for CPU inference.

On CPU, ``F.linear`` with a plain [N, K] weight runs the small-M GEMMs of decode (a few rows against a large
weight) well below the machine's memory bandwidth: MKL re-lays out the weight on every call. oneDNN can
reorder the weight once into its blocked layout (``mkldnn._reorder_linear_weight``) and then stream it at
close to memory speed (``mkldnn._linear_pointwise``), about 2-3x faster for decode-sized inputs. The result
differs from ``F.linear`` only by float rounding (different summation order), ~1e-6 relative in float32.

oneDNN packs float32 always and bfloat16 where the CPU supports it; float16 needs AVX-512 FP16 and is left
on the plain path. Packed weights have no autograd, so everything here is inference-only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The batch size oneDNN is told to expect when it picks the weight layout. Any value >= 2 gives the same
# layout on AVX-512 machines; 1 selects a GEMV layout that makes every multi-row call reorder again.
DEFAULT_BATCH_SIZE_HINT = 16


def mkldnn_packable(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether oneDNN can pre-pack a linear weight of ``dtype`` on ``device`` (CPU only)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def pack_weight(weight_NK: torch.Tensor, batch_size_hint: int = DEFAULT_BATCH_SIZE_HINT) -> torch.Tensor:
    """Reorder a linear weight [N, K] (float32/bfloat16, CPU) into an opaque oneDNN tensor for packed_linear."""
    return torch.ops.mkldnn._reorder_linear_weight(weight_NK.detach(), batch_size_hint)


def packed_linear(x_MK: torch.Tensor, packed: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias [N]) -> [..., N] in x's dtype, with W packed by ``pack_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x_MK, packed, bias_N, "none", [], "")


def tensor_stamp(t: torch.Tensor) -> tuple[int, int]:
    """(storage address, version counter) of ``t``: changes when ``t`` is replaced or modified in place, so a
    packed copy can tell that it went stale. Inference tensors keep no version counter (-1)."""
    return t.data_ptr(), (-1 if t.is_inference() else t._version)


class PackedLinear(nn.Linear):
    """Drop-in nn.Linear for CPU inference that computes with a oneDNN-packed copy of its weight.

    ``weight`` and ``bias`` stay ordinary parameters (same names, same tensors), so loading, ``state_dict``
    and reading the weight are unchanged. The packed copy is not a parameter or buffer; it is rebuilt if the
    weight is modified in place or replaced. With autograd recording, forward falls back to ``F.linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, batch_size_hint: int = DEFAULT_BATCH_SIZE_HINT) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.batch_size_hint = batch_size_hint
        self._packed: torch.Tensor | None = None
        self._stamp: tuple[int, int] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, batch_size_hint: int = DEFAULT_BATCH_SIZE_HINT) -> PackedLinear:
        """A PackedLinear sharing ``linear``'s weight and bias parameters (no copy), already packed.

        Raises:
            ValueError: the weight's dtype/device cannot be packed (see mkldnn_packable).
        """
        if not mkldnn_packable(linear.weight.dtype, linear.weight.device):
            raise ValueError(f"oneDNN cannot pack a {linear.weight.dtype} weight on {linear.weight.device}")
        # Built on the meta device (no allocation), then pointed at the existing parameters.
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  dtype=linear.weight.dtype, batch_size_hint=batch_size_hint)
        new.weight = linear.weight
        new.bias = linear.bias
        new.repack()
        return new

    def repack(self) -> None:
        """Rebuild the packed copy from the current weight."""
        self._packed = pack_weight(self.weight, self.batch_size_hint)
        self._stamp = tensor_stamp(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features], x's dtype."""
        if torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if self._packed is None or self._stamp != tensor_stamp(self.weight):
            self.repack()
        assert self._packed is not None
        return packed_linear(x, self._packed, self.bias)


def pack_linears_for_cpu(model: nn.Module, batch_size_hint: int = DEFAULT_BATCH_SIZE_HINT) -> int:
    """Swap every nn.Linear of a loaded ``model`` whose weight oneDNN can pack for a PackedLinear, in place.

    Call once after the weights are loaded. Linears on other devices or in other dtypes are left as they are, and so
    are quantized linears (pd.quant.fp8.Fp8Linear is no nn.Linear; it packs its dequantized weight itself).

    Returns:
        The number of layers swapped.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:  # exact type: subclasses (and PackedLinear itself) keep their forward
                continue
            if mkldnn_packable(child.weight.dtype, child.weight.device):
                setattr(parent, name, PackedLinear.from_linear(child, batch_size_hint))
                swapped += 1
    return swapped
