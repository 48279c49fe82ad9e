"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v bias, routed experts plus one sigmoid-gated shared expert.

Which layers are sparse follows the reference exactly: a layer is MoE unless it is listed in
`mlp_only_layers`, and only every `decoder_sparse_step`-th layer (1-based) is; the others are dense MLPs.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch
from torch import nn

from pd.dist.tp import SINGLE, TensorParallel
from pd.models.config import ModelConfig
from pd.models.llama import Attention, DecoderLayer, DecoderModel, DenseMLP, GQACausalLM, default_rotary
from pd.models.mixtral import SparseMoeBlock, check_supported, num_routed_experts
from pd.moe.context import MoeContext
from pd.moe.topk import TopKConfig


def is_sparse_layer(config: ModelConfig, layer_id: int) -> bool:
    """Whether layer `layer_id` (0-based) holds an MoE block (HF Qwen2Moe/Qwen3Moe DecoderLayer's rule)."""
    step = int(config.get("decoder_sparse_step", 1))
    return (
        layer_id not in config.get("mlp_only_layers", [])
        and num_routed_experts(config) > 0
        and (layer_id + 1) % step == 0
    )


def qwen_sliding_window(config: ModelConfig) -> int | None:
    """The window the Qwen reference applies to some layer, or None when every layer attends fully."""
    sliding = bool(config.get("use_sliding_window", False)) or "sliding_attention" in config.get("layer_types", [])
    return config.get("sliding_window") if sliding else None


def qwen_topk(config: ModelConfig) -> TopKConfig:
    """Softmax top-k; the K weights are renormalised only with `norm_topk_prob` (Qwen2-MoE's default is off)."""
    return TopKConfig(
        top_k=int(config.num_experts_per_tok), scoring="softmax", renormalize=bool(config.get("norm_topk_prob", False))
    )


class Qwen2MoeBlock(SparseMoeBlock):
    """Routed experts plus `shared_expert` (a SwiGLU MLP every token takes), scaled per token by
    sigmoid(`shared_expert_gate`(x)) [T, 1] before it is added to the routed output."""

    def __init__(self, config: ModelConfig, moe_ctx: MoeContext) -> None:
        hidden = config.hidden_size
        num_experts = num_routed_experts(config)
        super().__init__(hidden, num_experts, config.moe_intermediate_size, qwen_topk(config), moe_ctx)
        self.shared_expert = DenseMLP(hidden, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def forward(self, x_TH: torch.Tensor, mode: str = "normal") -> torch.Tensor:
        """x_TH [T, H] model dtype -> [T, H] model dtype."""
        return self.experts(x_TH, self.gate(x_TH), shared=self._shared(x_TH), mode=mode)

    def stages(self, x_TH: torch.Tensor, mode: str = "normal") -> Generator[None, None, torch.Tensor]:
        """forward for two-batch overlap (see FusedMoE.stages)."""
        return (yield from self.experts.stages(x_TH, self.gate(x_TH), shared=self._shared(x_TH), mode=mode))

    def _shared(self, x_TH: torch.Tensor) -> Callable[[], torch.Tensor]:
        def shared() -> torch.Tensor:
            return torch.sigmoid(self.shared_expert_gate(x_TH)) * self.shared_expert(x_TH)

        return shared


class Qwen2MoeForCausalLM(GQACausalLM):
    def __init__(
        self, config: ModelConfig, moe_ctx: MoeContext, max_position: int, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        check_supported(config, max_position, qwen_sliding_window(config))
        # Older configs (Qwen1.5-MoE) have no `qkv_bias` key; the reference then defaults to True.
        qkv_bias = bool(config.raw.get("qkv_bias", True))

        def make_layer(i: int) -> nn.Module:
            mlp: nn.Module
            if is_sparse_layer(config, i):
                mlp = Qwen2MoeBlock(config, moe_ctx)
            else:
                mlp = DenseMLP(config.hidden_size, config.intermediate_size, tp)
            return DecoderLayer(config, Attention(config, i, qkv_bias=qkv_bias, tp=tp), mlp)

        self.config = config
        self.model = DecoderModel(config, make_layer, default_rotary(config, max_position))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
