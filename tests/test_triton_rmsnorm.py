"""The Triton RMSNorm against the torch reference (pd.layers.norm.RMSNorm on the CPU path), alone and with the
residual add fused in (add_rms_norm against torch's add, then the norm): Triton's CPU interpreter in CI on ragged,
strided inputs; large shapes on a GPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pd.layers.norm import RMSNorm
from tests.interpreter_child import InterpreterChild

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def check(device: str, rows: int, n: int, dtype: torch.dtype, strided: bool, seed: int) -> None:
    from pd.layers.triton_rmsnorm import rms_norm

    gen = torch.Generator().manual_seed(seed)
    ref = RMSNorm(n, eps=1e-5)
    ref.weight.data = (torch.randn(n, generator=gen) * 0.5 + 1).to(dtype)
    base = (torch.randn(rows, 3 * n if strided else n, generator=gen) * 3).to(dtype)
    x = base[:, n : 2 * n] if strided else base  # rows of a wider tensor, as q/k norms see them
    expected = ref(x)  # the CPU path: the reference formula
    got = rms_norm(x.to(device), ref.weight.to(device), 1e-5).cpu()
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    # Beyond rounding of the two casts, only the order of the sum of squares differs.
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
    if dtype == torch.float32 and rows:
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def check_add(device: str, rows: int, n: int, dtype: torch.dtype, strided: bool, seed: int) -> None:
    from pd.layers.triton_rmsnorm import add_rms_norm

    gen = torch.Generator().manual_seed(seed)
    ref = RMSNorm(n, eps=1e-6)
    ref.weight.data = (torch.randn(n, generator=gen) * 0.5 + 1).to(dtype)
    x = (torch.randn(rows, n, generator=gen) * 3).to(dtype)
    base = torch.randn(rows, 2 * n if strided else n, generator=gen).to(dtype)
    delta = base[:, n:] if strided else base
    want_sum, want = ref.add_forward(x, delta)  # the CPU path: torch's add, then the reference norm
    got_sum, got = (t.cpu() for t in add_rms_norm(x.to(device), delta.to(device), ref.weight.to(device), 1e-6))
    assert torch.equal(got_sum, want_sum)  # both round the float32 sum once to the dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def check_add_quant(device: str, rows: int, n: int, group: int, seed: int) -> None:
    """add_rms_norm writing the e4m3 copy too (quant_group): the same sum and norm bits as without, a copy equal to
    token_group_quant of the norm bit for bit, and a block-FP8 linear reading that copy equal to one that
    quantizes the norm itself."""
    from pd.layers import fp8_rows
    from pd.layers.triton_fp8_gemm import token_group_quant, w8a8_block_linear
    from pd.layers.triton_rmsnorm import add_rms_norm
    from pd.quant.fp8 import block_quant

    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, generator=gen) * 0.5 + 1).to(torch.bfloat16).to(device)
    x, delta = ((torch.randn(rows, n, generator=gen) * 3).to(torch.bfloat16).to(device) for _ in range(2))
    plain_sum, plain = add_rms_norm(x, delta, weight, 1e-6)
    got_sum, got = add_rms_norm(x, delta, weight, 1e-6, quant_group=group)
    assert torch.equal(got_sum, plain_sum) and torch.equal(got, plain)
    attached = fp8_rows.attached(got, group)
    assert attached is not None and fp8_rows.attached(got, 2 * group) is None
    assert fp8_rows.attached(plain, group) is None
    want_q, want_scale = token_group_quant(plain, group)
    assert torch.equal(attached[0].view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(attached[1], want_scale)
    w_q, w_scale = block_quant(torch.randn(3 * group, n, generator=gen) / n**0.5, (group, group))
    w_q, w_scale = w_q.to(device), w_scale.to(device)
    from_copy = w8a8_block_linear(got, w_q, w_scale, (group, group))
    quantizing = w8a8_block_linear(got.clone(), w_q, w_scale, (group, group))  # a copy drops the attachment
    assert torch.equal(from_copy, quantizing)


def check_add_split_parts(device: str, rows: int, n: int, splits: int, bias: bool, seed: int) -> None:
    """add_rms_norm over a split-K GEMM's unsummed partials (pd.layers.split_k_parts): the same sum and norm bits
    as summing them first (the GEMM's own sums launch) and adding that."""
    from pd.layers.split_k_parts import SplitKParts
    from pd.layers.triton_fp8_gemm import sum_splits
    from pd.layers.triton_rmsnorm import add_rms_norm

    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, generator=gen) * 0.5 + 1).to(torch.bfloat16).to(device)
    x = (torch.randn(rows, n, generator=gen) * 3).to(torch.bfloat16).to(device)
    part = (torch.randn(splits, rows, n, generator=gen) * 2).to(device)
    b = (torch.randn(n, generator=gen)).to(torch.bfloat16).to(device) if bias else None
    want_sum, want = add_rms_norm(x, sum_splits(part, b, torch.bfloat16), weight, 1e-6)
    got_sum, got = add_rms_norm(x, SplitKParts(part, b, torch.bfloat16), weight, 1e-6)
    assert torch.equal(got_sum, want_sum) and torch.equal(got, want)


