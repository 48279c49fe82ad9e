"""The W8A8 block-FP8 kernels (pd.layers.triton_fp8_gemm) against pure-torch oracles on fresh random inputs.

Two oracles:
- the kernels' own arithmetic in torch: pd.quant.fp8.token_group_quant (bit for bit), and the float32 product of
  the dequantized activations and weights (equal up to float32 summation order);
- the dequantized model (pd.quant.fp8.Fp8Linear's reference path, F.linear of the dequantized weight), which the
  W8A8 path differs from by the activations' e4m3 rounding: relative L2 error below W8A8_TOLERANCE per layer.

CPU (CI): Triton's interpreter in a child process (tests/interpreter_child.py), small shapes whose M, N and K
are off every block, zero rows, all-zero activation groups, bias, float32/bfloat16/float16 outputs.
GPU (``pytest.mark.gpu``): DeepSeek-V3 and Qwen3-30B-A3B linear shapes at decode and prefill sizes, Fp8Linear on
CUDA, and CUDA-graph replay.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F

from pd.quant.fp8 import FP8_DTYPE, Fp8Linear, block_dequant, block_quant, token_group_quant
from tests.interpreter_child import InterpreterChild

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed (the test extra installs it)")  # fmt: skip

# Relative L2 error of the W8A8 path against the dequantized (bf16 / float32) layer: e4m3 keeps 3 mantissa bits, so
# each activation is off by up to 2^-4 of itself (about 3.6% RMS); over a dot product that averages to 2.5-3%.
W8A8_TOLERANCE = 0.04
# Small blocks keep the interpreter fast; the kernel's k-step is the scale group (16 or 32 columns here).
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 2, "num_warps": 4,
         "num_stages": 2}  # fmt: skip


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def emulated_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                  block: tuple[int, int]) -> torch.Tensor:  # fmt: skip
    """The W8A8 product in float32: dequantized activations (per row and group) times dequantized weights."""
    a = block_dequant(a_q, a_scale, (1, block[1]), torch.float32)
    return a @ block_dequant(w_q, w_scale, block, torch.float32).T


def make_weight(n: int, k: int, block: tuple[int, int], gen: torch.Generator, device: str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A random [n, k] weight quantized as the loader does (pd.quant.fp8.block_quant), with blocks of very different
    magnitudes so a scale read from the wrong block shows."""
    w = torch.randn(n, k, generator=gen, device=device) / k**0.5
    w *= torch.rand(n // block[0] + 1, k // block[1] + 1, generator=gen, device=device).add_(0.1).repeat_interleave(
        block[0], 0).repeat_interleave(block[1], 1)[:n, :k] * 4  # fmt: skip
    return block_quant(w, block)


# ---- checks run in the interpreter child ----


