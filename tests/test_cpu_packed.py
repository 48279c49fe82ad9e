"""The CPU fast path: oneDNN-packed linears against F.linear, the cpu_packed MoE runner against the torch reference
runner, and the whole engine on that path against transformers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pd.engine.io import SamplingParams
from pd.engine.llm import LLM
from pd.layers import cpu_grouped_gemv
from pd.layers.cpu_packed import PackedLinear, mkldnn_packable, pack_linears_for_cpu
from pd.moe.dispatcher.base import DispatchOutput
from pd.moe.layer import FusedMoE
from pd.moe.runner import get_runner
from pd.moe.runner.cpu_packed import CpuPackedMoeRunner
from pd.moe.runner.torch_ref import TorchMoeRunner
from pd.server_args import resolve_moe_runner
from tests.test_moe_runner import random_case
from tests.tiny_checkpoints import load_hf, make_checkpoint

needs_mkldnn = pytest.mark.skipif(not mkldnn_packable(torch.float32, "cpu"), reason="oneDNN is not available")
BF16_OK = mkldnn_packable(torch.bfloat16, "cpu")


# ---- PackedLinear ----


@needs_mkldnn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead_shape", [(1,), (2,), (17,), (300,), (3, 5)])
def test_packed_linear_matches_f_linear_fp32(lead_shape: tuple[int, ...], bias: bool) -> None:
    gen = torch.Generator().manual_seed(sum(lead_shape) + bias)
    linear = nn.Linear(96, 80, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 96, generator=gen) / 96**0.5)
        if bias:
            linear.bias.copy_(torch.randn(80, generator=gen))
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(*lead_shape, 96, generator=gen)
    with torch.inference_mode():
        out = packed(x)
    ref = F.linear(x, linear.weight, linear.bias)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not BF16_OK, reason="oneDNN cannot pack bfloat16 on this CPU")
def test_packed_linear_matches_f_linear_bf16() -> None:
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(128, 64, dtype=torch.bfloat16)
    x = torch.randn(7, 128, generator=gen).bfloat16()
    with torch.inference_mode():
        out = PackedLinear.from_linear(linear)(x)
    ref = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@needs_mkldnn
def test_packed_linear_follows_in_place_weight_updates() -> None:
    linear = nn.Linear(32, 48, bias=False)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(4, 32)
    with torch.no_grad():
        linear.weight.mul_(-2.0)  # shared parameter: the packed copy is now stale
    with torch.inference_mode():
        out = packed(x)
    torch.testing.assert_close(out, F.linear(x, linear.weight), rtol=1e-5, atol=1e-5)


@needs_mkldnn
def test_packed_linear_with_autograd_uses_plain_linear() -> None:
    linear = nn.Linear(16, 8)
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(3, 16, requires_grad=True)
    packed(x).sum().backward()
    assert x.grad is not None and linear.weight.grad is not None
    torch.testing.assert_close(x.grad, linear.weight.sum(0).expand(3, 16).detach())


@needs_mkldnn
def test_pack_linears_swaps_packable_linears_and_keeps_parameters() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4, bias=False)))
    model.append(nn.Linear(4, 4, dtype=torch.float16))  # oneDNN cannot pack float16 here: left alone
    before = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    x = torch.randn(5, 8)
    with torch.inference_mode():
        ref = model[2](model[1](model[0](x)))
    assert pack_linears_for_cpu(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert type(model[3]) is nn.Linear
    assert list(model.state_dict()) == keys
    assert all(p is before[name] for name, p in model.named_parameters())
    with torch.inference_mode():
        out = model[2](model[1](model[0](x)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- grouped GEMV kernel ----

needs_kernel = pytest.mark.skipif(not cpu_grouped_gemv.available(), reason="no C compiler to build the kernel")


@needs_kernel
@pytest.mark.parametrize("in_features", [1, 33, 64, 512])  # odd K takes the kernel's tail step
@pytest.mark.parametrize("rows_per_expert", [(0, 1, 2, 3), (4, 0, 9, 5), (1,), (0, 0, 0)])
def test_grouped_gemv_matches_per_expert_linear(in_features: int, rows_per_expert: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(in_features + sum(rows_per_expert))
    num_experts, out_features = len(rows_per_expert), 48
    weight_ENK = torch.randn(num_experts, out_features, in_features, generator=gen)
    counts = torch.tensor(rows_per_expert, dtype=torch.int64)
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    x_MK = torch.randn(int(counts.sum()), in_features, generator=gen)
    out = cpu_grouped_gemv.grouped_gemv(x_MK, cpu_grouped_gemv.pack(weight_ENK), row_offsets)
    ref = torch.cat([F.linear(rows, w) for rows, w in zip(x_MK.split(rows_per_expert), weight_ENK, strict=True)])
    assert out.shape == (x_MK.shape[0], out_features)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * in_features**0.5)


@needs_kernel
def test_grouped_gemv_rejects_what_it_cannot_run() -> None:
    packed = cpu_grouped_gemv.pack(torch.randn(2, 16, 8))
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_grouped_gemv.pack(torch.randn(2, 24, 8))
    with pytest.raises(ValueError, match="float32"):
        cpu_grouped_gemv.pack(torch.randn(2, 16, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x must be float32"):
        cpu_grouped_gemv.grouped_gemv(torch.randn(3, 9), packed, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="rise from 0 to M=3"):
        cpu_grouped_gemv.grouped_gemv(x, packed, torch.tensor([0, 4, 3]))  # the kernel would read row 3
    with pytest.raises(ValueError, match="rise from 0 to M=3"):
        cpu_grouped_gemv.grouped_gemv(x, packed, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="int64"):
        cpu_grouped_gemv.grouped_gemv(x, packed, torch.tensor([0, 1, 3], dtype=torch.int32))


def test_grouped_gemv_without_a_compiler_is_unavailable_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    cpu_grouped_gemv._library.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert not cpu_grouped_gemv.available()
        assert "no C compiler" in caplog.text
        with pytest.raises(RuntimeError, match="not available"):
            cpu_grouped_gemv.grouped_gemv(torch.randn(1, 8), torch.zeros(1, 1, 8, 16), torch.tensor([0, 1]))
    finally:
        cpu_grouped_gemv._library.cache_clear()


# ---- cpu_packed MoE runner ----


def _routing_case(*args: Any, **kwargs: Any) -> tuple[DispatchOutput, torch.Tensor, torch.Tensor]:
    """The runner tests' random routing (distinct ids per token, unused experts, -1 slots), at wider shapes."""
    return random_case(*args, **{"hidden": 64, "inter": 40, **kwargs})


