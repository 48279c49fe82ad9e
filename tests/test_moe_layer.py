"""FusedMoE loaded from transformers' sparse MoE blocks gives the blocks' routed-expert output."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from pd.moe.context import MoeContext
from pd.moe.dispatcher import get_dispatcher
from pd.moe.layer import FusedMoE
from pd.moe.topk import TopKConfig

HIDDEN, INTER = 64, 48
# A built-but-unloaded HF model has no experts implementation chosen; the eager loop is the reference.
EAGER = {"experts_implementation": "eager"}
# (hf block, our layer, router logits as the model code computes them, the part model code adds itself:
# shared experts for DeepSeek, nothing for Mixtral and Qwen3-MoE)
Fn = Callable[[torch.Tensor], torch.Tensor]
Case = tuple[nn.Module, FusedMoE, Fn, Fn]


def _randomize(block: nn.Module, seed: int) -> None:
    """HF creates expert tensors with torch.empty; fill every parameter with scaled Gaussians."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            std = 0.5 if name.endswith("gate.weight") else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _ours_from(block: nn.Module, num_experts: int, topk: TopKConfig, bias: bool = False) -> FusedMoE:
    layer = FusedMoE(num_experts, HIDDEN, INTER, topk, MoeContext(), has_correction_bias=bias)
    layer.load_fused(block.experts.gate_up_proj, block.experts.down_proj, prefix="mlp.experts")
    if bias:
        layer.load_correction_bias("mlp.gate.e_score_correction_bias", block.gate.e_score_correction_bias)
    return layer


def _mixtral(seed: int) -> Case:
    cfg = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_local_experts=8,
        num_experts_per_tok=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        **EAGER,
    )
    block = MixtralSparseMoeBlock(cfg)
    _randomize(block, seed)
    ours = _ours_from(block, 8, TopKConfig(top_k=2, renormalize=True))
    return block, ours, lambda h: F.linear(h, block.gate.weight), torch.zeros_like


def _qwen3(seed: int, norm_topk_prob: bool) -> Case:
    cfg = Qwen3MoeConfig(
        hidden_size=HIDDEN,
        moe_intermediate_size=INTER,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=norm_topk_prob,
        num_attention_heads=4,
        num_key_value_heads=4,
        **EAGER,
    )
    block = Qwen3MoeSparseMoeBlock(cfg)
    _randomize(block, seed)
    ours = _ours_from(block, 16, TopKConfig(top_k=4, renormalize=norm_topk_prob))
    return block, ours, lambda h: F.linear(h, block.gate.weight), torch.zeros_like


def _deepseek_v3(seed: int, norm_topk_prob: bool) -> Case:
    cfg = DeepseekV3Config(
        hidden_size=HIDDEN,
        moe_intermediate_size=INTER,
        n_routed_experts=32,
        num_experts_per_tok=4,
        n_group=8,
        topk_group=3,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm_topk_prob,
        num_attention_heads=4,
        **EAGER,
    )
    block = DeepseekV3MoE(cfg)
    _randomize(block, seed)
    block.gate.e_score_correction_bias.copy_(torch.randn(32, generator=torch.Generator().manual_seed(seed)) * 0.1)
    topk = TopKConfig(
        top_k=4,
        scoring="sigmoid",
        renormalize=norm_topk_prob,
        num_expert_group=8,
        topk_group=3,
        group_scoring="top2_sum",
        routed_scaling_factor=2.5,
    )
    ours = _ours_from(block, 32, topk, bias=True)
    return block, ours, lambda h: F.linear(h.float(), block.gate.weight.float()), block.shared_experts


def _deepseek_v2(seed: int) -> Case:
    cfg = DeepseekV2Config(
        hidden_size=HIDDEN,
        moe_intermediate_size=INTER,
        n_routed_experts=16,
        num_experts_per_tok=4,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=2,
        n_shared_experts=2,
        routed_scaling_factor=16.0,
        num_attention_heads=4,
        **EAGER,
    )
    block = DeepseekV2Moe(cfg)
    _randomize(block, seed)
    topk = TopKConfig(
        top_k=4, renormalize=False, num_expert_group=4, topk_group=2, group_scoring="max", routed_scaling_factor=16.0
    )
    ours = _ours_from(block, 16, topk)
    return block, ours, lambda h: F.linear(h.float(), block.gate.weight.float()), block.shared_experts


CASES: dict[str, Callable[[int], Case]] = {
    "mixtral": _mixtral,
    "qwen3_moe_norm": lambda s: _qwen3(s, True),
    "qwen3_moe_no_norm": lambda s: _qwen3(s, False),
    "deepseek_v3_norm": lambda s: _deepseek_v3(s, True),
    "deepseek_v3_no_norm": lambda s: _deepseek_v3(s, False),
    "deepseek_v2_grouped": _deepseek_v2,
}


