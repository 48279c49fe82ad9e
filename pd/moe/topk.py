"""Router: turn router logits into the top-K experts of each token and their combine weights.

One function covers the routers of the supported reference models (transformers 5.24):

=====================  ========  ===========  ================  =====================  ========================
model                  scoring   renormalize  groups            group_scoring          routed_scaling_factor
=====================  ========  ===========  ================  =====================  ========================
Mixtral                softmax   True         -                 -                      1.0
Qwen2-MoE / Qwen3-MoE  softmax   norm_topk    -                 -                      1.0
DeepSeek-V2 greedy     softmax   False (1)    -                 -                      config value
DeepSeek-V2 grouped    softmax   False (1)    n_group/topk_grp  "max"                  config value
DeepSeek-V3            sigmoid   norm_topk    n_group/topk_grp  "top2_sum" (+ bias)    config value
=====================  ========  ===========  ================  =====================  ========================

(1) transformers' DeepseekV2TopkRouter ignores ``norm_topk_prob``; model code passes ``renormalize=False``.

Where both apply, weights are renormalised first and then scaled (DeepSeek-V3's order). Routing always runs in
float32: the logits are upcast here, so a caller that wants HF's precision computes the logits the way HF does
(Mixtral and Qwen in the model dtype, DeepSeek with an fp32 gate on fp32-cast hidden states). Qwen then rounds
its weights to the model dtype; ours stay float32, which is the same thing for float32 models.

The torch code below is the reference and the CPU path. On CUDA, every router runs as one Triton kernel instead
(pd.moe.triton_topk: one launch instead of about eight, or fifteen with expert groups, which is what a decode step
pays for); it computes the same formula, up to the last ulp of the float32 exp and sums, and returns its slots
sorted by descending choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from pd.layers import fused_kernels

_SCORINGS = ("softmax", "sigmoid")
_GROUP_SCORINGS = ("max", "top2_sum")


@dataclass(frozen=True)
class TopKConfig:
    """Routing rule of one MoE layer.

    Attributes:
        top_k: experts per token (K).
        scoring: "softmax" or "sigmoid" applied to the router logits.
        renormalize: divide the K selected weights by their sum (HF ``norm_topk_prob``).
        num_expert_group: number of expert groups for grouped top-k (DeepSeek ``n_group``); None = no grouping.
        topk_group: groups kept per token (DeepSeek ``topk_group``).
        group_scoring: "max" (DeepSeek-V2 group_limited_greedy: best expert score in the group) or
            "top2_sum" (DeepSeek-V3 noaux_tc: sum of the two best bias-corrected scores in the group).
        routed_scaling_factor: multiplies the final weights.

    Raises:
        ValueError: an unknown scoring, a half-specified group setting, or topk_group > num_expert_group.
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    num_expert_group: int | None = None
    topk_group: int | None = None
    group_scoring: str = "max"
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.scoring not in _SCORINGS:
            raise ValueError(f"scoring must be one of {_SCORINGS}, got {self.scoring!r}")
        if self.group_scoring not in _GROUP_SCORINGS:
            raise ValueError(f"group_scoring must be one of {_GROUP_SCORINGS}, got {self.group_scoring!r}")
        if (self.num_expert_group is None) != (self.topk_group is None):
            raise ValueError("num_expert_group and topk_group must be set together (or neither)")
        if self.num_expert_group is not None and self.topk_group is not None:
            if not 1 <= self.topk_group <= self.num_expert_group:
                raise ValueError(
                    f"topk_group={self.topk_group} must be in [1, num_expert_group={self.num_expert_group}]"
                )


