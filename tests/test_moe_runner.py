"""TorchMoeRunner against a loop-over-tokens reference written here, in both dispatch formats (the batched one
also against the standard one on the same routed tokens), the runner registry, and FusedMoE's format check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pd.moe.runner as runner_registry
from pd.moe.context import MoeContext
from pd.moe.dispatcher.base import DispatchFormat, DispatchOutput, batch_by_expert, sum_expert_rows
from pd.moe.layer import FusedMoE
from pd.moe.runner import get_runner
from pd.moe.runner.cpu_packed import CpuPackedMoeRunner
from pd.moe.runner.torch_ref import TorchMoeRunner
from pd.moe.topk import TopKConfig


def _naive_moe(
    hidden_NH: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Float32 oracle: for every token and slot, run its expert as a plain MLP and accumulate."""
    num_tokens, top_k = ids_NK.shape
    inter = w2.shape[2]
    out = torch.zeros(num_tokens, hidden_NH.shape[1], dtype=torch.float32)
    for t in range(num_tokens):
        x = hidden_NH[t].float()
        for k in range(top_k):
            e = int(ids_NK[t, k])
            if e < 0:
                continue
            gate_up = w13[e].float() @ x
            y = w2[e].float() @ (F.silu(gate_up[:inter]) * gate_up[inter:])
            out[t] += float(weights_NK[t, k]) * y
    return out


