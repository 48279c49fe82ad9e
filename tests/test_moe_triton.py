"""The Triton MoE runner (pd.moe.runner.triton_runner) against the torch reference runner, and its alignment
against a Python oracle.

CPU (CI): tiny shapes in Triton's interpreter, in a child Python with TRITON_INTERPRET=1 set before Triton is
imported, shared by the run's kernel checks (tests/interpreter_child.py). Hidden and intermediate sizes are not
multiples of the blocks, some experts get no token, some slots (and some whole tokens) belong to other ranks (-1).
The batched format (rows grouped per expert, low-latency dispatch) against the reference's masked expert loop:
random counts including 0 and max_rows, max_rows off the row block, garbage past the counts; and a FusedMoE forward
through the torch dispatcher's low_latency mode equal to the single-rank layer.
GPU (``pytest.mark.gpu``): large shapes against the reference in both formats, no host sync in a whole FusedMoE
forward (normal and low_latency), bit-identical reruns, and CUDA-graph replay equal to eager.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from typing import Any

import pytest
import torch

from pd.moe.dispatcher.base import DispatchFormat, DispatchOutput
from pd.moe.runner import runner_names
from pd.moe.runner.torch_ref import TorchMoeRunner
from tests.interpreter_child import InterpreterChild

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed (the test extra installs it)")  # fmt: skip

# Small blocks keep the interpreter fast; H = 40 and 2I = 48 are not multiples of them (masked K, wrapped N).
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2, "num_warps": 4,
         "num_stages": 2}  # fmt: skip
HIDDEN, INTER = 40, 24
# Tolerances against the reference: float32 up to GEMM summation order; bf16 and fp16 up to a few units in the
# last place of the intermediate roundings (a GEMM result one ulp apart flips the rounding of what follows).
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}


def make_case(seed: int, num_tokens: int, top_k: int, num_experts: int, dtype: torch.dtype, hidden: int = HIDDEN,
              inter: int = INTER, foreign: float = 0.3, device: str = "cpu",
              ) -> tuple[DispatchOutput, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Distinct local ids per token from three quarters of the experts (the rest get no token); a ``foreign``
    share of slots is -1, and so are all slots of every fourth token (foreign > 0)."""
    gen = torch.Generator(device).manual_seed(seed)
    used = max(top_k, num_experts * 3 // 4)
    pick = torch.rand(num_tokens, used, generator=gen, device=device).argsort(-1)[:, :top_k]
    ids = torch.randperm(num_experts, generator=gen, device=device)[:used][pick]
    ids = ids.masked_fill(torch.rand(num_tokens, top_k, generator=gen, device=device) < foreign, -1)
    if foreign > 0:
        ids[::4] = -1
    weights = torch.rand(num_tokens, top_k, generator=gen, device=device)
    x = torch.randn(num_tokens, hidden, generator=gen, device=device).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=device) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen, device=device) / inter**0.5).to(dtype)
    return DispatchOutput(x, ids, weights, handle=object()), w13, w2


# ---- checks run in the interpreter child ----


