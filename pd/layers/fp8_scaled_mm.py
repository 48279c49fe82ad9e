"""Block-FP8 GEMMs through cuBLAS: torch's block-scaled ``scaled_mm`` (1x128 activation groups x 128x128 weight
blocks, DeepSeek-V3's recipe), which cuBLAS 12.9+ runs on Hopper (SM 9.0).

At prefill sizes it is about twice the Triton kernel's speed (pd.layers.triton_fp8_gemm: its per-k-step scale
multiply keeps the tensor cores waiting); at decode sizes the Triton kernel's narrow tiles stream the weight
better. ``use_cublas`` picks by row count; the measurements are in benchmarks/bench_fp8_gemm.py's output.

Layouts cuBLAS wants (PyTorch's test_scaled_mm_block_wise_numerics):
- A [M, K] e4m3, M a multiple of 4; its scales [M, K/128] float32 with strides (1, M) (column-major);
- B = weight.t() ([K, N], column-major); its scales [K/128, ceil(N/128)] with strides (1, K/128): the weight's
  [ceil(N/128), K/128] scales transposed. K a multiple of 512: torch 2.11 infers the recipe from the scales' shapes
  and refuses weight scales whose K/128 is not a multiple of 4 (every DeepSeek-V3 and Qwen3 linear has K % 512 == 0;
  the others stay on the Triton kernel).

``PD_FP8_GEMM=triton`` keeps every block-FP8 GEMM on the Triton quantize-then-GEMM kernels; ``cublas`` uses cuBLAS
at every row count (where it is available); the default, ``auto``, from CUBLAS_MIN_ROWS rows, with decode-sized
rows on the split-K Triton kernel (pd.layers.triton_fp8_gemm.w8a8_block_linear). Whether cuBLAS runs the recipe is
probed once per device on small random operands against the dequantized product; a failure is logged once and
the Triton kernel serves.
"""

from __future__ import annotations

import logging

import torch

from pd.env_choice import env_choice

logger = logging.getLogger(__name__)

# From this many rows (tokens) up, cuBLAS's block-scaled GEMM is faster than the Triton kernel: at 64 rows on an H100 it
# was as fast or faster on all eight DeepSeek-V3 and Qwen3 projection shapes of benchmarks/bench_fp8_gemm.py.
CUBLAS_MIN_ROWS = 64
_BLOCK = (128, 128)
_available: dict[int, bool] = {}


def mode() -> str:
    return env_choice("PD_FP8_GEMM", "auto", ("auto", "triton", "cublas"))


def use_cublas(rows: int, weight: torch.Tensor, block: tuple[int, int], out_dtype: torch.dtype) -> bool:
    """Whether a [rows, K] x weight [N, K] block-FP8 GEMM goes to cuBLAS."""
    if weight.device.type != "cuda" or tuple(block) != _BLOCK or out_dtype != torch.bfloat16:
        return False
    n, k = weight.shape
    if k % (4 * _BLOCK[1]) or n % 16 or not weight.is_contiguous():
        return False
    choice = mode()
    if choice == "triton" or (choice == "auto" and rows < CUBLAS_MIN_ROWS):
        return False
    return available(weight.device)


def available(device: torch.device) -> bool:
    """Whether this device's cuBLAS runs the 1x128 x 128x128 recipe correctly (probed once per device; never
    during a CUDA-graph capture, where the probe's own ops would be recorded: the Triton kernel serves there)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _available:
        if torch.cuda.is_current_stream_capturing():
            return False
        _available[index] = _probe(torch.device("cuda", index))
    return _available[index]


def block_scaled_mm(a_q: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """C = dequant(a_q) @ dequant(weight).T (+ bias) by cuBLAS. Asynchronous.

    Args:
        a_q: [M, K] float8_e4m3fn, M a multiple of 4 (pd.layers.triton_fp8_gemm.token_group_quant_for_cublas).
        a_scale: [M, K / 128] float32, strides (1, M).
        weight: [N, K] float8_e4m3fn, contiguous; weight_scale: [ceil(N / 128), K / 128] float32 (checkpoint layout).
        out_dtype: bfloat16.
        bias: [N] or None.

    Returns:
        [M, N] out_dtype.
    """
    assert weight_scale.shape[1] % 4 == 0 and weight_scale.is_contiguous(), weight_scale.shape
    out = torch._scaled_mm(a_q, weight.t(), scale_a=a_scale, scale_b=weight_scale.t(), out_dtype=out_dtype)
    return out if bias is None else out.add_(bias)


def _probe(device: torch.device) -> bool:
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    from pd.layers.triton_fp8_gemm import token_group_quant_for_cublas

    gen = torch.Generator(device).manual_seed(0)
    try:
        # M = 6: the rows' padding to 8; N = 320: a partial last weight block.
        for m, n, k in ((256, 384, 512), (6, 320, 1024)):
            x = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16)
            w_q = (torch.randn(n, k, device=device, generator=gen) * 32).to(torch.float8_e4m3fn)
            w_s = torch.rand(-(-n // 128), k // 128, device=device, generator=gen) / 32 / k**0.5
            # pd.quant.fp8.block_dequant's product, written out: pd.quant imports this package, not the reverse
            w = w_q.float() * w_s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
            a_q, a_s = token_group_quant_for_cublas(x, _BLOCK[1])
            got = block_scaled_mm(a_q, a_s, w_q, w_s, torch.bfloat16)[:m].float()
            want = x.float() @ w.t()
            err = float((got - want).norm() / want.norm())
            if not err < 0.05:  # the activations' e4m3 rounding alone is ~0.03
                raise RuntimeError(f"relative error {err:.3g} against the dequantized product at {(m, n, k)}")
    except Exception as e:  # noqa: BLE001 (any failure means: not this device's path)
        logger.warning("cuBLAS block-scaled FP8 GEMM unavailable on %s (%s: %s); block-FP8 linears use the Triton "
                       "kernel at every size", torch.cuda.get_device_name(device), type(e).__name__, e)  # fmt: skip
        return False
    logger.info("block-FP8 linears of %d+ rows use cuBLAS's block-scaled GEMM on %s", CUBLAS_MIN_ROWS,
                torch.cuda.get_device_name(device))  # fmt: skip
    return True