def random_case(
    seed: int,
    num_tokens: int,
    top_k: int,
    num_experts: int,
    used_experts: int,
    foreign_frac: float,
    dtype: torch.dtype,
    hidden: int = 32,
    inter: int = 24,
) -> tuple[DispatchOutput, torch.Tensor, torch.Tensor]:
    """Distinct ids per token drawn from the first ``used_experts`` experts (the rest get zero tokens);
    a ``foreign_frac`` share of slots is -1 (owned by another rank)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.rand(num_tokens, used_experts, generator=gen).argsort(dim=-1)[:, :top_k]
    expert_of = torch.randperm(num_experts, generator=gen)[:used_experts]  # which experts are the used ones
    ids = expert_of[perm]
    ids = ids.masked_fill(torch.rand(num_tokens, top_k, generator=gen) < foreign_frac, -1)
    weights = torch.rand(num_tokens, top_k, generator=gen)
    hidden_NH = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    return DispatchOutput(hidden_NH, ids.to(torch.int64), weights, handle=object()), w13, w2


CASES = [
    # num_tokens, top_k, num_experts, used_experts, foreign_frac
    (1, 1, 4, 4, 0.0),
    (1, 8, 16, 8, 0.0),
    (3, 2, 32, 5, 0.0),  # most experts receive no token
    (300, 8, 64, 64, 0.0),
    (300, 1, 8, 8, 0.0),
    (300, 8, 16, 12, 0.5),  # half the slots belong to other ranks
    (17, 4, 8, 8, 0.3),
]


@pytest.mark.parametrize("use_grouped_mm", [None, True, False])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES)
def test_runner_matches_loop_reference_fp32(
    case: tuple[int, int, int, int, float], seed: int, use_grouped_mm: bool | None
) -> None:
    dispatched, w13, w2 = random_case(seed, *case, dtype=torch.float32)
    out = TorchMoeRunner(use_grouped_mm=use_grouped_mm).run(dispatched, w13, w2)
    ref = _naive_moe(dispatched.hidden_states, dispatched.topk_ids, dispatched.topk_weights, w13, w2)
    assert out.hidden_states.dtype == torch.float32 and out.handle is dispatched.handle
    torch.testing.assert_close(out.hidden_states, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_grouped_mm", [None, True, False])
@pytest.mark.parametrize("case", CASES)
def test_runner_matches_loop_reference_bf16(
    case: tuple[int, int, int, int, float], use_grouped_mm: bool | None
) -> None:
    dispatched, w13, w2 = random_case(5, *case, dtype=torch.bfloat16)
    out = TorchMoeRunner(use_grouped_mm=use_grouped_mm).run(dispatched, w13, w2)
    ref = _naive_moe(dispatched.hidden_states, dispatched.topk_ids, dispatched.topk_weights, w13, w2)
    assert out.hidden_states.dtype == torch.bfloat16
    # bf16 rounding of the intermediate activations and of each per-expert partial sum
    torch.testing.assert_close(out.hidden_states.float(), ref, rtol=3e-2, atol=3e-2)


def test_grouped_mm_and_expert_loop_agree_exactly() -> None:
    dispatched, w13, w2 = random_case(9, 64, 4, 32, 20, 0.2, dtype=torch.float32, hidden=128, inter=96)
    a = TorchMoeRunner(use_grouped_mm=True).run(dispatched, w13, w2).hidden_states
    b = TorchMoeRunner(use_grouped_mm=False).run(dispatched, w13, w2).hidden_states
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_all_slots_foreign_gives_zeros() -> None:
    dispatched, w13, w2 = random_case(2, 9, 2, 4, 4, 1.0, dtype=torch.float32)
    out = TorchMoeRunner().run(dispatched, w13, w2).hidden_states
    assert out.shape == dispatched.hidden_states.shape
    assert torch.count_nonzero(out) == 0


def test_out_of_range_local_id_rejected() -> None:
    dispatched, w13, w2 = random_case(3, 5, 2, 4, 4, 0.0, dtype=torch.float32)
    dispatched.topk_ids[0, 0] = 4
    with pytest.raises(ValueError, match="num_local_experts"):
        TorchMoeRunner().run(dispatched, w13, w2)


def test_unknown_activation_rejected() -> None:
    dispatched, w13, w2 = random_case(3, 5, 2, 4, 4, 0.0, dtype=torch.float32)
    with pytest.raises(ValueError, match="activation"):
        TorchMoeRunner().run(dispatched, w13, w2, activation="relu6")


def test_registry_builds_torch_runner_and_rejects_unknown() -> None:
    assert isinstance(get_runner("torch"), TorchMoeRunner)
    with pytest.raises(ValueError, match="torch"):
        get_runner("triton-nonexistent")


# ---- the batched format --------------------------------------------------------------------------------------


def _batched(dispatched: DispatchOutput, num_experts: int) -> tuple[DispatchOutput, object]:
    x_EMH, counts_E, rows = batch_by_expert(dispatched.hidden_states, dispatched.topk_ids, dispatched.topk_weights,
                                            num_experts)  # fmt: skip
    return DispatchOutput.batched(x_EMH, counts_E, dispatched.handle), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("use_grouped_mm", [None, True, False])
@pytest.mark.parametrize("case", CASES)
def test_batched_format_equals_standard_format_bit_for_bit(
    case: tuple[int, int, int, int, float], use_grouped_mm: bool | None, dtype: torch.dtype
) -> None:
    """The same routed tokens, grouped per expert (batch_by_expert), through the reference's masked expert loop
    and weighted back (sum_expert_rows): the standard path's bits."""
    dispatched, w13, w2 = random_case(11, *case, dtype=dtype)
    standard = TorchMoeRunner(use_grouped_mm=use_grouped_mm).run(dispatched, w13, w2).hidden_states
    batched, rows = _batched(dispatched, w13.shape[0])
    out = TorchMoeRunner(use_grouped_mm=use_grouped_mm).run(batched, w13, w2)
    assert out.handle is dispatched.handle and out.hidden_states.shape == batched.hidden_states.shape
    assert torch.equal(sum_expert_rows(out.hidden_states, rows), standard)


