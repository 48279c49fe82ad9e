"""The dense MLP's silu(gate) * up in one Triton launch (pd.layers.triton_activation.silu_and_mul_rows) against torch's
F.silu(gate) * up on fresh random rows: float32 within a few float32 ulps, bfloat16 and float16 within two ulps of their
own (the float32 exp may differ from torch's by a few float32 ulps, which can move the rounded activation by one ulp,
and the product carries that as up to two), most of their elements exactly equal. Odd widths (a partial column block,
several blocks), zero rows, and values from -20 to 20 (silu's tail and its linear part). CPU: Triton's interpreter (CI);
GPU: the DeepSeek-V3 dense MLP's width."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from tests.interpreter_child import InterpreterChild

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from pd.layers.triton_activation import exp_f32

    @triton.jit
    def _exp_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, exp_f32(tl.load(x_ptr + offs)))


# relative bounds: float32 8 of its ulps; bfloat16 and float16 two of theirs (an ulp is 2^-8 / 2^-11 to 2^-7 / 2^-10)
ULP = {torch.float32: 2**-20, torch.bfloat16: 2**-6, torch.float16: 2**-9}


def check_exp_f32(device: str) -> None:
    """exp_f32 on every float32 input kind: within 4 ulps of the float64 exp where that is a normal float; where a
    denormal, below the smallest normal float (the GPU's arithmetic rounds denormals its own way; silu never sees them:
    1 + exp(-x) is 1 long before); 0 and inf where torch's are; NaN stays NaN."""
    special = [0.0, -0.0, 1e-8, -1e-8, 88.72, 88.73, 89.5, -87.3, -103.9, -104.5, -200.0, float("inf"), float("-inf")]
    x = torch.cat([torch.linspace(-110, 95, 1 << 16), torch.rand(1 << 12) * 205 - 110, torch.tensor(special)])
    x = torch.cat([x, torch.full((-x.numel() % 64,), float("nan"))]).to(device)
    got = torch.empty_like(x)
    _exp_kernel[(x.numel() // 64,)](x, got, BLOCK=64)
    want, exact = torch.exp(x), torch.exp(x.double())
    normal = torch.isfinite(want) & (want.abs() >= torch.finfo(torch.float32).tiny)
    rel = ((got.double() - exact).abs() / exact)[normal]
    assert float(rel.max()) <= 4 * 2**-23, (float(rel.max()) / 2**-23, x[normal][rel.argmax()])
    denormal = (want > 0) & (want < torch.finfo(torch.float32).tiny)
    assert ((got >= 0) & (got < torch.finfo(torch.float32).tiny))[denormal].all(), "a normal float for a denormal exp"
    ends = (want == 0) | want.isinf()
    assert torch.equal(got[ends], want[ends])
    assert got[x.isnan()].isnan().all()


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


@needs_triton
def test_exp_in_interpreter(interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_exp_f32", "cpu")


@pytest.mark.gpu
def test_exp_on_the_gpu() -> None:
    """The hardware's approximate 2^x meets only its reduced argument here, so float32 silu keeps torch's accuracy."""
    check_exp_f32("cuda")


@pytest.mark.gpu
def test_silu_and_mul_rows_on_the_gpu() -> None:
    check_silu_and_mul("cuda", int(torch.randint(0, 2**31, ())), ((64, 18432), (8192, 2048), (7, 1100)))


def test_silu_and_mul_takes_torch_off_the_fused_kernels() -> None:
    """On the CPU outside the interpreter's fused-kernel context: torch's own arithmetic, exactly."""
    from pd.layers.activation import silu_and_mul

    gate_up = torch.randn(4, 2 * 24, dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul(gate_up), F.silu(gate) * up)