INTERPRETER_CASES = [(1, 7, torch.float32, False), (5, 64, torch.float32, True), (3, 100, torch.bfloat16, False),
                     (4, 33, torch.float16, True), (0, 16, torch.float32, False)]  # fmt: skip


@needs_triton
@pytest.mark.parametrize("rows,n,dtype,strided", INTERPRETER_CASES)
def test_triton_rmsnorm_equals_the_reference_under_the_interpreter(
    rows: int, n: int, dtype: torch.dtype, strided: bool, interpreter: InterpreterChild
) -> None:
    seed = int(torch.randint(0, 2**62, ()))  # fresh each run (tests/conftest.py seeds the global generator)
    interpreter.run(__name__, "check", "cpu", rows, n, dtype, strided, seed, timeout_s=300)


@needs_triton
@pytest.mark.parametrize("rows,n,dtype,strided", [(3, 100, torch.bfloat16, True), (4, 33, torch.float32, False),
                                                  (0, 16, torch.float16, False)])  # fmt: skip
def test_triton_add_rmsnorm_equals_add_then_reference_under_the_interpreter(
    rows: int, n: int, dtype: torch.dtype, strided: bool, interpreter: InterpreterChild
) -> None:
    seed = int(torch.randint(0, 2**62, ()))
    interpreter.run(__name__, "check_add", "cpu", rows, n, dtype, strided, seed, timeout_s=300)


@needs_triton
def test_triton_add_rmsnorm_quantizing_for_an_fp8_linear_under_the_interpreter(interpreter: InterpreterChild) -> None:
    seed = int(torch.randint(0, 2**62, ()))
    for rows, n, group in ((3, 100, 16), (5, 64, 32)):  # a partial last group; whole groups
        interpreter.run(__name__, "check_add_quant", "cpu", rows, n, group, seed, timeout_s=300)


@needs_triton
def test_triton_add_rmsnorm_summing_split_k_partials_under_the_interpreter(interpreter: InterpreterChild) -> None:
    seed = int(torch.randint(0, 2**62, ()))
    for rows, n, splits, bias in ((3, 100, 4, True), (5, 64, 2, False)):
        interpreter.run(__name__, "check_add_split_parts", "cpu", rows, n, splits, bias, seed, timeout_s=300)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,n,splits", [(1, 2048, 8), (64, 2048, 4), (33, 7168, 3)])
def test_triton_add_rmsnorm_summing_split_k_partials_on_the_gpu(rows: int, n: int, splits: int) -> None:
    check_add_split_parts("cuda", rows, n, splits, rows % 2 == 1, int(torch.randint(0, 2**62, ())))


@pytest.mark.gpu
@pytest.mark.parametrize("rows,n", [(1, 2048), (64, 2048), (33, 7168)])
def test_triton_add_rmsnorm_quantizing_for_an_fp8_linear_on_the_gpu(rows: int, n: int) -> None:
    check_add_quant("cuda", rows, n, 128, int(torch.randint(0, 2**62, ())))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n", [(1, 2048), (8192, 2048), (333, 7168), (4096 * 32, 128), (77, 1536)])
def test_triton_rmsnorm_equals_the_reference_on_the_gpu(rows: int, n: int, dtype: torch.dtype) -> None:
    check("cuda", rows, n, dtype, rows % 2 == 1, int(torch.randint(0, 2**62, ())))
    check_add("cuda", rows, n, dtype, rows % 2 == 0, int(torch.randint(0, 2**62, ())))