ROUTING_CASES = [
    # num_tokens, top_k, num_experts, used_experts, foreign_frac
    (1, 1, 4, 4, 0.0),
    (1, 4, 32, 8, 0.0),
    (3, 2, 32, 5, 0.0),  # most experts receive no token
    (16, 4, 32, 32, 0.0),  # a decode batch
    (17, 4, 8, 8, 0.3),  # some slots on other ranks
    (300, 8, 64, 64, 0.0),
    (300, 8, 16, 12, 0.5),
]


def _prepared(w13: torch.Tensor, w2: torch.Tensor, path: str | None = None) -> CpuPackedMoeRunner:
    runner = CpuPackedMoeRunner(path=path)
    runner.prepare_weights(w13, w2)
    return runner


# The fp32 paths; "gemv" runs where the grouped GEMV kernel builds (any machine with a C compiler).
FP32_PATHS = [
    None,
    pytest.param("gemv", marks=pytest.mark.skipif(not cpu_grouped_gemv.available(), reason="no C compiler")),
    "per_expert",
    "dense",
]


@needs_mkldnn
@pytest.mark.parametrize("path", FP32_PATHS)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("case", ROUTING_CASES)
def test_cpu_packed_runner_matches_torch_runner_fp32(
    case: tuple[int, int, int, int, float], activation: str, path: str | None
) -> None:
    dispatched, w13, w2 = _routing_case(11, *case, dtype=torch.float32)
    with torch.inference_mode():
        out = _prepared(w13, w2, path).run(dispatched, w13, w2, activation)
        ref = TorchMoeRunner(use_grouped_mm=False).run(dispatched, w13, w2, activation)
    assert out.handle is dispatched.handle and out.hidden_states.dtype == torch.float32
    torch.testing.assert_close(out.hidden_states, ref.hidden_states, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not BF16_OK, reason="oneDNN cannot pack bfloat16 on this CPU")
