"""The DeepGEMM MoE runner (pd.moe.runner.deep_gemm_runner) against the torch reference runner.

CPU (CI): the runner's own kernels (the gather into expert order, the grouped layout, the weighted sum back per token)
in Triton's interpreter, with a reference of DeepGEMM's two grouped GEMMs in their place (ReferenceGroupedGemms: the
same contract, and it asserts that the layout it is handed is one DeepGEMM takes, and writes NaN where DeepGEMM's
output is unspecified, so nothing downstream may read those rows). Tiny shapes; some experts get no token, some slots
and whole tokens belong to other ranks (-1); DeepGEMM's own 128-row alignment as well as a smaller one.
GPU (``pytest.mark.gpu``, with DeepGEMM installed): DeepGEMM itself against the reference at model shapes, both
formats; no host sync; CUDA-graph replay equal to eager.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pd.moe.runner import runner_names
from pd.moe.runner.torch_ref import TorchMoeRunner
from tests.interpreter_child import InterpreterChild
from tests.test_moe_triton import TOLERANCE, assert_rows_close, make_batched_case, make_case

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed (the test extra installs it)")  # fmt: skip
needs_deep_gemm = pytest.mark.skipif(importlib.util.find_spec("deep_gemm") is None,
                                     reason="DeepGEMM (deep_gemm) is not installed here")  # fmt: skip


class ReferenceGroupedGemms:
    """DeepGEMM's two grouped GEMMs in torch (a loop over experts: a reference), held to DeepGEMM's input contract."""

    def __init__(self, row_alignment: int) -> None:
        self.row_alignment = row_alignment
        self.calls = 0

    @staticmethod
    def check_weights(w13_EXH: torch.Tensor, w2_EHI: torch.Tensor) -> None:
        pass

    def contiguous(self, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, layout: torch.Tensor) -> None:
        self.calls += 1
        rows, align = a.shape[0], self.row_alignment
        assert layout.dtype == torch.int32 and layout.shape == (rows,) and d.shape == (rows, b.shape[1])
        assert rows % align == 0 and a.stride(-1) == 1 and b.is_contiguous()
        blocks = layout.view(-1, align)
        for block in blocks.tolist():  # DeepGEMM reads a block's expert from its first row: one expert per block
            assert set(block) <= {block[0], -1}, block
            assert block[0] >= 0 or set(block) == {-1}, block
            assert sorted(block, key=lambda e: e < 0) == block, block  # padding after the expert's rows
        d.fill_(float("nan"))
        for e in range(b.shape[0]):
            where = layout == e
            d[where] = (a[where].float() @ b[e].float().T).to(d.dtype)

    def masked(self, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, counts: torch.Tensor, expected_m: int) -> None:
        self.calls += 1
        assert counts.dtype == torch.int32 and a.shape[:2] == d.shape[:2] and 1 <= expected_m <= a.shape[1]
        d.fill_(float("nan"))
        for e, n in enumerate(counts.tolist()):
            d[e, :n] = (a[e, :n].float() @ b[e].float().T).to(d.dtype)


# ---- checks run in the interpreter child ----

CASES = ((1, 1, 4), (5, 2, 4), (33, 4, 16), (70, 3, 5), (9, 8, 8))  # tokens, top-k, experts


def check_standard(dtype_name: str, row_alignment: int) -> None:
    """The standard format over CASES, SiLU and GELU, local-only and partly foreign slots, against TorchMoeRunner;
    tokens without a local slot get exact zeros; reruns equal; a batch below the threshold goes to the Triton
    runner (no grouped GEMM called)."""
    from pd.moe.runner.deep_gemm_runner import DeepGemmMoeRunner
    from pd.moe.runner.triton_runner import TritonMoeRunner

    dtype, tol = getattr(torch, dtype_name), TOLERANCE[dtype_name]
    kernels = ReferenceGroupedGemms(row_alignment)
    runner = DeepGemmMoeRunner(kernels, min_pairs_per_expert=0)
    for seed, (tokens, top_k, experts) in enumerate(CASES):
        activation = "gelu" if seed % 3 == 2 else "silu"
        dispatched, w13, w2 = make_case(seed, tokens, top_k, experts, dtype, foreign=0.0 if seed % 2 else 0.3)
        runner.prepare_weights(w13, w2)
        calls = kernels.calls
        out = runner.run(dispatched, w13, w2, activation)
        assert kernels.calls == calls + 2, "both GEMMs through the grouped kernels"
        ref = TorchMoeRunner().run(dispatched, w13, w2, activation).hidden_states
        where = f"{tokens} tokens, top-{top_k}, {experts} experts, {activation}, rows aligned to {row_alignment}"
        assert out.handle is dispatched.handle and out.hidden_states.dtype == dtype
        torch.testing.assert_close(out.hidden_states, ref, rtol=tol, atol=tol, msg=lambda m: f"{where}: {m}")  # noqa: B023
        skipped = (dispatched.topk_ids < 0).all(dim=1)
        assert not out.hidden_states[skipped].any(), "a token without a local slot must get exact zeros"
        assert torch.equal(runner.run(dispatched, w13, w2, activation).hidden_states, out.hidden_states)
    # below the threshold: the Triton runner's result, bit for bit
    dispatched, w13, w2 = make_case(11, 6, 2, 8, dtype)
    calls = kernels.calls
    small = DeepGemmMoeRunner(kernels, min_pairs_per_expert=2).run(dispatched, w13, w2).hidden_states
    assert kernels.calls == calls and torch.equal(small, TritonMoeRunner().run(dispatched, w13, w2).hidden_states)


def check_batched(dtype_name: str) -> None:
    """The batched format (counts 0 and max_rows included, NaN past the counts) against TorchMoeRunner's."""
    from pd.moe.runner.deep_gemm_runner import DeepGemmMoeRunner

    dtype, tol = getattr(torch, dtype_name), TOLERANCE[dtype_name]
    runner = DeepGemmMoeRunner(ReferenceGroupedGemms(16))
    for seed, (experts, max_rows) in enumerate(((1, 1), (3, 19), (8, 33))):
        activation = "gelu" if seed == 1 else "silu"
        batched, w13, w2 = make_batched_case(seed, experts, max_rows, dtype)
        out = runner.run(batched, w13, w2, activation)
        ref = TorchMoeRunner().run(batched, w13, w2, activation).hidden_states
        assert out.handle is batched.handle and out.hidden_states.shape == batched.hidden_states.shape
        assert_rows_close(out.hidden_states, ref, batched.expert_counts, tol, f"{experts}x{max_rows} {activation}")


