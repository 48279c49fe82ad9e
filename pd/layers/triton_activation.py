"""Gated activations as Triton kernels: act(gate) * up with torch's rounding (act rounded to the model dtype, then
the product), shared by the dense MLP (``silu_and_mul_rows``) and the fused-MoE runner's act kernels (``act_mul``).
The activation itself is computed in float32 as ``gate / (1 + exp(-gate))`` (or exact GELU): torch's formula, its
exp within a few float32 ulps of torch's for float32 models (``exp_f32``) and Triton's faster exp for 16-bit ones,
so a result may differ from torch's by an ulp or two of the model dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pd.layers.triton_fp8_gemm import TL_DTYPES

_BLOCK_COLS = 1024  # columns per program


@triton.jit
def exp_f32(x):
    """exp(x) of float32 x within a few ulps over the whole range. Not ``tl.exp``: on the GPU that is the hardware's
    approximate 2^(x * log2 e), whose product's rounding error grows with |x| (up to ~|x| / 4 ulps: float32 silu at gate
    = -20 then misses torch's by more than 8 ulps, measured on an H200). Here x = n ln2 + r with |r| <= ln2 / 2
    (Cody-Waite, ln2 split so n * LN2_HI is exact), the approximate 2^ only meets |r * log2 e| <= 1/2, and 2^n is built
    from its exponent bits in two halves (n reaches -150 and 129, beyond one float's exponent), so overflow gives inf as
    torch's does; a denormal result is only a denormal or 0 (the GPU rounds them its own way)."""
    # exp(-104) rounds to 0 and exp(89) to inf, as beyond them; NaN stays NaN
    x = tl.minimum(tl.maximum(x, -104.0, propagate_nan=tl.PropagateNan.ALL), 89.0, propagate_nan=tl.PropagateNan.ALL)
    n = tl.floor(x * 1.4426950408889634 + 0.5)
    r = x - n * 0.693359375  # LN2_HI: 9 significant bits, so the product is exact for |n| <= 150
    r = r + n * 2.12194440e-4  # LN2_HI - ln 2
    half = tl.floor(n * 0.5)
    scale_a = ((half.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    scale_b = (((n - half).to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.exp2(r * 1.4426950408889634) * scale_a * scale_b


@triton.jit
def act_mul(gate, up, ACTIVATION: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """act(gate) * up from float32 gate and up, in the model dtype."""
    if ACTIVATION == "silu" and OUT_DTYPE == tl.float32:
        act = gate / (1.0 + exp_f32(-gate))
    elif ACTIVATION == "silu":
        # 16-bit results: tl.exp's error (< 2^-18 relative for |gate| < 64) is far below their ulp (2^-8 or 2^-11),
        # and it costs fewer instructions than exp_f32 (~6 us per FP8 decode step on an H200)
        act = gate / (1.0 + tl.exp(-gate))
    else:  # exact (erf) GELU, F.gelu's default
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    # Rounded to the model dtype before the product, as torch's act(gate) is, then the product rounded.
    return (act.to(OUT_DTYPE).to(tl.float32) * up).to(OUT_DTYPE)


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, inter, stride_g, stride_o, ACTIVATION: tl.constexpr,
                         OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < inter
    gate = tl.load(gate_up_ptr + row * stride_g + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_g + inter + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, act_mul(gate, up, ACTIVATION, OUT_DTYPE), mask=inside)


def silu_and_mul_rows(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * I] float32/bfloat16/float16, unit stride along columns -> silu(gate) * up [T, I], new and
    contiguous, in one launch. Asynchronous, no host sync."""
    rows, width = gate_up.shape
    assert width % 2 == 0 and gate_up.stride(1) == 1 and gate_up.dtype in TL_DTYPES, (gate_up.shape, gate_up.dtype)
    inter = width // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows and inter:
        block = min(_BLOCK_COLS, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
            gate_up, out, inter, gate_up.stride(0), out.stride(0), ACTIVATION="silu",
            OUT_DTYPE=TL_DTYPES[gate_up.dtype], BLOCK=block,
            num_warps=4 if block >= 512 else 1,
        )  # fmt: skip
    return out