@pytest.mark.parametrize("path", [None, "per_expert", "dense"])
@pytest.mark.parametrize("case", ROUTING_CASES)
def test_cpu_packed_runner_matches_torch_runner_bf16(case: tuple[int, int, int, int, float], path: str | None) -> None:
    dispatched, w13, w2 = _routing_case(12, *case, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = _prepared(w13, w2, path).run(dispatched, w13, w2)
        ref = TorchMoeRunner(use_grouped_mm=False).run(dispatched, w13, w2)
    assert out.hidden_states.dtype == torch.bfloat16
    torch.testing.assert_close(out.hidden_states.float(), ref.hidden_states.float(), rtol=3e-2, atol=3e-2)


@needs_mkldnn
@pytest.mark.parametrize("path", FP32_PATHS)
def test_cpu_packed_runner_all_slots_foreign_gives_zeros(path: str | None) -> None:
    dispatched, w13, w2 = _routing_case(4, 9, 2, 4, 4, 1.0, dtype=torch.float32)
    out = _prepared(w13, w2, path).run(dispatched, w13, w2).hidden_states
    assert out.shape == dispatched.hidden_states.shape and torch.count_nonzero(out) == 0


@needs_mkldnn
@pytest.mark.parametrize("path", FP32_PATHS)
def test_cpu_packed_runner_repacks_weights_changed_after_prepare(path: str | None) -> None:
    dispatched, w13, w2 = _routing_case(5, 12, 2, 8, 8, 0.0, dtype=torch.float32)
    runner = _prepared(w13, w2, path)
    w13.mul_(0.5)
    w2[3].neg_()
    out = runner.run(dispatched, w13, w2).hidden_states
    ref = TorchMoeRunner(use_grouped_mm=False).run(dispatched, w13, w2).hidden_states
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_cpu_packed_runner_falls_back_to_torch_for_unpackable_dtype() -> None:
    dispatched, w13, w2 = _routing_case(6, 10, 2, 8, 6, 0.2, dtype=torch.float16)
    out = _prepared(w13, w2).run(dispatched, w13, w2).hidden_states
    ref = TorchMoeRunner().run(dispatched, w13, w2).hidden_states
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@needs_mkldnn
@pytest.mark.parametrize("path", FP32_PATHS)
def test_cpu_packed_runner_rejects_bad_ids_and_activation(path: str | None) -> None:
    dispatched, w13, w2 = _routing_case(7, 5, 2, 4, 4, 0.0, dtype=torch.float32)
    runner = _prepared(w13, w2, path)
    with pytest.raises(ValueError, match="activation"):
        runner.run(dispatched, w13, w2, activation="relu6")
    dispatched.topk_ids[0, 0] = 4
    with pytest.raises(ValueError, match="num_local_experts"):
        runner.run(dispatched, w13, w2)


def test_registry_and_auto_resolution() -> None:
    assert isinstance(get_runner("cpu_packed"), CpuPackedMoeRunner)
    assert resolve_moe_runner("auto", "cpu") == "cpu_packed"
    assert resolve_moe_runner("auto", "cuda") == "triton"
    assert resolve_moe_runner("torch", "cpu") == "torch"


# ---- the engine on the CPU fast path against transformers ----


@pytest.fixture(scope="module")
def qwen3_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LLM]:
    path = make_checkpoint("qwen3_moe", str(tmp_path_factory.mktemp("qwen3_moe_packed")), seed=131)
    return load_hf(path), LLM(path, chunked_prefill_size=32, page_size=4, moe_runner="cpu_packed")