class TopKOutput(NamedTuple):
    """Routing decision for T tokens.

    topk_ids: [T, K] int64 logical expert ids (an EPLB map may later turn them into physical ids).
    topk_weights: [T, K] float32 combine weights (renormalised and scaled as configured).
    router_logits: [T, E] the logits as given, kept for expert-load statistics; may be None.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    router_logits: torch.Tensor | None


def _group_mask(choice_TE: torch.Tensor, config: TopKConfig) -> torch.Tensor:
    """[T, E] bool: True for experts inside the ``topk_group`` best groups of each token."""
    assert config.num_expert_group is not None and config.topk_group is not None
    num_tokens, num_experts = choice_TE.shape
    groups = config.num_expert_group
    grouped_TGX = choice_TE.view(num_tokens, groups, num_experts // groups)
    if config.group_scoring == "max":
        group_scores_TG = grouped_TGX.amax(dim=-1)
    else:
        group_scores_TG = grouped_TGX.topk(2, dim=-1).values.sum(dim=-1)
    group_idx_TK = torch.topk(group_scores_TG, k=config.topk_group, dim=-1, sorted=False).indices
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, group_idx_TK, True)
    return keep_TG.unsqueeze(-1).expand_as(grouped_TGX).reshape(num_tokens, num_experts)


def select_experts(
    router_logits_TE: torch.Tensor,
    config: TopKConfig,
    correction_bias_E: torch.Tensor | None = None,
) -> TopKOutput:
    """Pick the top-K experts of each token.

    Args:
        router_logits_TE: [T, E] router logits, any float dtype (upcast to float32 here).
        config: the routing rule.
        correction_bias_E: [E] float32 DeepSeek-V3 ``e_score_correction_bias``; it shifts the scores used to
            choose groups and experts, while the weights come from the unbiased scores.

    Returns:
        TopKOutput with topk_ids [T, K] int64 (unordered within a token), topk_weights [T, K] float32 and
        router_logits = router_logits_TE.

    Raises:
        ValueError: E not divisible by num_expert_group, or fewer than K experts left after group selection.
    """
    if fused_kernels.enabled(router_logits_TE):
        from pd.moe.triton_topk import fused_select_experts

        return fused_select_experts(router_logits_TE, config, correction_bias_E)
    num_experts = router_logits_TE.shape[-1]
    logits_TE = router_logits_TE.float()
    scores_TE = logits_TE.softmax(dim=-1) if config.scoring == "softmax" else logits_TE.sigmoid()
    choice_TE = scores_TE if correction_bias_E is None else scores_TE + correction_bias_E.float()

    if config.num_expert_group is not None and config.topk_group is not None:
        groups = config.num_expert_group
        if num_experts % groups != 0:
            raise ValueError(f"num_experts={num_experts} is not divisible by num_expert_group={groups}")
        if config.top_k > config.topk_group * (num_experts // groups):
            raise ValueError(
                f"top_k={config.top_k} exceeds the {config.topk_group} kept groups of {num_experts // groups} experts"
            )
        # -inf (not HF-V2's 0.0) keeps masked experts out even when every kept score underflows to 0.
        choice_TE = choice_TE.masked_fill(~_group_mask(choice_TE, config), float("-inf"))

    # The slot order fixes the summation order of the renormalisation below. transformers' plain routers
    # (Mixtral, Qwen) take a sorted top-k, its DeepSeek-V3 router an unsorted one of the same masked tensor as
    # here (DeepSeek-V2 does not renormalise); following each keeps the weights bit-identical to the reference.
    sort_slots = config.num_expert_group is None
    topk_ids_TK = torch.topk(choice_TE, k=config.top_k, dim=-1, sorted=sort_slots).indices
    weights_TK = scores_TE.gather(1, topk_ids_TK)
    if config.renormalize:
        # DeepSeek-V3 adds 1e-20 to the denominator; Mixtral and Qwen do not. The sum of the K largest softmax
        # probabilities is >= K/E, far above where 1e-20 changes an fp32 value, so one formula matches all three.
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    if config.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * config.routed_scaling_factor
    return TopKOutput(topk_ids=topk_ids_TK, topk_weights=weights_TK, router_logits=router_logits_TE)
