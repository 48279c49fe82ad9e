"""Mixtral: Llama attention with a sparse MoE block (softmax router, top-k renormalised) in every layer.

`SparseMoeBlock` (router linear + routed experts) is also the MoE block of the Qwen MoE models, which add a
shared expert on top of it or use it as is.
"""

from __future__ import annotations

from collections.abc import Generator

import torch
from torch import nn

from pd.dist.tp import SINGLE, TensorParallel
from pd.models.config import ModelConfig, ModelConfigError
from pd.models.llama import Attention, DecoderLayer, DecoderModel, GQACausalLM, default_rotary
from pd.moe.context import MoeContext
from pd.moe.layer import FusedMoE
from pd.moe.topk import TopKConfig


def check_supported(config: ModelConfig, max_position: int, sliding_window: int | None) -> None:
    """Rejects what this engine does not run, at build time rather than with wrong tokens later.

    Args:
        config: the checkpoint's config.
        max_position: the longest sequence the engine will run.
        sliding_window: the attention window the reference applies, None (or 0) when it attends to everything.

    Raises:
        ModelConfigError: a non-SiLU MLP activation, or a sliding window shorter than max_position (our paged
            attention is full causal attention, which equals windowed attention only while the window covers
            the whole sequence).
    """
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelConfigError(f"{config.architecture}: hidden_act={act!r} is not supported (only 'silu')")
    if sliding_window and sliding_window < max_position:
        raise ModelConfigError(
            f"{config.architecture}: sliding-window attention (window {sliding_window}) is not supported; "
            f"set --context-length to at most {sliding_window} or use a checkpoint without a sliding window"
        )


def num_routed_experts(config: ModelConfig) -> int:
    """Routed experts per MoE layer. Mixtral and Qwen3-MoE configs say `num_local_experts` or `num_experts`
    (transformers maps one onto the other), Qwen2-MoE says `num_experts`; 0 when neither is set."""
    return int(config.get("num_local_experts") or config.get("num_experts") or 0)


class SparseMoeBlock(nn.Module):
    """Router linear `gate` [E, H] plus the routed experts (`experts`, a FusedMoE).

    The router logits are computed like the reference does (a bias-free linear in the model dtype); the
    softmax, top-k and renormalisation run in float32 inside FusedMoE.
    """

    def __init__(
        self, hidden_size: int, num_experts: int, intermediate_size: int, topk: TopKConfig, moe_ctx: MoeContext
    ) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedMoE(num_experts, hidden_size, intermediate_size, topk, moe_ctx)

    def forward(self, x_TH: torch.Tensor, mode: str = "normal") -> torch.Tensor:
        """x_TH [T, H] model dtype -> [T, H] model dtype: the weighted sum of each token's top-k experts."""
        return self.experts(x_TH, self.gate(x_TH), mode=mode)

    def stages(self, x_TH: torch.Tensor, mode: str = "normal") -> Generator[None, None, torch.Tensor]:
        """forward for two-batch overlap (see FusedMoE.stages)."""
        return (yield from self.experts.stages(x_TH, self.gate(x_TH), mode=mode))


class MixtralForCausalLM(GQACausalLM):
    """Mixtral-8x7B/8x22B layout: every layer is attention + `block_sparse_moe` (no shared experts)."""

    def __init__(
        self, config: ModelConfig, moe_ctx: MoeContext, max_position: int, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        check_supported(config, max_position, config.get("sliding_window"))
        # HF's MixtralTopKRouter always renormalises the top-k softmax probabilities.
        topk = TopKConfig(top_k=int(config.num_experts_per_tok), scoring="softmax", renormalize=True)
        num_experts = num_routed_experts(config)

        def make_layer(i: int) -> nn.Module:
            moe = SparseMoeBlock(config.hidden_size, num_experts, config.intermediate_size, topk, moe_ctx)
            return DecoderLayer(config, Attention(config, i, tp=tp), moe, mlp_name="block_sparse_moe")

        self.config = config
        self.model = DecoderModel(config, make_layer, default_rotary(config, max_position))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
