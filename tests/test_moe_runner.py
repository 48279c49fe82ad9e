"""TorchMoeRunner against a loop-over-tokens reference written here, plus the runner registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pd.moe.dispatcher.base import DispatchOutput
from pd.moe.runner import get_runner
from pd.moe.runner.torch_ref import TorchMoeRunner


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