def check_token_group_quant(seed: int) -> None:
    """The quantization kernel equals the torch reference bit for bit: 2-D rows (M off the 16-row block, K off the
    group, all-zero and huge rows), also in cuBLAS's layout, and 3-D rows with per-expert counts (only the rows
    below a count)."""
    from pd.layers.triton_fp8_gemm import token_group_quant as kernel
    from pd.layers.triton_fp8_gemm import token_group_quant_for_cublas

    gen = torch.Generator().manual_seed(seed)
    for (rows, cols, group), dtype in itertools.product(((1, 16, 16), (5, 40, 16), (33, 100, 32), (0, 48, 16)),
                                                         (torch.float32, torch.bfloat16, torch.float16)):  # fmt: skip
        x = (torch.randn(rows, cols, generator=gen) * 10.0 ** torch.randint(-3, 3, (rows, 1), generator=gen)).to(dtype)
        if rows > 2:
            x[1] = 0
            x[2, : group // 2] = 3e4  # a group near float16's top
        q, scale = kernel(x, group)
        q_ref, scale_ref = token_group_quant(x, group)
        where = f"{rows}x{cols} group {group} {dtype}"
        assert q.dtype == FP8_DTYPE and scale.shape == (rows, -(-cols // group)), where
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), where
        assert torch.equal(scale, scale_ref), where
        if rows:  # cuBLAS's layout: rows padded to a multiple of 4, scales column-major; the same values
            q4, scale4 = token_group_quant_for_cublas(x, group)
            padded = -(-rows // 4) * 4
            assert q4.shape == (padded, cols) and scale4.shape == (padded, -(-cols // group)), where
            assert scale4.stride() == (1, padded), (where, scale4.stride())
            assert torch.equal(q4[:rows].view(torch.uint8), q_ref.view(torch.uint8)), where
            assert torch.equal(scale4[:rows], scale_ref), where
    x = torch.randn(4, 19, 40, generator=gen).to(torch.bfloat16)
    counts = torch.tensor([0, 19, 7, 30], dtype=torch.int32)  # a count past the rows is clamped to them
    x[2, 7:] = float("nan")  # past a count: never read
    q, scale = kernel(x, 16, counts)
    for e, n in enumerate(counts.clamp(max=19).tolist()):
        q_ref, scale_ref = token_group_quant(x[e, :n], 16)
        assert torch.equal(q[e, :n].view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale[e, :n], scale_ref)


GEMM_CASES = [
    # m, n, k, block, out dtype, bias
    (1, 32, 64, (16, 16), "float32", False),
    (7, 40, 48, (16, 16), "bfloat16", True),  # N off the column block, one partial weight block row
    (33, 96, 100, (32, 32), "float32", True),  # M off the row block, K off the group: a partial last group
    (20, 130, 96, (16, 32), "float16", False),  # rectangular blocks, N with a partial block
    (0, 40, 48, (16, 16), "bfloat16", True),  # no rows
    (64, 200, 512, (32, 32), "float32", True),  # the split-K kernel's largest row count, 16 k-steps
    (5, 130, 96, (64, 32), "bfloat16", True),  # column blocks inside one scale row (both kernels), a partial one
]


def check_gemm(seed: int) -> None:
    """w8a8_block_gemm, and for decode-sized rows the split-K kernel with its activations quantized inside or
    before (one split, a split per few k-steps, the default count), against the float32 product of the dequantized
    operands (tight), and the linear against the dequantized model (W8A8_TOLERANCE); the default block sizes too."""
    from pd.layers.triton_fp8_gemm import split_k_fits, w8a8_block_gemm, w8a8_block_linear, w8a8_split_k_linear
    from pd.layers.triton_fp8_gemm import token_group_quant as quant_kernel

    gen = torch.Generator().manual_seed(seed)
    for m, n, k, block, out_name, with_bias in GEMM_CASES:
        out_dtype = getattr(torch, out_name)
        w_q, w_scale = make_weight(n, k, block, gen)
        x = torch.randn(m, k, generator=gen).to(out_dtype)
        bias = torch.randn(n, generator=gen).to(out_dtype) if with_bias else None
        a_q, a_scale = quant_kernel(x, block[1])
        where = f"{m}x{n}x{k} block {block} {out_name}"
        expected = emulated_gemm(a_q, a_scale, w_q, w_scale, block) + (0 if bias is None else bias.float())
        for config in (SMALL, None):
            got = w8a8_block_gemm(a_q, a_scale, w_q, w_scale, block, out_dtype, bias, config)
            assert got.shape == (m, n) and got.dtype == out_dtype, where
            # float32: summation order only; otherwise one rounding of the same float32 sum
            tol = {"float32": 1e-5, "bfloat16": 8e-3, "float16": 1e-3}[out_name]
            scale = expected.abs().amax().item() if m else 1.0
            torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * scale,
                                       msg=lambda msg: f"{where}: {msg}")  # noqa: B023
        # splits x where the activations are quantized (inside the GEMM, or by token_group_quant before it)
        for splits, before in ((1, False), (3, True), (None, False), (None, True)) if split_k_fits(m, block) else ():
            got = w8a8_split_k_linear(x, w_q, w_scale, block, bias, splits, before)
            assert got.shape == (m, n) and got.dtype == out_dtype, where
            torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * scale,
                                       msg=lambda msg: f"{where} {splits} splits, before {before}: {msg}")  # noqa: B023
        got = w8a8_block_linear(x.view(1, m, k), w_q, w_scale, block, bias)
        assert got.shape == (1, m, n) and got.dtype == out_dtype, where
        reference = F.linear(x.float(), block_dequant(w_q, w_scale, block, torch.float32),
                             None if bias is None else bias.float())  # fmt: skip
        if m:  # K of 48-100 averages fewer roundings than real layers: a looser bound
            assert rel_l2(got[0], reference) < 2 * W8A8_TOLERANCE, (where, rel_l2(got[0], reference))


# ---- CPU tests (CI) ----


@needs_triton
def test_token_group_quant_kernel_equals_torch_reference_bit_for_bit_in_interpreter(
        interpreter: InterpreterChild) -> None:  # fmt: skip
    interpreter.run(__name__, "check_token_group_quant", int(torch.randint(0, 2**31, ()).item()))


@needs_triton
def test_w8a8_block_gemm_matches_dequantized_operands_and_model_in_interpreter(interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_gemm", int(torch.randint(0, 2**31, ()).item()))


def test_token_group_quant_reference_dequantizes_within_e4m3_rounding() -> None:
    """The torch reference itself: each group's max maps to 448 and every value comes back within e4m3's relative
    step (2^-4 of itself for normal values, the subnormal step below)."""
    x = torch.randn(9, 70) * 10.0 ** torch.randint(-4, 4, (9, 1))
    x[4] = 0
    q, scale = token_group_quant(x, 32)
    assert q.shape == x.shape and scale.shape == (9, 3)
    assert not q[4].float().any() and torch.equal(scale[4], torch.full((3,), 1e-10 / 448))
    back = block_dequant(q, scale, (1, 32), torch.float32)
    step = torch.maximum(x.abs() * 2**-4, scale.repeat_interleave(32, 1)[:, :70] * 2**-9)
    assert ((back - x).abs() <= step).all()
    q_max = F.pad(q.float().abs(), (0, 26)).view(9, 3, 32).amax(-1)
    assert torch.equal(q_max[4], torch.zeros(3)) and torch.equal(q_max[q_max > 0], torch.full((8 * 3,), 448.0))


def test_cublas_dispatch_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which block-FP8 GEMMs may go to cuBLAS, decided without a GPU: never off CUDA, a bad PD_FP8_GEMM names the
    choices, and PD_FP8_GEMM=triton keeps every size on the Triton kernel."""
    from pd.layers import fp8_scaled_mm

    weight = torch.empty(256, 1024, dtype=FP8_DTYPE)
    assert not fp8_scaled_mm.use_cublas(4096, weight, (128, 128), torch.bfloat16)  # a CPU weight
    monkeypatch.setenv("PD_FP8_GEMM", "fast")
    with pytest.raises(ValueError, match="auto, triton or cublas"):
        fp8_scaled_mm.mode()
    monkeypatch.setenv("PD_FP8_GEMM", "triton")
    assert fp8_scaled_mm.mode() == "triton"

    class _Cuda:  # the checks before the device is asked: a weight that claims to live on CUDA
        device = torch.device("cuda", 0)
        shape = (256, 1024)

        def is_contiguous(self) -> bool:
            return True

    assert not fp8_scaled_mm.use_cublas(4096, _Cuda(), (128, 128), torch.bfloat16)  # type: ignore[arg-type]
    monkeypatch.setenv("PD_FP8_GEMM", "auto")
    assert not fp8_scaled_mm.use_cublas(fp8_scaled_mm.CUBLAS_MIN_ROWS - 1, _Cuda(), (128, 128), torch.bfloat16)  # type: ignore[arg-type]
    assert not fp8_scaled_mm.use_cublas(4096, _Cuda(), (64, 64), torch.bfloat16)  # type: ignore[arg-type]
    assert not fp8_scaled_mm.use_cublas(4096, _Cuda(), (128, 128), torch.float32)  # type: ignore[arg-type]


def test_split_k_quantization_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """PD_FP8_SPLIT_K_QUANT picks where the split-K GEMM's activations are quantized; a bad value names the choices."""
    from pd.layers.triton_fp8_gemm import split_k_quantizes_before

    monkeypatch.delenv("PD_FP8_SPLIT_K_QUANT", raising=False)
    assert split_k_quantizes_before()
    monkeypatch.setenv("PD_FP8_SPLIT_K_QUANT", "inside")
    assert not split_k_quantizes_before()
    monkeypatch.setenv("PD_FP8_SPLIT_K_QUANT", "early")
    with pytest.raises(ValueError, match="inside or before"):
        split_k_quantizes_before()


# ---- GPU tests ----

GPU_SHAPES = [
    # n, k: DeepSeek-V3 (q_a, kv_a_with_mqa: N off 128, q_b, o, dense MLP gate_up and down), Qwen3-30B-A3B (qkv, o)
    (1536, 7168), (576, 7168), (24576, 1536), (7168, 16384), (36864, 7168), (7168, 18432),
    (5120, 2048), (2048, 4096),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 1000, 4096])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_w8a8_linear_matches_dequantized_bf16_within_tolerance(m: int, shape: tuple[int, int]) -> None:
    from pd.layers.triton_fp8_gemm import token_group_quant as quant_kernel
    from pd.layers.triton_fp8_gemm import w8a8_block_gemm

    n, k = shape
    gen = torch.Generator("cuda").manual_seed(int(torch.randint(0, 2**31, ()).item()))
    w_q, w_scale = make_weight(n, k, (128, 128), gen, "cuda")
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    a_q, a_scale = quant_kernel(x, 128)
    q_ref, scale_ref = token_group_quant(x, 128)
    torch.testing.assert_close(scale_ref, a_scale, rtol=1e-6, atol=0)
    assert (a_q.float() != q_ref.float()).float().mean() < 1e-4  # division rounding may flip a rare tie
    got = w8a8_block_gemm(a_q, a_scale, w_q, w_scale, (128, 128), torch.bfloat16)
    expected = emulated_gemm(q_ref, scale_ref, w_q, w_scale, (128, 128))
    assert rel_l2(got, expected) < 4e-3, rel_l2(got, expected)  # bf16 output rounding
    dequantized = F.linear(x, block_dequant(w_q, w_scale, (128, 128), torch.bfloat16))
    assert rel_l2(got, dequantized) < W8A8_TOLERANCE, rel_l2(got, dequantized)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_split_k_linear_matches_the_two_launch_kernel(m: int, shape: tuple[int, int]) -> None:
    """The decode-sized split-K kernel (activations quantized inside) against quantize-then-GEMM on the same input,
    and against the dequantized bf16 linear."""
    from pd.layers.triton_fp8_gemm import token_group_quant as quant_kernel
    from pd.layers.triton_fp8_gemm import w8a8_block_gemm, w8a8_split_k_linear

    n, k = shape
    gen = torch.Generator("cuda").manual_seed(int(torch.randint(0, 2**31, ()).item()))
    w_q, w_scale = make_weight(n, k, (128, 128), gen, "cuda")
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    bias = torch.randn(n, generator=gen, device="cuda").to(torch.bfloat16)
    two_launch = w8a8_block_gemm(*quant_kernel(x, 128), w_q, w_scale, (128, 128), torch.bfloat16, bias)
    dequantized = F.linear(x, block_dequant(w_q, w_scale, (128, 128), torch.bfloat16), bias)
    for before in (False, True):  # activations quantized inside the GEMM, or by a launch before it
        got = w8a8_split_k_linear(x, w_q, w_scale, (128, 128), bias, quantize_before=before)
        assert got.shape == (m, n) and rel_l2(got, two_launch) < 4e-3, (before, rel_l2(got, two_launch))
        assert rel_l2(got, dequantized) < W8A8_TOLERANCE, (before, rel_l2(got, dequantized))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [6, 128, 1000, 4096])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_cublas_block_scaled_mm_matches_the_triton_kernel(m: int, shape: tuple[int, int]) -> None:
    """cuBLAS's block-scaled GEMM (what block-FP8 linears of 128+ rows run on Hopper) against the Triton kernel on the
    same quantized operands, and against the dequantized bf16 linear."""
    from pd.layers import fp8_scaled_mm
    from pd.layers.triton_fp8_gemm import token_group_quant as quant_kernel
    from pd.layers.triton_fp8_gemm import token_group_quant_for_cublas, w8a8_block_gemm

    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    if torch.cuda.get_device_capability() != (9, 0) or cuda < (12, 9):
        pytest.skip(f"cuBLAS runs block-scaled FP8 on Hopper with CUDA 12.9+ ({torch.cuda.get_device_name()}, {cuda})")
    assert fp8_scaled_mm.available(torch.device("cuda")), "the probe failed: see the warning logged"
    n, k = shape
    gen = torch.Generator("cuda").manual_seed(int(torch.randint(0, 2**31, ()).item()))
    w_q, w_scale = make_weight(n, k, (128, 128), gen, "cuda")
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
    a_q, a_scale = token_group_quant_for_cublas(x, 128)
    got = fp8_scaled_mm.block_scaled_mm(a_q, a_scale, w_q, w_scale, torch.bfloat16)[:m]
    q2, s2 = quant_kernel(x, 128)
    triton_out = w8a8_block_gemm(q2, s2, w_q, w_scale, (128, 128), torch.bfloat16)
    assert got.shape == (m, n) and rel_l2(got, triton_out) < 4e-3, rel_l2(got, triton_out)  # two bf16 roundings
    dequantized = F.linear(x, block_dequant(w_q, w_scale, (128, 128), torch.bfloat16))
    assert rel_l2(got, dequantized) < W8A8_TOLERANCE, rel_l2(got, dequantized)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_fp8_linear_runs_the_kernel_and_replays_in_a_cuda_graph() -> None:
    linear = Fp8Linear(7168, 1536, True, (128, 128), torch.bfloat16, device="cuda")
    w_q, w_scale = make_weight(1536, 7168, (128, 128), torch.Generator("cuda").manual_seed(1), "cuda")
    linear.weight.data.copy_(w_q)
    linear.weight_scale_inv.data.copy_(w_scale)
    linear.bias.data.normal_()  # type: ignore[union-attr]
    x = torch.randn(3, 64, 7168, device="cuda", dtype=torch.bfloat16)
    eager = linear(x)
    reference = F.linear(x, linear.dequantized_weight(), linear.bias)
    assert eager.shape == (3, 64, 1536) and rel_l2(eager, reference) < W8A8_TOLERANCE
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = linear(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(again, eager)
    static = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = linear(static)
    fresh = torch.randn_like(x)
    static.copy_(fresh)
    graph.replay()
    assert torch.equal(captured, linear(fresh))
