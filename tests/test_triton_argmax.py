"""Greedy sampling's Triton argmax (pd.engine.triton_argmax) against torch.argmax on fresh random logits: small
shapes under Triton's CPU interpreter in CI, decode shapes on a GPU. Exactly equal, ties and specials included (the
first index of the largest value, NaN counting as the largest, -0.0 equal to 0.0)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.interpreter_child import InterpreterChild

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_logits(rows: int, cols: int, dtype: torch.dtype, specials: bool, seed: int) -> torch.Tensor:
    """Random logits; with ``specials`` also rows of ties (repeated maxima, across chunks too), NaN, +-inf, +-0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen).to(dtype)
    if specials and rows >= 6:
        near = torch.randint(1, min(cols, 64), (2,), generator=gen)  # two ties in the first chunk
        far = torch.randint(0, cols, (1,), generator=gen)  # and one anywhere
        x[0, torch.cat([near, far])] = 50.0  # the largest value three times: the first index wins
        x[1, :] = -1.0
        x[1, near.min()] = -0.0  # +0 and -0 compare equal: the -0 first wins
        x[1, near.min() + 1] = 0.0
        x[2, 0] = float("inf")  # a NaN later still wins
        x[2, near] = float("nan")
        x[2, near.min() - 1 if near.min() > 1 else 1] = -float("nan")  # sign bit set, first: still the first NaN
        x[3, torch.randint(0, cols, (2,), generator=gen)] = float("inf")
        x[4, :] = float("-inf")
        x[5] = -x[5].abs() - 1.0  # all negative
    return x


def check(device: str, rows: int, cols: int, dtype_name: str, specials: bool, seed: int) -> None:
    from pd.engine.triton_argmax import argmax_rows

    logits = make_logits(rows, cols, DTYPES[dtype_name], specials, seed)
    want = logits.argmax(dim=-1)
    got = argmax_rows(logits.to(device)).cpu()
    assert got.dtype == torch.int64 and got.shape == (rows,)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a strided view (a slice of wider logits) gives the same
    wide = torch.cat([logits, logits[:, :7]], dim=1).to(device)
    torch.testing.assert_close(argmax_rows(wide[:, :cols]).cpu(), want, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows,cols", [(1, 100), (7, 9000)])
def test_argmax_equals_torch_under_the_interpreter(rows: int, cols: int, dtype_name: str,
                                                   interpreter: InterpreterChild) -> None:  # fmt: skip
    interpreter.run(__name__, "check", "cpu", rows, cols, dtype_name, rows >= 6, int(torch.randint(0, 2**62, ())))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("rows,cols", [(1, 151936), (64, 151936), (256, 129280), (3, 4096)])
def test_argmax_equals_torch_on_the_gpu(rows: int, cols: int, dtype_name: str) -> None:
    check("cuda", rows, cols, dtype_name, rows >= 6, int(torch.randint(0, 2**62, ())))


@pytest.mark.gpu
def test_sampler_argmax_is_the_kernel_and_captures() -> None:
    """Greedy sampling on CUDA runs the kernel (two launches, no host sync) and replays in a CUDA graph."""
    from pd.engine.sampler import all_greedy_rows, sample

    logits = torch.randn(64, 151936, device="cuda", dtype=torch.bfloat16)
    rows = all_greedy_rows(64, logits.device)
    sample(logits, rows)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample(logits, rows)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    torch.testing.assert_close(out, logits.argmax(dim=-1), rtol=0, atol=0)
