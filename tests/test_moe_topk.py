"""select_experts against the routers of transformers' Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 and DeepSeek-V3."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from pd.moe.topk import TopKConfig, TopKOutput, select_experts

HIDDEN = 48
SEEDS = (0, 1, 2)
NUM_TOKENS = (1, 7, 129)


def _sorted_by_id(ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical per-token order (ascending expert id), since top-k order within a token is unspecified."""
    ids_sorted, perm = ids_TK.to(torch.int64).sort(dim=-1)
    return ids_sorted, weights_TK.float().gather(1, perm)


def _assert_same_routing(ours: TopKOutput, hf_ids: torch.Tensor, hf_weights: torch.Tensor) -> None:
    assert ours.topk_ids.dtype == torch.int64 and ours.topk_weights.dtype == torch.float32
    our_ids, our_w = _sorted_by_id(ours.topk_ids, ours.topk_weights)
    ref_ids, ref_w = _sorted_by_id(hf_ids, hf_weights)
    torch.testing.assert_close(our_ids, ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(our_w, ref_w, rtol=0, atol=1e-6)


def _randomize(router: nn.Module, seed: int) -> None:
    """Give the router random weights, large enough for a wide spread of scores."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.5)


def _hidden(num_tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(1000 + seed))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (16, 1), (32, 8)])
def test_matches_mixtral_router(seed: int, num_tokens: int, num_experts: int, top_k: int) -> None:
    cfg = MixtralConfig(hidden_size=HIDDEN, num_local_experts=num_experts, num_experts_per_tok=top_k)
    router = MixtralTopKRouter(cfg)
    _randomize(router, seed)
    logits, hf_w, hf_ids = router(_hidden(num_tokens, seed))
    ours = select_experts(logits, TopKConfig(top_k=top_k, scoring="softmax", renormalize=True))
    _assert_same_routing(ours, hf_ids, hf_w)
    assert ours.router_logits is logits


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("model", ["qwen2_moe", "qwen3_moe"])
def test_matches_qwen_moe_router(seed: int, num_tokens: int, norm_topk_prob: bool, model: str) -> None:
    num_experts, top_k = 60, 4
    if model == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            hidden_size=HIDDEN, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob
        )
        router: nn.Module = Qwen2MoeTopKRouter(cfg)
    else:
        cfg = Qwen3MoeConfig(
            hidden_size=HIDDEN, num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob
        )
        router = Qwen3MoeTopKRouter(cfg)
    _randomize(router, seed)
    logits, hf_w, hf_ids = router(_hidden(num_tokens, seed))
    ours = select_experts(logits, TopKConfig(top_k=top_k, scoring="softmax", renormalize=norm_topk_prob))
    _assert_same_routing(ours, hf_ids, hf_w)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize(
    "topk_method,n_group,topk_group,scaling",
    [
        ("greedy", None, None, 1.0),
        ("greedy", None, None, 16.0),
        ("group_limited_greedy", 8, 3, 16.0),
        ("group_limited_greedy", 4, 1, 1.0),
    ],
)
def test_matches_deepseek_v2_router(
    seed: int, num_tokens: int, topk_method: str, n_group: int | None, topk_group: int | None, scaling: float
) -> None:
    num_experts, top_k = 32, 6 if topk_group != 1 else 4
    cfg = DeepseekV2Config(
        hidden_size=HIDDEN,
        num_attention_heads=4,
        n_routed_experts=num_experts,
        num_experts_per_tok=top_k,
        topk_method=topk_method,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=scaling,
        norm_topk_prob=False,
    )
    router = DeepseekV2TopkRouter(cfg)
    _randomize(router, seed)
    logits, hf_w, hf_ids = router(_hidden(num_tokens, seed))
    grouped = topk_method == "group_limited_greedy"
    config = TopKConfig(
        top_k=top_k,
        scoring="softmax",
        renormalize=False,
        num_expert_group=n_group if grouped else None,
        topk_group=topk_group if grouped else None,
        group_scoring="max",
        routed_scaling_factor=scaling,
    )
    _assert_same_routing(select_experts(logits, config), hf_ids, hf_w)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("num_experts,top_k,n_group,topk_group", [(64, 8, 8, 4), (16, 4, 4, 2), (16, 2, 1, 1)])
def test_matches_deepseek_v3_router_with_bias(
    seed: int, num_tokens: int, norm_topk_prob: bool, num_experts: int, top_k: int, n_group: int, topk_group: int
) -> None:
    cfg = DeepseekV3Config(
        hidden_size=HIDDEN,
        num_attention_heads=4,
        n_routed_experts=num_experts,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm_topk_prob,
    )
    router = DeepseekV3TopkRouter(cfg)
    _randomize(router, seed)
    bias = torch.randn(num_experts, generator=torch.Generator().manual_seed(2000 + seed)) * 0.2
    router.e_score_correction_bias.copy_(bias)
    logits, hf_w, hf_ids = router(_hidden(num_tokens, seed))
    config = TopKConfig(
        top_k=top_k,
        scoring="sigmoid",
        renormalize=norm_topk_prob,
        num_expert_group=n_group,
        topk_group=topk_group,
        group_scoring="top2_sum",
        routed_scaling_factor=2.5,
    )
    _assert_same_routing(select_experts(logits, config, correction_bias_E=bias), hf_ids, hf_w)


def test_deepseek_v3_bias_changes_selection_but_not_weights() -> None:
    """The bias must steer the choice (else the V3 test above could not catch a missing bias)."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(256, 16, generator=gen)
    bias = torch.randn(16, generator=gen) * 0.5
    config = TopKConfig(
        top_k=4, scoring="sigmoid", renormalize=False, num_expert_group=4, topk_group=2, group_scoring="top2_sum"
    )
    with_bias = select_experts(logits, config, correction_bias_E=bias)
    without = select_experts(logits, config)
    assert not torch.equal(with_bias.topk_ids.sort(-1).values, without.topk_ids.sort(-1).values)
    # weights are the unbiased sigmoid scores of the chosen experts
    torch.testing.assert_close(with_bias.topk_weights, logits.sigmoid().gather(1, with_bias.topk_ids), rtol=0, atol=0)


def test_half_precision_logits_are_routed_in_float32() -> None:
    logits = torch.randn(33, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ours = select_experts(logits, TopKConfig(top_k=2))
    probs = torch.softmax(logits.float(), dim=-1)
    ref_w, ref_ids = probs.topk(2, dim=-1)
    _assert_same_routing(ours, ref_ids, ref_w / ref_w.sum(-1, keepdim=True))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(top_k=0),
        dict(top_k=2, scoring="relu"),
        dict(top_k=2, num_expert_group=4),
        dict(top_k=2, num_expert_group=4, topk_group=5),
        dict(top_k=2, group_scoring="mean"),
    ],
)
def test_invalid_config_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TopKConfig(**kwargs)  # type: ignore[arg-type]


def test_group_settings_checked_against_expert_count() -> None:
    logits = torch.randn(4, 12)
    with pytest.raises(ValueError, match="divisible"):
        select_experts(logits, TopKConfig(top_k=2, num_expert_group=5, topk_group=2))
    with pytest.raises(ValueError, match="exceeds"):
        select_experts(logits, TopKConfig(top_k=5, num_expert_group=4, topk_group=1))