@needs_triton
@pytest.mark.parametrize("dtype_name,row_alignment", [("float32", 16), ("bfloat16", 16), ("bfloat16", 128)])
def test_deep_gemm_runner_matches_torch_runner_in_interpreter(dtype_name: str, row_alignment: int,
                                                              interpreter: InterpreterChild) -> None:  # fmt: skip
    interpreter.run(__name__, "check_standard", dtype_name, row_alignment)


@needs_triton
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_deep_gemm_batched_format_matches_torch_batched_in_interpreter(
        dtype_name: str, interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_batched", dtype_name)


@needs_triton
def test_deep_gemm_is_registered_and_refuses_what_it_cannot_multiply() -> None:
    from pd.moe.runner.deep_gemm_runner import DeepGemmKernels

    assert "deep_gemm" in runner_names()
    w13, w2 = torch.zeros(2, 256, 128, dtype=torch.bfloat16), torch.zeros(2, 128, 128, dtype=torch.bfloat16)
    DeepGemmKernels.check_weights(w13, w2)
    with pytest.raises(ValueError, match="computes in bfloat16.*--dtype bfloat16"):
        DeepGemmKernels.check_weights(w13.half(), w2.half())
    with pytest.raises(ValueError, match=r"intermediate size \(96, per rank\) to be multiples of 64"):
        DeepGemmKernels.check_weights(torch.zeros(2, 192, 128, dtype=torch.bfloat16),
                                      torch.zeros(2, 128, 96, dtype=torch.bfloat16))  # fmt: skip


@needs_triton
@pytest.mark.skipif(importlib.util.find_spec("deep_gemm") is not None, reason="DeepGEMM is installed here")
def test_deep_gemm_runner_without_deep_gemm_says_what_is_missing() -> None:
    from pd.moe.runner import get_runner

    with pytest.raises(ImportError, match="--moe-runner-backend deep_gemm needs DeepGEMM.*--moe-runner-backend triton"):
        get_runner("deep_gemm")


@needs_triton
def test_deep_gemm_names_what_its_kernel_compilation_lacks(tmp_path) -> None:
    """DeepGEMM finds its CUDA toolkit as CUDA_HOME, else nvcc's folder; it compiles with nvcc, or with NVRTC against
    the headers there, and reads each kernel back with that toolkit's cuobjdump (an H100 without cuobjdump failed
    every GEMM with a bare assertion on an exit code)."""
    from pd.moe.runner.deep_gemm_runner import jit_toolchain_problem

    home = tmp_path / "cuda"
    no_nvcc = lambda name: None  # noqa: E731

    def add(relative: str) -> None:
        (home / relative).parent.mkdir(parents=True, exist_ok=True)
        (home / relative).write_text("")

    problem = jit_toolchain_problem({"CUDA_HOME": str(home)}, no_nvcc)
    assert problem is not None and f"{home}/bin/cuobjdump, {home}/bin/nvcc" in problem
    assert "DG_JIT_USE_NVRTC=1" in problem
    add("include/cuda.h")
    nvrtc = {"CUDA_HOME": str(home), "DG_JIT_USE_NVRTC": "1"}
    problem = jit_toolchain_problem(nvrtc, no_nvcc)
    assert problem is not None and "lacks " + f"{home}/bin/cuobjdump." in problem
    add("bin/cuobjdump")
    assert jit_toolchain_problem(nvrtc, no_nvcc) is None
    problem = jit_toolchain_problem({"CUDA_HOME": str(home), "DG_JIT_USE_NVRTC": "0"}, no_nvcc)
    assert problem is not None and "lacks " + f"{home}/bin/nvcc." in problem
    add("bin/nvcc")
    assert jit_toolchain_problem({"CUDA_PATH": str(home)}, no_nvcc) is None
    assert jit_toolchain_problem({}, lambda name: f"{home}/bin/{name}") is None  # the toolkit found through nvcc
    problem = jit_toolchain_problem({"CUDA_HOME": str(tmp_path / "elsewhere")}, lambda name: f"{home}/bin/{name}")
    assert problem is not None and "elsewhere/bin/cuobjdump" in problem  # CUDA_HOME first, as DeepGEMM


# ---- GPU tests (DeepGEMM itself) ----

GPU_CASES = [
    # tokens, top_k, experts, hidden, inter, foreign share
    (4096, 8, 64, 2048, 768, 0.0),  # Qwen3-30B-A3B widths, a prompt chunk
    (2048, 8, 32, 7168, 2048, 0.875),  # DeepSeek-V3 widths at EP=8
    (1024, 2, 8, 4096, 1792, 0.2),  # Mixtral-like, at TP=8
]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.gpu
@needs_deep_gemm
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_deep_gemm_runner_matches_torch_runner(case: tuple[int, int, int, int, int, float]) -> None:
    from pd.moe.runner.deep_gemm_runner import DeepGemmMoeRunner

    tokens, top_k, experts, hidden, inter, foreign = case
    dispatched, w13, w2 = make_case(tokens + experts, tokens, top_k, experts, torch.bfloat16, hidden, inter, foreign,
                                    device="cuda")  # fmt: skip
    runner = DeepGemmMoeRunner(min_pairs_per_expert=0)
    runner.prepare_weights(w13, w2)
    out = runner.run(dispatched, w13, w2).hidden_states
    ref = TorchMoeRunner().run(dispatched, w13, w2).hidden_states
    assert _rel_l2(out, ref) < 1e-2, _rel_l2(out, ref)
    assert not out[(dispatched.topk_ids < 0).all(dim=1)].any()
    assert torch.equal(runner.run(dispatched, w13, w2).hidden_states, out)


@pytest.mark.gpu
@needs_deep_gemm
@pytest.mark.parametrize("case", [(32, 1024, 7168, 2048), (128, 128, 2048, 768)], ids=lambda c: "-".join(map(str, c)))
def test_gpu_deep_gemm_batched_format_matches_torch_batched(case: tuple[int, int, int, int]) -> None:
    from pd.moe.runner.deep_gemm_runner import DeepGemmMoeRunner

    experts, max_rows, hidden, inter = case
    batched, w13, w2 = make_batched_case(experts, experts, max_rows, torch.bfloat16, hidden, inter, device="cuda")
    out = DeepGemmMoeRunner().run(batched, w13, w2).hidden_states
    ref = TorchMoeRunner().run(batched, w13, w2).hidden_states
    for e, n in enumerate(batched.expert_counts.tolist()):
        if n:
            assert _rel_l2(out[e, :n], ref[e, :n]) < 1e-2, (e, n)


@pytest.mark.gpu
@needs_deep_gemm
@torch.no_grad()
def test_gpu_deep_gemm_runner_has_no_host_sync_and_replays_from_a_cuda_graph() -> None:
    from pd.moe.runner.deep_gemm_runner import DeepGemmMoeRunner

    runner = DeepGemmMoeRunner(min_pairs_per_expert=0)
    static, w13, w2 = make_case(0, 2048, 8, 64, torch.bfloat16, 2048, 768, 0.3, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (DeepGEMM's and Triton's compilation) off the capture
        runner.run(static, w13, w2)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = runner.run(static, w13, w2).hidden_states
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = runner.run(static, w13, w2).hidden_states
    graph.replay()
    assert torch.equal(captured, eager)
    for seed in (1, 2):
        fresh, _, _ = make_case(seed, 2048, 8, 64, torch.bfloat16, 2048, 768, 0.25 * seed, device="cuda")
        static.hidden_states.copy_(fresh.hidden_states)
        static.topk_ids.copy_(fresh.topk_ids)
        static.topk_weights.copy_(fresh.topk_weights)
        graph.replay()
        assert torch.equal(captured, runner.run(fresh, w13, w2).hidden_states)
