"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): per-head q/k RMSNorm, explicit head_dim, routed experts only.

Sparse and dense layers follow the same `decoder_sparse_step` / `mlp_only_layers` rule as Qwen2-MoE.
"""

from __future__ import annotations

from torch import nn

from pd.dist.tp import SINGLE, TensorParallel
from pd.models.config import ModelConfig
from pd.models.llama import Attention, DecoderLayer, DecoderModel, DenseMLP, GQACausalLM, default_rotary
from pd.models.mixtral import SparseMoeBlock, check_supported, num_routed_experts
from pd.models.qwen2_moe import is_sparse_layer, qwen_sliding_window, qwen_topk
from pd.moe.context import MoeContext


class Qwen3MoeForCausalLM(GQACausalLM):
    def __init__(
        self, config: ModelConfig, moe_ctx: MoeContext, max_position: int, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        check_supported(config, max_position, qwen_sliding_window(config))
        # `attention_bias` covers q/k/v and o alike in the reference (off in every released checkpoint).
        bias = bool(config.get("attention_bias", False))
        topk = qwen_topk(config)

        def make_layer(i: int) -> nn.Module:
            mlp: nn.Module
            if is_sparse_layer(config, i):
                num_experts = num_routed_experts(config)
                mlp = SparseMoeBlock(config.hidden_size, num_experts, config.moe_intermediate_size, topk, moe_ctx)
            else:
                mlp = DenseMLP(config.hidden_size, config.intermediate_size, tp)
            return DecoderLayer(config, Attention(config, i, qkv_bias=bias, o_bias=bias, qk_norm=True, tp=tp), mlp)

        self.config = config
        self.model = DecoderModel(config, make_layer, default_rotary(config, max_position))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
