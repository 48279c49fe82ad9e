"""FusedMoE: the routed experts of one MoE layer (topk -> dispatch -> runner -> combine).

Shared experts, the router linear and any shared-expert gate stay in model code, which adds their output.
"""

from __future__ import annotations

import torch
from torch import nn

from pd.moe.context import MoeContext
from pd.moe.dispatcher import get_dispatcher
from pd.moe.runner import get_runner
from pd.moe.topk import TopKConfig, select_experts

_SHARDS = ("gate", "up", "down")


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(tensor.shape)}")


class FusedMoE(nn.Module):
    """Routed experts of one layer, holding only this rank's experts.

    Parameters (dtype and device follow the ambient torch defaults, like nn.Linear; filled by the loaders):
        w13_weight: [E_local, 2*I, H] gate rows [0:I], up rows [I:2I].
        w2_weight: [E_local, H, I].
        e_score_correction_bias (buffer, only with has_correction_bias): [E] float32, used for selection only.

    Raises:
        ValueError: ctx.ep_size does not divide num_experts, or an unknown dispatcher/runner name.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        topk: TopKConfig,
        ctx: MoeContext,
        activation: str = "silu",
        has_correction_bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.topk_config = topk
        self.ctx = ctx
        self.activation = activation
        self.num_local_experts = ctx.num_local(num_experts)
        self.dispatcher = get_dispatcher(ctx.dispatcher, ctx, num_experts=num_experts)
        self.runner = get_runner(ctx.runner)

        n_local = self.num_local_experts
        self.w13_weight = nn.Parameter(torch.empty(n_local, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(n_local, hidden_size, intermediate_size), requires_grad=False)
        self.e_score_correction_bias: torch.Tensor | None
        if has_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, hidden_TH: torch.Tensor, router_logits_TE: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the routed experts' outputs.

        Args:
            hidden_TH: [T, H] model dtype.
            router_logits_TE: [T, E] router logits (routing runs in float32 whatever their dtype).

        Returns:
            [T, H] model dtype, routed experts only (weights renormalised and scaled per the TopKConfig).
        """
        topk = select_experts(router_logits_TE, self.topk_config, self.e_score_correction_bias)
        dispatched = self.dispatcher.dispatch(hidden_TH, topk)
        combine_input = self.runner.run(dispatched, self.w13_weight, self.w2_weight, self.activation)
        return self.dispatcher.combine(combine_input)

    @torch.no_grad()
    def finalize_weights(self) -> None:
        """Let the runner prepare its view of the weights (e.g. packed copies). Call once the checkpoint is
        loaded, and again after changing the expert weights in place."""
        self.runner.prepare_weights(self.w13_weight, self.w2_weight)

    @torch.no_grad()
    def load_expert_weight(self, name: str, expert_id: int, shard: str, tensor: torch.Tensor) -> bool:
        """Copy one expert's projection from a per-expert checkpoint tensor.

        Args:
            name: checkpoint tensor name, used in error messages.
            expert_id: logical expert id in [0, num_experts).
            shard: "gate" ([I, H], Mixtral w1), "up" ([I, H], Mixtral w3) or "down" ([H, I], Mixtral w2).
            tensor: the weight in nn.Linear layout (out_features, in_features), any float dtype.

        Returns:
            True if this rank owns the expert and copied it, False if it belongs to another rank.

        Raises:
            ValueError: unknown shard, expert id out of range, or a shape that does not match.
        """
        if shard not in _SHARDS:
            raise ValueError(f"{name}: shard must be one of {_SHARDS}, got {shard!r}")
        local = self.ctx.local_expert_index(expert_id, self.num_experts)
        if local is None:
            return False
        inter, hidden = self.intermediate_size, self.hidden_size
        if shard == "down":
            _check_shape(name, tensor, (hidden, inter))
            self.w2_weight[local].copy_(tensor)
        else:
            _check_shape(name, tensor, (inter, hidden))
            rows = slice(0, inter) if shard == "gate" else slice(inter, 2 * inter)
            self.w13_weight[local, rows].copy_(tensor)
        return True

    @torch.no_grad()
    def load_fused(self, gate_up_EXH: torch.Tensor, down_EHI: torch.Tensor, prefix: str = "experts") -> None:
        """Copy this rank's experts from transformers' fused expert tensors.

        transformers 5.x stores ``experts.gate_up_proj`` as [E, 2*I, H] with gate rows [0:I] and up rows [I:2I]
        concatenated (not interleaved, not transposed) and ``experts.down_proj`` as [E, H, I]; the checkpoint
        converters for Mixtral, Qwen2/3-MoE and DeepSeek-V2/V3 produce exactly this, which is also our layout.

        Args:
            gate_up_EXH: [E, 2*I, H] for all E logical experts.
            down_EHI: [E, H, I] for all E logical experts.
            prefix: checkpoint name prefix for error messages.

        Raises:
            ValueError: either tensor has the wrong shape.
        """
        num, inter, hidden = self.num_experts, self.intermediate_size, self.hidden_size
        _check_shape(f"{prefix}.gate_up_proj", gate_up_EXH, (num, 2 * inter, hidden))
        _check_shape(f"{prefix}.down_proj", down_EHI, (num, hidden, inter))
        start, end = self.ctx.local_expert_range(num)
        self.w13_weight.copy_(gate_up_EXH[start:end])
        self.w2_weight.copy_(down_EHI[start:end])

    @torch.no_grad()
    def load_correction_bias(self, name: str, bias_E: torch.Tensor) -> None:
        """Copy DeepSeek-V3's ``e_score_correction_bias`` [E] (kept in float32).

        Raises:
            ValueError: the layer has no correction bias, or the shape is not [E].
        """
        if self.e_score_correction_bias is None:
            raise ValueError(f"{name}: this MoE layer was built without has_correction_bias")
        _check_shape(name, bias_E, (self.num_experts,))
        self.e_score_correction_bias.copy_(bias_E)