def test_batched_layout_rows_per_expert_in_slot_then_token_order() -> None:
    """batch_by_expert against a Python oracle: expert e's rows are the tokens with a slot on e in (slot, token)
    order, the counts say how many, every local slot points at its token's row; a token with two slots on one
    expert gets one row, which both slots point at."""
    dispatched, _, _ = random_case(4, 23, 3, 6, 6, 0.3, dtype=torch.float32)
    ids = dispatched.topk_ids
    ids[0] = torch.tensor([2, 2, -1])
    ids[1] = torch.tensor([-1, 5, 5])
    x_EMH, counts_E, rows = batch_by_expert(dispatched.hidden_states, ids, dispatched.topk_weights, 6)
    assert x_EMH.shape == (6, 23, 32) and counts_E.dtype == torch.int32 and rows.max_rows == 23
    for e in range(6):
        order = []
        for k in range(3):
            order += [t for t in range(23) if ids[t, k] == e and t not in order]
        assert counts_E[e] == len(order)
        assert torch.equal(x_EMH[e, : len(order)], dispatched.hidden_states[order])
        for t in order:
            for k in range(3):
                want = e * 23 + order.index(t) if ids[t, k] == e else None
                assert want is None or rows.slot_NK[t, k] == want
    assert (rows.slot_NK[ids < 0] == -1).all() and rows.slot_NK[0, 0] == rows.slot_NK[0, 1]
    assert torch.equal(rows.weights_NK, dispatched.topk_weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batched_runner_matches_loop_reference_with_empty_and_full_experts(dtype: torch.dtype) -> None:
    """Counts 0, 1, some and max_rows: rows below the count are the expert's unweighted MLP output, the rows past it
    zeros (garbage in them is not read)."""
    gen = torch.Generator().manual_seed(8)
    experts, max_rows, hidden, inter = 5, 9, 32, 24
    x_EMH = torch.randn(experts, max_rows, hidden, generator=gen).to(dtype)
    counts = torch.tensor([0, 9, 1, 4, 9], dtype=torch.int32)
    x_EMH[0] = float("nan")  # past every count
    x_EMH[3, 4:] = float("inf")
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    for runner in (TorchMoeRunner(), CpuPackedMoeRunner()):
        out = runner.run(DispatchOutput.batched(x_EMH, counts, None), w13, w2).hidden_states
        assert out.shape == x_EMH.shape and out.dtype == dtype
        for e, n in enumerate(counts.tolist()):
            ones = torch.ones(n, 1)
            ref = _naive_moe(x_EMH[e, :n], torch.full((n, 1), e), ones, w13, w2)
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(out[e, :n].float(), ref, rtol=tol, atol=tol)
            assert not out[e, n:].any()
    with pytest.raises(ValueError, match="max_rows=9"):
        TorchMoeRunner().run(DispatchOutput.batched(x_EMH, counts + 1, None), w13, w2)


def test_cpu_packed_runner_takes_the_batched_format_through_the_reference() -> None:
    dispatched, w13, w2 = random_case(6, 40, 4, 16, 16, 0.3, dtype=torch.float32)
    batched, rows = _batched(dispatched, 16)
    runner = CpuPackedMoeRunner()
    runner.prepare_weights(w13, w2)
    got = sum_expert_rows(runner.run(batched, w13, w2).hidden_states, rows)
    torch.testing.assert_close(got, runner.run(dispatched, w13, w2).hidden_states, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, TorchMoeRunner().run(dispatched, w13, w2).hidden_states)


def _layer(ctx: MoeContext) -> FusedMoE:
    torch.manual_seed(0)
    layer = FusedMoE(8, 32, 16, TopKConfig(top_k=3), ctx)
    layer.w13_weight.normal_(std=32**-0.5)
    layer.w2_weight.normal_(std=16**-0.5)
    layer.finalize_weights()
    return layer


@pytest.mark.parametrize("runner_name", ["torch", "cpu_packed"])
def test_fused_moe_low_latency_torch_dispatch_equals_the_single_rank_layer(runner_name: str) -> None:
    """EP=1 through the torch dispatcher's low_latency mode (batched format, padding rows never computed): the
    single_rank layer's output bit for bit (torch runner), or to rounding (cpu_packed's standard path)."""
    reference = _layer(MoeContext(runner=runner_name))
    ll = _layer(MoeContext(dispatcher="torch", a2a_mode="low_latency", max_tokens_per_rank=16, runner=runner_name))
    assert ll.dispatcher("low_latency").output_format == DispatchFormat.BATCHED
    for tokens in (1, 7, 16):
        x, logits = torch.randn(tokens, 32), torch.randn(tokens, 8)
        got, want = ll(x, logits), reference(x, logits)
        if runner_name == "torch":
            assert torch.equal(got, want)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _StandardOnlyRunner(TorchMoeRunner):
    formats = (DispatchFormat.STANDARD,)


def test_fused_moe_refuses_a_runner_without_the_dispatchers_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(runner_registry._RUNNERS, "standard_only", (__name__, "_StandardOnlyRunner"))
    for name in ("torch", "cpu_packed"):  # triton's: tests/test_moe_triton.py
        assert set(get_runner(name).formats) == set(DispatchFormat)
    _layer(MoeContext(dispatcher="torch", a2a_mode="normal", runner="standard_only"))  # normal: standard rows
    with pytest.raises(ValueError, match="standard_only takes standard dispatch outputs.*low_latency mode.*batched"):
        _layer(MoeContext(dispatcher="torch", a2a_mode="low_latency", runner="standard_only"))