@pytest.mark.parametrize("num_tokens", [1, 5, 300])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("model", list(CASES))
@torch.no_grad()
def test_fused_moe_plus_model_side_part_matches_hf_block_fp32(model: str, seed: int, num_tokens: int) -> None:
    block, ours, router_logits, model_side = CASES[model](seed)
    hidden = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(100 + seed))
    out = ours(hidden, router_logits(hidden))
    assert out.shape == (num_tokens, HIDDEN) and out.dtype == torch.float32
    torch.testing.assert_close(out + model_side(hidden), block(hidden[None])[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fused_moe_matches_hf_mixtral_bf16() -> None:
    block, ours, router_logits, _ = _mixtral(3)
    block.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    hidden = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    out = ours(hidden, router_logits(hidden))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), block(hidden[None])[0].float(), rtol=1e-2, atol=1e-2)


@torch.no_grad()
def test_per_expert_loading_equals_fused_loading() -> None:
    block, fused, _, _ = _qwen3(0, True)
    per_expert = FusedMoE(16, HIDDEN, INTER, TopKConfig(top_k=4), MoeContext())
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    for e in range(16):
        prefix = f"mlp.experts.{e}"
        assert per_expert.load_expert_weight(f"{prefix}.gate_proj.weight", e, "gate", gate_up[e, :INTER])
        assert per_expert.load_expert_weight(f"{prefix}.up_proj.weight", e, "up", gate_up[e, INTER:])
        assert per_expert.load_expert_weight(f"{prefix}.down_proj.weight", e, "down", down[e])
    assert torch.equal(per_expert.w13_weight, fused.w13_weight)
    assert torch.equal(per_expert.w2_weight, fused.w2_weight)


def test_misshaped_weights_rejected_with_names_and_shapes() -> None:
    layer = FusedMoE(8, HIDDEN, INTER, TopKConfig(top_k=2), MoeContext())
    with pytest.raises(ValueError, match=r"experts\.3\.w1\.weight.*\(48, 64\).*\(64, 48\)"):
        layer.load_expert_weight("experts.3.w1.weight", 3, "gate", torch.zeros(HIDDEN, INTER))
    with pytest.raises(ValueError, match=r"experts\.3\.w2\.weight"):
        layer.load_expert_weight("experts.3.w2.weight", 3, "down", torch.zeros(INTER, HIDDEN))
    with pytest.raises(ValueError, match=r"mlp\.experts\.gate_up_proj.*\(8, 96, 64\).*\(8, 64, 96\)"):
        layer.load_fused(torch.zeros(8, HIDDEN, 2 * INTER), torch.zeros(8, HIDDEN, INTER), prefix="mlp.experts")
    with pytest.raises(ValueError, match=r"down_proj"):
        layer.load_fused(torch.zeros(8, 2 * INTER, HIDDEN), torch.zeros(8, INTER, HIDDEN))
    with pytest.raises(ValueError, match="shard"):
        layer.load_expert_weight("x", 0, "gate_up", torch.zeros(INTER, HIDDEN))
    with pytest.raises(ValueError, match="expert id"):
        layer.load_expert_weight("x", 8, "gate", torch.zeros(INTER, HIDDEN))


def test_parameters_follow_ambient_dtype_and_bias_stays_float32() -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        layer = FusedMoE(8, HIDDEN, INTER, TopKConfig(top_k=2), MoeContext(), has_correction_bias=True)
    finally:
        torch.set_default_dtype(previous)
    assert layer.w13_weight.dtype == torch.float16 and layer.w13_weight.shape == (8, 2 * INTER, HIDDEN)
    assert layer.w2_weight.dtype == torch.float16 and layer.w2_weight.shape == (8, HIDDEN, INTER)
    assert layer.e_score_correction_bias is not None and layer.e_score_correction_bias.dtype == torch.float32


def test_context_places_experts_contiguously_per_rank() -> None:
    ctx = MoeContext(ep_rank=1, ep_size=4)
    assert ctx.num_local(16) == 4 and ctx.local_expert_range(16) == (4, 8)
    owned = [e for e in range(16) if ctx.local_expert_index(e, 16) is not None]
    assert owned == [4, 5, 6, 7] and [ctx.local_expert_index(e, 16) for e in owned] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="multiple of ep_size"):
        ctx.num_local(10)
    with pytest.raises(ValueError, match="ep_rank"):
        MoeContext(ep_rank=4, ep_size=4)


def test_dispatcher_registry() -> None:
    with pytest.raises(ValueError, match="single_rank"):
        get_dispatcher("no-such-backend", MoeContext())
    with pytest.raises(ValueError, match="ep_size"):
        FusedMoE(8, HIDDEN, INTER, TopKConfig(top_k=2), MoeContext(ep_rank=0, ep_size=2))
