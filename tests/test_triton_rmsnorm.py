"""The Triton RMSNorm against the torch reference (pd.layers.norm.RMSNorm on the CPU path): Triton's CPU
interpreter in CI on ragged, strided inputs; large shapes on a GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from pd.layers.norm import RMSNorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def check(device: str, rows: int, n: int, dtype: torch.dtype, strided: bool) -> None:
    from pd.layers.triton_rmsnorm import rms_norm

    gen = torch.Generator().manual_seed(rows * 1000 + n)
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


def interpreter_cases() -> None:
    from tests.triton_interpreter import patch_interpreter

    patch_interpreter()
    for rows, n, dtype, strided in [(1, 7, torch.float32, False), (5, 64, torch.float32, True),
                                    (3, 100, torch.bfloat16, False), (4, 33, torch.float16, True),
                                    (0, 16, torch.float32, False)]:  # fmt: skip
        check("cpu", rows, n, dtype, strided)


@needs_triton
def test_triton_rmsnorm_equals_the_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "import tests.test_triton_rmsnorm as t; t.interpreter_cases()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n", [(1, 2048), (8192, 2048), (333, 7168), (4096 * 32, 128), (77, 1536)])
def test_triton_rmsnorm_equals_the_reference_on_the_gpu(rows: int, n: int, dtype: torch.dtype) -> None:
    check("cuda", rows, n, dtype, strided=rows % 2 == 1)