def _prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


@needs_mkldnn
def test_engine_runs_on_packed_weights(qwen3_pair: tuple[Any, LLM]) -> None:
    _, llm = qwen3_pair
    model = llm.runner.model
    runners = [m.runner for m in model.modules() if isinstance(m, FusedMoE)]
    assert runners and all(isinstance(r, CpuPackedMoeRunner) and r._fallback is None for r in runners)
    assert isinstance(model.lm_head, PackedLinear)
    assert not any(type(m) is nn.Linear for m in model.modules())


@needs_mkldnn
def test_engine_prefill_logits_match_transformers(qwen3_pair: tuple[Any, LLM]) -> None:
    hf, llm = qwen3_pair
    for ids in _prompts((1, 9, 70), seed=21):  # 70 spans three chunks of 32
        ours = llm.prefill_logits(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@needs_mkldnn
def test_engine_batched_greedy_matches_transformers(qwen3_pair: tuple[Any, LLM]) -> None:
    hf, llm = qwen3_pair
    prompts = _prompts((3, 40, 17, 25, 8), seed=22)
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0.0))
    for ids, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
        assert out == ref


def _path_taken(runner: CpuPackedMoeRunner, dispatched: DispatchOutput, w13: torch.Tensor, w2: torch.Tensor,
                monkeypatch: pytest.MonkeyPatch) -> str:
    taken: list[str] = []
    for name, method in (("dense", "_run_dense"), ("gemv", "_run_gemv")):
        original = getattr(runner, method)
        monkeypatch.setattr(runner, method, lambda *args, n=name, f=original: taken.append(n) or f(*args))
    runner.run(dispatched, w13, w2)
    return taken[0] if taken else "per_expert"


@needs_mkldnn
@pytest.mark.parametrize("case, path", [((16, 4, 32, 32, 0.0), "dense"), ((3, 2, 32, 5, 0.0), "per_expert"),
                                        ((300, 8, 64, 64, 0.0), "per_expert")])
def test_auto_without_the_kernel_takes_dense_only_for_small_batches_hitting_most_experts(
    case: tuple[int, int, int, int, float], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_grouped_gemv, "available", lambda: False)
    dispatched, w13, w2 = _routing_case(8, *case, dtype=torch.float32)
    runner = _prepared(w13, w2)
    assert runner._w13_panels is None
    assert _path_taken(runner, dispatched, w13, w2, monkeypatch) == path


@needs_mkldnn
@pytest.mark.skipif(not cpu_grouped_gemv.available(), reason="no C compiler")
@pytest.mark.parametrize("case, path", [((16, 4, 32, 32, 0.0), "gemv"), ((3, 2, 32, 5, 0.0), "gemv"),
                                        ((33, 4, 32, 32, 0.0), "per_expert"), ((300, 8, 64, 64, 0.0), "per_expert"),
                                        ((40, 4, 32, 32, 0.5), "gemv")])  # half the slots foreign: 80 local rows
def test_auto_with_the_kernel_takes_gemv_while_experts_get_few_rows(
    case: tuple[int, int, int, int, float], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatched, w13, w2 = _routing_case(9, *case, dtype=torch.float32)
    runner = _prepared(w13, w2)
    assert runner._w13_dense is None  # the dense copy is not made when the kernel takes its batches
    assert _path_taken(runner, dispatched, w13, w2, monkeypatch) == path


def test_unknown_path_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown cpu_packed path"):
        CpuPackedMoeRunner(path="fast")
