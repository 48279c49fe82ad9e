"""EPLB moves FP8 experts kept in memory together with their block scales (pd.moe.eplb.migrate carries tensors of
several dtypes as bytes): MoE layers on two gloo ranks, rebalanced so that slots change rank, still match the
one-rank layer loaded from the same FP8 tensors.

The layers' runner computes with the FP8 weights and scales on every call (as the Triton runner does, but in torch,
so this runs on CPU): a slot whose weights moved without their scales would compute with another expert's scales.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pd.moe.context import EplbConfig, MoeContext
from pd.moe.dispatcher.base import CombineInput, DispatchOutput
from pd.moe.eplb.manager import EplbManager
from pd.moe.eplb.migrate import migrate, plan_moves
from pd.moe.layer import FusedMoE
from pd.moe.runner import ExpertScales
from pd.moe.runner.torch_ref import TorchMoeRunner
from pd.moe.topk import TopKConfig
from pd.quant.fp8 import FP8_DTYPE, block_quant
from tests.test_dispatchers import _spawn
from tests.test_moe_triton_fp8 import dequantize_experts

HIDDEN, INTER, EXPERTS, TOP_K, BLOCK = 16, 16, 8, 3, (8, 8)


class DequantizingRunner(TorchMoeRunner):
    """The reference runner on FP8 experts: dequantizes the weights with the scales it is handed on every call."""

    block_fp8 = True

    def run(self, dispatch_out: DispatchOutput, w13_EXH: torch.Tensor, w2_EHI: torch.Tensor, activation: str = "silu",
            scales: ExpertScales | None = None) -> CombineInput:  # fmt: skip
        assert scales is not None and w13_EXH.dtype == FP8_DTYPE
        w13, w2 = dequantize_experts(w13_EXH, w2_EHI, scales, dispatch_out.hidden_states.dtype)
        return super().run(dispatch_out, w13, w2, activation)


def _fp8_layer(ctx: MoeContext, seed: int, keep_fp8: bool) -> FusedMoE:
    """Experts loaded from per-expert FP8 tensors with scales of very different sizes (the same on every rank)."""
    layer = FusedMoE(EXPERTS, HIDDEN, INTER, TopKConfig(top_k=TOP_K), ctx)
    if keep_fp8:
        layer.runner = DequantizingRunner()
    layer.use_fp8(BLOCK)
    gen = torch.Generator().manual_seed(seed)
    for e in range(EXPERTS):
        for shard, shape in (("gate", (INTER, HIDDEN)), ("up", (INTER, HIDDEN)), ("down", (HIDDEN, INTER))):
            q, scale = block_quant(torch.randn(shape, generator=gen) * 4.0 ** torch.randint(-3, 2, (), generator=gen),
                                   BLOCK)  # fmt: skip
            layer.load_expert_weight("w", e, shard, q)
            layer.load_expert_weight("s", e, shard, scale, scale_inv=True)
    layer.finalize_weights()
    return layer


def _worker_rebalance(rank: int, world: int, seed: int) -> None:
    ctx = MoeContext(ep_rank=rank, ep_size=world, dispatcher="torch", group=dist.group.WORLD,
                     eplb=EplbConfig(redundant_experts=world))  # fmt: skip
    layer, reference = _fp8_layer(ctx, seed, keep_fp8=True), _fp8_layer(MoeContext(), seed, keep_fp8=False)
    assert layer.w13_weight.dtype == FP8_DTYPE and layer.fp8_block == BLOCK
    manager = EplbManager([layer], ctx, ctx.eplb)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed + rank)

    def check(tokens: int) -> None:
        hidden = torch.randn(tokens, HIDDEN, generator=gen)
        logits = torch.randn(tokens, EXPERTS, generator=gen) * 3
        want = reference(hidden, logits)
        # float32 sums in another order on two ranks: errors of a few ulps of the largest outputs (the experts'
        # scales span 4^-3..4^1, so an output can be ~0.2 next to ones of ~10); a slot computing with another
        # expert's scales is off by a factor of 4 or more
        scale = float(want.abs().max().clamp_min(1.0))
        torch.testing.assert_close(layer(hidden, logits), want, rtol=1e-5, atol=1e-5 * scale)

    check(20)
    hot = torch.zeros(1, EXPERTS, dtype=torch.int64)
    hot[0, world + torch.randperm(EXPERTS - world, generator=torch.Generator().manual_seed(seed))[:2]] = 1000
    report = manager.rebalance(hot + 1)
    assert report is not None and report.moved > 0
    assert layer.w13_weight.dtype == FP8_DTYPE and layer.expert_scales() is not None
    check(33)
    check(1)


def test_rebalanced_fp8_experts_carry_their_scales_and_match_the_one_rank_layer() -> None:
    _spawn(2, _worker_rebalance, int(torch.randint(0, 2**31, ()).item()))


def test_migrate_on_one_rank_reorders_tensors_of_every_dtype_bit_for_bit() -> None:
    """Without a peer, migrate is a gather of the slots by the plan, whatever each tensor's dtype."""
    old, new = torch.tensor([0, 1, 2, 3]), torch.tensor([2, 0, 3, 2])
    plan = plan_moves(old, new, ep_size=1)
    weights = [torch.randn(4, 3, 5).to(FP8_DTYPE), torch.randn(4, 2, 2), torch.randn(4, 7).bfloat16(),
               torch.arange(4)]  # fmt: skip
    moved = migrate(weights, plan, ep_rank=0, moe_tp_rank=0, moe_tp_size=1, group=None)
    for before, after in zip(weights, moved, strict=True):
        assert after.dtype == before.dtype and after.shape == before.shape
        assert torch.equal(after.view(torch.uint8) if after.dtype == FP8_DTYPE else after,
                           before[new].view(torch.uint8) if before.dtype == FP8_DTYPE else before[new])
