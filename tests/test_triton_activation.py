"""The dense MLP's silu(gate) * up in one Triton launch (pd.layers.triton_activation.silu_and_mul_rows) against torch's
F.silu(gate) * up on fresh random rows: float32 within a few float32 ulps, bfloat16 and float16 within one ulp of their
own (the float32 exp may differ from torch's by an ulp, which can move the rounded activation by one), most of their
elements exactly equal. Odd widths (a partial column block, several blocks), zero rows, and values from -20 to 20
(silu's tail and its linear part). CPU: Triton's interpreter (CI); GPU: the DeepSeek-V3 dense MLP's width."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from tests.interpreter_child import InterpreterChild

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
ULP = {torch.float32: 2**-20, torch.bfloat16: 2**-7, torch.float16: 2**-10}  # relative; float32: 8 of its ulps


def check_silu_and_mul(device: str, seed: int, shapes: tuple[tuple[int, int], ...]) -> None:
    from pd.layers.triton_activation import silu_and_mul_rows

    gen = torch.Generator().manual_seed(seed)
    for rows, inter in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            gate_up = (torch.rand(rows, 2 * inter, generator=gen) * 40 - 20).to(dtype).to(device)
            got = silu_and_mul_rows(gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            want = F.silu(gate) * up
            where = (rows, inter, dtype, seed)
            assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous(), where
            err = (got.float() - want.float()).abs()
            assert (err <= ULP[dtype] * want.float().abs() + 1e-30).all(), (where, float(err.max()))
            if want.numel() and dtype != torch.float32:  # (float32: torch's silu itself is x / (1 + exp(-x)) +- 1 ulp)
                assert (got == want).float().mean() > 0.9, where  # a rounding difference is the exception


@needs_triton
def test_silu_and_mul_rows_in_interpreter(interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_silu_and_mul", "cpu", int(torch.randint(0, 2**31, ())),
                    ((5, 37), (0, 64), (3, 1100)))  # fmt: skip


@pytest.mark.gpu
def test_silu_and_mul_rows_on_the_gpu() -> None:
    check_silu_and_mul("cuda", int(torch.randint(0, 2**31, ())), ((64, 18432), (8192, 2048), (7, 1100)))


def test_silu_and_mul_takes_torch_off_the_fused_kernels() -> None:
    """On the CPU outside the interpreter's fused-kernel context: torch's own arithmetic, exactly."""
    from pd.layers.activation import silu_and_mul

    gate_up = torch.randn(4, 2 * 24, dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul(gate_up), F.silu(gate) * up)