def check_alignment() -> None:
    """align_pairs_to_blocks against a Python oracle: each local pair once, in ascending order within its expert's
    run; runs in expert order, each padded with the sentinel to whole blocks of one expert; -1 blocks after."""
    from pd.moe.runner.moe_align import align_pairs_to_blocks, max_padded_rows

    cases = [*itertools.product((1, 5, 33), (1, 2, 4), (4, 8, 16), (16,)), (70, 4, 16, 32), (300, 3, 5, 16)]
    for seed, (tokens, top_k, experts, block_m) in enumerate(cases):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(-1, experts, (tokens, top_k), generator=gen)
        ids[ids == experts // 2] = -1  # an expert without tokens
        ids = ids.to(torch.int32) if seed % 3 == 0 else ids
        got = align_pairs_to_blocks(ids, experts, block_m)
        flat, sentinel = ids.flatten().tolist(), tokens * top_k
        rows, blocks = [], []
        for e in range(experts):
            pairs = [p for p, i in enumerate(flat) if i == e]
            pad = -len(pairs) % block_m
            rows += pairs + [sentinel] * pad
            blocks += [e] * ((len(pairs) + pad) // block_m)
        max_rows = max_padded_rows(sentinel, experts, block_m)
        assert got.sorted_ids.shape == (max_rows,) and got.expert_of_block.shape == (max_rows // block_m,)
        assert got.num_rows_post_pad.tolist() == [len(rows)], (got.num_rows_post_pad, len(rows))
        assert got.sorted_ids.tolist() == rows + [sentinel] * (max_rows - len(rows)), (tokens, top_k, experts)
        assert got.expert_of_block.tolist() == blocks + [-1] * (max_rows // block_m - len(blocks))
        assert got.num_pairs == sentinel and got.block_m == block_m


RUNNER_GRID = ((1, 5, 33), (1, 2, 4), (4, 8, 16))  # tokens, top-k, experts


def runner_cases(dtype_name: str) -> list[tuple[int, int, int]]:
    """(tokens, top_k, experts) to run: float32 every combination; bf16 and fp16, which add the roundings to the same
    masking, the 9 combinations in which every two factors' values meet exactly once (an orthogonal array)."""
    if dtype_name == "float32":
        return list(itertools.product(*RUNNER_GRID))
    tokens, top_k, experts = RUNNER_GRID
    return [(tokens[i], top_k[j], experts[(i + j) % 3]) for i in range(3) for j in range(3)]


def check_runner(dtype_name: str) -> None:
    """The Triton runner against TorchMoeRunner over tokens x top-k x experts (runner_cases), SiLU and GELU; reruns
    equal."""
    from pd.moe.runner import get_runner
    from pd.moe.runner.triton_runner import TritonMoeRunner

    assert isinstance(get_runner("triton"), TritonMoeRunner)
    dtype, tol = getattr(torch, dtype_name), TOLERANCE[dtype_name]
    runner = TritonMoeRunner(SMALL)
    for seed, (tokens, top_k, experts) in enumerate(runner_cases(dtype_name)):
        activation = "gelu" if seed % 4 == 3 else "silu"
        dispatched, w13, w2 = make_case(seed, tokens, top_k, experts, dtype, foreign=0.0 if seed % 3 == 0 else 0.3)
        out = runner.run(dispatched, w13, w2, activation)
        ref = TorchMoeRunner().run(dispatched, w13, w2, activation).hidden_states
        assert out.handle is dispatched.handle and out.hidden_states.dtype == dtype
        where = f"{tokens} tokens, top-{top_k}, {experts} experts, {activation}"
        torch.testing.assert_close(out.hidden_states, ref, rtol=tol, atol=tol, msg=lambda m: f"{where}: {m}")  # noqa: B023
        skipped = (dispatched.topk_ids < 0).all(dim=1)
        assert not out.hidden_states[skipped].any(), "a token without a local slot must get exact zeros"
        assert torch.equal(runner.run(dispatched, w13, w2, activation).hidden_states, out.hidden_states)


def check_runner_edges() -> None:
    """The default block sizes; ids >= E skipped like -1; an empty batch; an unknown activation refused."""
    from pd.moe.runner.triton_runner import TritonMoeRunner

    dispatched, w13, w2 = make_case(7, 9, 3, 6, torch.float32, hidden=72, inter=40)
    ref = TorchMoeRunner().run(dispatched, w13, w2).hidden_states
    torch.testing.assert_close(TritonMoeRunner().run(dispatched, w13, w2).hidden_states, ref, rtol=1e-5, atol=1e-5)

    out_of_range = dispatched.topk_ids.masked_fill(dispatched.topk_ids == -1, 6)
    beyond = DispatchOutput(dispatched.hidden_states, out_of_range, dispatched.topk_weights, None)
    torch.testing.assert_close(TritonMoeRunner(SMALL).run(beyond, w13, w2).hidden_states, ref, rtol=1e-5, atol=1e-5)

    empty = DispatchOutput(torch.empty(0, 72), torch.empty(0, 3, dtype=torch.int64), torch.empty(0, 3), None)
    assert TritonMoeRunner().run(empty, w13, w2).hidden_states.shape == (0, 72)
    with pytest.raises(ValueError, match="activation"):
        TritonMoeRunner().run(dispatched, w13, w2, activation="relu6")


def make_batched_case(seed: int, num_experts: int, max_rows: int, dtype: torch.dtype, hidden: int = HIDDEN,
                      inter: int = INTER, device: str = "cpu",
                      ) -> tuple[DispatchOutput, torch.Tensor, torch.Tensor]:  # fmt: skip
    """A batched-format input: random counts in [0, max_rows] with at least one 0 and one max_rows (when there are
    two experts or more), NaN in every row past a count (nothing may read them)."""
    gen = torch.Generator(device).manual_seed(seed)
    counts = torch.randint(0, max_rows + 1, (num_experts,), generator=gen, device=device)
    counts[seed % num_experts] = max_rows
    if num_experts > 1:
        counts[(seed + 1) % num_experts] = 0
    x = torch.randn(num_experts, max_rows, hidden, generator=gen, device=device).to(dtype)
    x[torch.arange(max_rows, device=device)[None, :] >= counts[:, None]] = float("nan")
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=device) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen, device=device) / inter**0.5).to(dtype)
    return DispatchOutput.batched(x, counts.to(torch.int32), handle=object()), w13, w2


def assert_rows_close(out: torch.Tensor, ref: torch.Tensor, counts: torch.Tensor, tol: float, where: str) -> None:
    """The rows below each expert's count equal (rows past it are unspecified)."""
    for e, n in enumerate(counts.tolist()):
        torch.testing.assert_close(out[e, :n], ref[e, :n], rtol=tol, atol=tol, msg=lambda m: f"{where} e{e}: {m}")  # noqa: B023


def check_batched_runner(dtype_name: str) -> None:
    """The Triton runner's batched path against TorchMoeRunner's over experts x max_rows (off the 16-row block),
    SiLU and GELU; the output keeps the input's shape and handle; reruns equal."""
    from pd.moe.runner.triton_runner import TritonMoeRunner

    dtype, tol = getattr(torch, dtype_name), TOLERANCE[dtype_name]
    runner = TritonMoeRunner(SMALL)
    assert set(runner.formats) == set(DispatchFormat)
    for seed, (experts, max_rows) in enumerate(itertools.product((1, 3, 8), (1, 16, 19, 33))):
        activation = "gelu" if seed % 4 == 3 else "silu"
        batched, w13, w2 = make_batched_case(seed, experts, max_rows, dtype)
        out = runner.run(batched, w13, w2, activation)
        ref = TorchMoeRunner().run(batched, w13, w2, activation).hidden_states
        assert out.handle is batched.handle and out.hidden_states.dtype == dtype
        assert out.hidden_states.shape == ref.shape == batched.hidden_states.shape
        assert_rows_close(out.hidden_states, ref, batched.expert_counts, tol, f"{experts}x{max_rows} {activation}")
        again = runner.run(batched, w13, w2, activation).hidden_states
        for e, n in enumerate(batched.expert_counts.tolist()):
            assert torch.equal(again[e, :n], out.hidden_states[e, :n])
    # default block sizes; an empty layout
    batched, w13, w2 = make_batched_case(5, 4, 20, dtype, hidden=72, inter=40)
    ref = TorchMoeRunner().run(batched, w13, w2).hidden_states
    assert_rows_close(TritonMoeRunner().run(batched, w13, w2).hidden_states, ref, batched.expert_counts, tol, "default")
    empty = DispatchOutput.batched(torch.empty(4, 0, 72, dtype=dtype), torch.zeros(4, dtype=torch.int32), None)
    assert TritonMoeRunner().run(empty, w13, w2).hidden_states.shape == (4, 0, 72)


def check_low_latency_layer() -> None:
    """FusedMoE at EP=1 through the torch dispatcher's low_latency mode with the Triton runner (batched format,
    no padding row computed) against the single-rank layer with the reference runner."""
    from pd.moe.context import MoeContext
    from pd.moe.layer import FusedMoE
    from pd.moe.topk import TopKConfig

    layers = []
    for ctx in (MoeContext(), MoeContext(dispatcher="torch", a2a_mode="low_latency", max_tokens_per_rank=12,
                                         runner="triton")):  # fmt: skip
        torch.manual_seed(0)
        layer = FusedMoE(8, HIDDEN, INTER, TopKConfig(top_k=3), ctx)
        layer.w13_weight.normal_(std=HIDDEN**-0.5)
        layer.w2_weight.normal_(std=INTER**-0.5)
        layers.append(layer)
    reference, low_latency = layers
    low_latency.runner.config = SMALL
    for tokens in (1, 5, 12):
        x, logits = torch.randn(tokens, HIDDEN), torch.randn(tokens, 8)
        torch.testing.assert_close(low_latency(x, logits), reference(x, logits), rtol=1e-5, atol=1e-5)


# ---- CPU tests (CI) ----


@needs_triton
def test_alignment_matches_python_oracle_in_interpreter(interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_alignment")


@needs_triton
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
def test_triton_runner_matches_torch_runner_in_interpreter(dtype_name: str, interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_runner", dtype_name)


@needs_triton
def test_triton_runner_defaults_out_of_range_ids_and_empty_batch_in_interpreter(interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_runner_edges")


@needs_triton
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_triton_batched_format_matches_torch_batched_in_interpreter(dtype_name: str,
                                                                    interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_batched_runner", dtype_name)


@needs_triton
def test_low_latency_layer_with_triton_runner_matches_single_rank_layer_in_interpreter(
        interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_low_latency_layer")


def test_triton_is_registered() -> None:
    assert "triton" in runner_names()


@needs_triton
def test_config_table_nearest_token_count_and_default(tmp_path: Any) -> None:
    from pd.moe.runner import fused_moe_kernel as fmk

    name = fmk.config_file_name(8, 96, 64, torch.bfloat16, "NVIDIA H200")
    assert name == "E=8,N=96,K=64,dtype=bfloat16,device=NVIDIA_H200.json"
    table = {str(m): dict(zip(fmk.CONFIG_KEYS, (m_blk, 64, 64, 1, 4, 3), strict=True))
             for m, m_blk in ((1, 16), (64, 32), (1024, 128))}  # fmt: skip
    (tmp_path / name).write_text(json.dumps(table))
    pick = lambda tokens: fmk.get_config(8, 96, 64, torch.bfloat16, tokens, 2, "NVIDIA H200", str(tmp_path))  # noqa: E731
    assert [pick(t)["BLOCK_SIZE_M"] for t in (1, 20, 40, 500, 600, 9000)] == [16, 16, 32, 32, 128, 128]
    assert pick(1) == table["1"]
    small = fmk.get_config(8, 96, 64, torch.bfloat16, 4, 2, "other GPU", str(tmp_path))
    large = fmk.get_config(8, 96, 64, torch.bfloat16, 8192, 8, "other GPU", str(tmp_path))
    assert small == fmk.default_config(4, 2, 8, torch.bfloat16) and small["BLOCK_SIZE_M"] == 16
    assert large["BLOCK_SIZE_M"] >= 64
    # An H100 has no table of its own here: it takes the H200's (one die); another GPU does not.
    assert [fmk.get_config(8, 96, 64, torch.bfloat16, t, 2, "NVIDIA H100 80GB HBM3", str(tmp_path))["BLOCK_SIZE_M"]
            for t in (1, 40, 9000)] == [16, 32, 128]  # fmt: skip
    assert fmk.get_config(8, 96, 64, torch.bfloat16, 1, 2, "NVIDIA A100-SXM4-80GB", str(tmp_path)) == \
        fmk.default_config(1, 2, 8, torch.bfloat16)  # fmt: skip
    own = {"1": dict(zip(fmk.CONFIG_KEYS, (64, 64, 64, 1, 4, 3), strict=True))}
    (tmp_path / fmk.config_file_name(8, 96, 64, torch.bfloat16, "NVIDIA H100 80GB HBM3")).write_text(json.dumps(own))
    fmk.load_config_table.cache_clear()  # it remembers that the file was missing
    assert fmk.get_config(8, 96, 64, torch.bfloat16, 1, 2, "NVIDIA H100 80GB HBM3", str(tmp_path)) == own["1"]
    bad = tmp_path / fmk.config_file_name(8, 96, 64, torch.float16, "x")
    bad.write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16}}))
    with pytest.raises(ValueError, match="BLOCK_SIZE_N"):
        fmk.get_config(8, 96, 64, torch.float16, 1, 1, "x", str(tmp_path))


# ---- GPU tests ----

GPU_CASES = [
    # tokens, top_k, experts, hidden, inter, foreign share, dtype
    (1, 1, 8, 1024, 512, 0.0, "bfloat16"),
    (7, 4, 64, 2048, 768, 0.3, "bfloat16"),
    (64, 8, 128, 2048, 768, 0.0, "bfloat16"),  # Qwen3-30B-A3B decode
    (64, 8, 32, 7168, 2048, 0.875, "bfloat16"),  # DeepSeek-V3 decode at EP=8
    (256, 8, 256, 1024, 256, 0.5, "bfloat16"),
    (2048, 6, 64, 1536, 640, 0.1, "float32"),
    (3000, 2, 16, 1000, 300, 0.2, "float16"),  # sizes off every block
    (8192, 8, 128, 2048, 768, 0.0, "bfloat16"),  # Qwen3-30B-A3B prefill
    (8192, 1, 8, 512, 384, 0.0, "bfloat16"),
]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_triton_runner_matches_torch_runner(case: tuple[int, int, int, int, int, float, str]) -> None:
    from pd.moe.runner.triton_runner import TritonMoeRunner

    tokens, top_k, experts, hidden, inter, foreign, dtype_name = case
    dispatched, w13, w2 = make_case(tokens + experts, tokens, top_k, experts, getattr(torch, dtype_name), hidden,
                                    inter, foreign, device="cuda")  # fmt: skip
    out = TritonMoeRunner().run(dispatched, w13, w2).hidden_states
    ref = TorchMoeRunner().run(dispatched, w13, w2).hidden_states
    if dtype_name == "float32":  # ieee float32 dots on both sides
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    else:
        assert _rel_l2(out, ref) < (1e-2 if dtype_name == "bfloat16" else 2e-3), _rel_l2(out, ref)
    assert not out[(dispatched.topk_ids < 0).all(dim=1)].any()


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_fused_moe_forward_with_triton_runner_has_no_host_sync() -> None:
    from pd.moe.context import MoeContext
    from pd.moe.layer import FusedMoE
    from pd.moe.topk import TopKConfig

    torch.manual_seed(0)
    layer = FusedMoE(64, 1024, 512, TopKConfig(top_k=8), MoeContext(runner="triton"))
    layer.to(device="cuda", dtype=torch.bfloat16)
    layer.w13_weight.normal_(std=1024**-0.5)
    layer.w2_weight.normal_(std=512**-0.5)
    layer.finalize_weights()
    inputs = [(torch.randn(t, 1024, device="cuda", dtype=torch.bfloat16), torch.randn(t, 64, device="cuda"))
              for t in (1, 33, 512)]  # fmt: skip
    eager = [layer(x, logits) for x, logits in inputs]  # compiles the kernels (outside the check)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = [layer(x, logits) for x, logits in inputs]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(again, eager, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("runner_name", ["torch", "triton"])
def test_gpu_bf16_outputs_are_bit_identical_across_runs(runner_name: str) -> None:
    from pd.moe.runner import get_runner

    dispatched, w13, w2 = make_case(3, 4096, 8, 64, torch.bfloat16, 2048, 768, 0.2, device="cuda")
    first = get_runner(runner_name).run(dispatched, w13, w2).hidden_states
    second = get_runner(runner_name).run(dispatched, w13, w2).hidden_states
    assert torch.equal(first, second)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_triton_runner_cuda_graph_replay_equals_eager_on_new_inputs() -> None:
    from pd.moe.runner.triton_runner import TritonMoeRunner

    runner = TritonMoeRunner()
    static, w13, w2 = make_case(0, 64, 8, 128, torch.bfloat16, 2048, 768, 0.5, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compilation) off the capture
        runner.run(static, w13, w2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = runner.run(static, w13, w2).hidden_states
    for seed in (1, 2, 3):
        fresh, _, _ = make_case(seed, 64, 8, 128, torch.bfloat16, 2048, 768, 0.25 * seed, device="cuda")
        static.hidden_states.copy_(fresh.hidden_states)
        static.topk_ids.copy_(fresh.topk_ids)
        static.topk_weights.copy_(fresh.topk_weights)
        graph.replay()
        assert torch.equal(captured, runner.run(fresh, w13, w2).hidden_states)


GPU_BATCHED_CASES = [
    # experts, max_rows, hidden, inter, dtype
    (32, 1024, 7168, 2048, "bfloat16"),  # DeepSeek-V3 decode at EP=8, 128 tokens per rank
    (128, 128, 2048, 768, "bfloat16"),  # Qwen3-30B-A3B decode at EP=1
    (8, 300, 1000, 300, "float16"),  # sizes off every block
    (16, 200, 1536, 640, "float32"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_BATCHED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_triton_batched_format_matches_torch_batched(case: tuple[int, int, int, int, str]) -> None:
    from pd.moe.runner.triton_runner import TritonMoeRunner

    experts, max_rows, hidden, inter, dtype_name = case
    batched, w13, w2 = make_batched_case(experts + max_rows, experts, max_rows, getattr(torch, dtype_name), hidden,
                                         inter, device="cuda")  # fmt: skip
    out = TritonMoeRunner().run(batched, w13, w2).hidden_states
    ref = TorchMoeRunner().run(batched, w13, w2).hidden_states
    assert out.shape == ref.shape
    for e, n in enumerate(batched.expert_counts.tolist()):
        if dtype_name == "float32":
            torch.testing.assert_close(out[e, :n], ref[e, :n], rtol=1e-4, atol=1e-4)
        elif n:
            assert _rel_l2(out[e, :n], ref[e, :n]) < (1e-2 if dtype_name == "bfloat16" else 2e-3), (e, n)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_triton_batched_cuda_graph_replay_equals_eager_on_new_rows_and_counts() -> None:
    from pd.moe.runner.triton_runner import TritonMoeRunner

    runner = TritonMoeRunner()
    static, w13, w2 = make_batched_case(0, 32, 1024, torch.bfloat16, 7168, 2048, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel compilation) off the capture
        runner.run(static, w13, w2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = runner.run(static, w13, w2).hidden_states
    for seed in (1, 2, 3):
        fresh, _, _ = make_batched_case(seed, 32, 1024, torch.bfloat16, 7168, 2048, device="cuda")
        static.hidden_states.copy_(fresh.hidden_states)
        static.expert_counts.copy_(fresh.expert_counts)
        graph.replay()
        eager = runner.run(fresh, w13, w2).hidden_states
        for e, n in enumerate(fresh.expert_counts.tolist()):
            assert torch.equal(captured[e, :n], eager[e, :n]), (seed, e, n)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_low_latency_fused_moe_with_triton_has_no_host_sync_and_replays_in_a_graph() -> None:
    """FusedMoE at EP=1 through the torch dispatcher's low_latency mode and the Triton runner: close to the
    single-rank layer, no host sync, and a captured forward replayed on new inputs equals eager."""
    from pd.moe.context import MoeContext
    from pd.moe.layer import FusedMoE
    from pd.moe.topk import TopKConfig

    layers = []
    for ctx in (MoeContext(), MoeContext(dispatcher="torch", a2a_mode="low_latency", max_tokens_per_rank=128,
                                         runner="triton")):  # fmt: skip
        torch.manual_seed(0)
        layer = FusedMoE(64, 2048, 768, TopKConfig(top_k=8), ctx).to(device="cuda", dtype=torch.bfloat16)
        layer.w13_weight.normal_(std=2048**-0.5)
        layer.w2_weight.normal_(std=768**-0.5)
        layer.finalize_weights()
        layers.append(layer)
    reference, low_latency = layers
    inputs = [(torch.randn(t, 2048, device="cuda", dtype=torch.bfloat16), torch.randn(t, 64, device="cuda"))
              for t in (1, 37, 128)]  # fmt: skip
    eager = [low_latency(x, logits) for x, logits in inputs]  # compiles the kernels (outside the check)
    for got, (x, logits) in zip(eager, inputs, strict=True):
        assert _rel_l2(got, reference(x, logits)) < 1e-2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = [low_latency(x, logits) for x, logits in inputs]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(again, eager, strict=True):
        assert torch.equal(a, b)
    static_x, static_logits = (t.clone() for t in inputs[2])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = low_latency(static_x, static_logits)
    for x, logits in (inputs[2], (torch.randn_like(static_x), torch.randn_like(static_logits))):
        static_x.copy_(x)
        static_logits.copy_(logits)
        graph.replay()
        assert torch.equal(captured, low_latency(x, logits))
