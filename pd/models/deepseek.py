"""DeepSeek-V2 and DeepSeek-V3: MLA attention, dense MLPs in the first layers, then MoE layers with shared experts.

The two differ only in routing (V2: softmax, greedy or group-limited greedy by the best expert of a group, no
renormalisation; V3: sigmoid with a selection-only correction bias, groups ranked by their two best experts,
optional renormalisation), in V3's optional q LoRA being the norm, and in V3's rope layout switch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Generator

import torch
import torch.nn.functional as F
from torch import nn

from pd.dist.tp import SINGLE, TensorParallel
from pd.engine.forward_batch import ForwardBatch
from pd.layers.rotary import RotaryEmbedding
from pd.models.base import CausalLM
from pd.models.config import ModelConfig, ModelConfigError
from pd.models.llama import DecoderLayer, DecoderModel, DenseMLP
from pd.models.mla import MLAttention, mla_rope_parameters
from pd.moe.context import MoeContext
from pd.moe.layer import FusedMoE
from pd.moe.topk import TopKConfig

logger = logging.getLogger(__name__)
_LAYER = re.compile(r"^model\.layers\.(?P<layer>\d+)\.")
_CORRECTION_BIAS = re.compile(r"^(?P<layer>.+)\.mlp\.gate\.e_score_correction_bias$")


class DeepseekMoE(nn.Module):
    """Router (`gate`, fp32 as in the reference), routed experts (`experts`), and `shared_experts` whose output is
    added to the routed sum. Router and shared experts are replicated on every rank; they see the tokens this
    rank holds, whatever layout the routed experts use across ranks."""

    def __init__(self, config: ModelConfig, topk: TopKConfig, moe_ctx: MoeContext, correction_bias: bool) -> None:
        super().__init__()
        num_experts, inter = config.n_routed_experts, config.moe_intermediate_size
        # The reference keeps the router weight in float32 whatever the model dtype; so do we.
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False, dtype=torch.float32)
        self._gate_16bit: tuple[object, torch.Tensor | None] = (None, None)  # (what it was made from, the copy)
        self.experts = FusedMoE(num_experts, config.hidden_size, inter, topk, moe_ctx,
                                has_correction_bias=correction_bias)
        n_shared = int(config.get("n_shared_experts", 0))
        self.shared_experts = DenseMLP(config.hidden_size, inter * n_shared) if n_shared else None

    def forward(self, x: torch.Tensor, mode: str = "normal") -> torch.Tensor:
        """x [T, hidden] -> [T, hidden], x's dtype."""
        return self.experts(x, self._router_logits(x), shared=self._shared(x), mode=mode)

    def stages(self, x: torch.Tensor, mode: str = "normal") -> Generator[None, None, torch.Tensor]:
        """forward for two-batch overlap (see FusedMoE.stages)."""
        return (yield from self.experts.stages(x, self._router_logits(x), shared=self._shared(x), mode=mode))

    def _router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, E] float32 as the reference computes them: float32 products of x and the float32 weight, summed in
        float32. With bf16 activations on CUDA and a weight bf16 holds exactly (a checkpoint's bf16 router), one
        tensor-core GEMM with float32 output forms the very same products (a product of two bf16 values is exact in
        float32) and sums them in float32, in its own order as any GEMM does; it spares a float32 copy of x and a
        float32 GEMM on the CUDA cores (DeepSeek-V3's router at 8192 tokens: 60 GFLOP, ~0.7 ms that way)."""
        weight = self._gate_weight_in(x)
        if weight is not None:
            return torch.mm(x, weight.t(), out_dtype=torch.float32)
        return F.linear(x.float(), self.gate.weight.float())

    def _gate_weight_in(self, x: torch.Tensor) -> torch.Tensor | None:
        """The router weight in x's dtype when _router_logits may use it, else None. Made again only when the weight
        changes; its checks sync with the device once (at warm-up, before graphs are captured): the weight is exact
        in that dtype, and the GEMM runs here and gives the reference's logits on x's first rows."""
        if x.device.type != "cuda" or x.dtype != torch.bfloat16 or x.dim() != 2:
            return None
        weight = self.gate.weight.detach()
        made_from = (x.dtype, weight.device, weight.data_ptr(), weight._version)
        if self._gate_16bit[0] != made_from:
            copy = weight.to(x.dtype)
            usable = torch.equal(copy.float(), weight)
            if usable:
                rows = x[:8]
                want = F.linear(rows.float(), weight)
                try:
                    got = torch.mm(rows, copy.t(), out_dtype=torch.float32)
                except (RuntimeError, NotImplementedError, TypeError) as e:  # a torch without mm's out_dtype here
                    logger.info("router logits through a float32 GEMM: %s", e)
                    usable = False
                else:
                    bound = 1e-4 * F.linear(rows.float().abs(), weight.abs()) + 1e-30
                    usable = got.dtype == torch.float32 and bool(((got - want).abs() <= bound).all())
            self._gate_16bit = (made_from, copy if usable else None)
        return self._gate_16bit[1]

    def _shared(self, x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
        shared_experts = self.shared_experts
        return None if shared_experts is None else lambda: shared_experts(x)


class DeepseekForCausalLM(CausalLM):
    """Shared body of V2 and V3; subclasses say how tokens are routed and how rope lays out its pairs."""

    has_correction_bias = False  # V3's routers carry e_score_correction_bias

    def __init__(
        self, config: ModelConfig, moe_ctx: MoeContext, max_position: int, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        if config.get("mlp_bias", False):
            raise ModelConfigError(f"{config.path}: mlp_bias=true is not supported for DeepSeek models")
        if config.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"{config.path}: hidden_act={config.hidden_act!r} is not supported (silu only)")
        self.config = config
        topk = self.topk_config(config)
        first_dense = int(config.get("first_k_dense_replace", 0))

        def make_layer(i: int) -> nn.Module:
            mlp: nn.Module
            if i < first_dense:
                mlp = DenseMLP(config.hidden_size, config.intermediate_size, tp)
            else:
                mlp = DeepseekMoE(config, topk, moe_ctx, correction_bias=self.has_correction_bias)
            return DecoderLayer(config, MLAttention(config, i, tp), mlp)

        rotary = RotaryEmbedding(config.qk_rope_head_dim, mla_rope_parameters(config), max_position,
                                 interleaved=self.rope_interleaved(config))
        self.model = DecoderModel(config, make_layer, rotary)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._biases_loaded: set[str] = set()

    @staticmethod
    def topk_config(config: ModelConfig) -> TopKConfig:
        raise NotImplementedError

    @staticmethod
    def rope_interleaved(config: ModelConfig) -> bool:
        raise NotImplementedError

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def kv_layout(self) -> list[tuple[int, int]]:
        """One buffer per layer: the compressed latent and the roped k_pe, [1 head, kv_lora_rank + rope dim]."""
        return [(1, self.config.kv_lora_rank + self.config.qk_rope_head_dim)]

    # ---- checkpoint loading ----
    def load_special(self, name: str, tensor: torch.Tensor) -> bool:
        # The checkpoint keeps the correction bias on the router (mlp.gate); ours lives in FusedMoE.
        if m := _CORRECTION_BIAS.match(name):
            moe = self._moe_of(m["layer"])
            if moe is not None and moe.e_score_correction_bias is not None:
                moe.load_correction_bias(name, tensor)
                self._biases_loaded.add(m["layer"] + ".mlp.experts.e_score_correction_bias")
                return True
        return super().load_special(name, tensor)

    def ignore_weight(self, name: str) -> bool:
        # Multi-token-prediction layers sit after the decoder layers in the checkpoint; serving does not use them.
        m = _LAYER.match(name)
        if m and int(m["layer"]) >= self.config.num_hidden_layers:
            return True
        return super().ignore_weight(name)

    def param_loaded_specially(self, param_name: str) -> bool:
        return param_name in self._biases_loaded or super().param_loaded_specially(param_name)


class DeepseekV2ForCausalLM(DeepseekForCausalLM):
    @staticmethod
    def topk_config(config: ModelConfig) -> TopKConfig:
        method = config.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ModelConfigError(f"{config.path}: DeepSeek-V2 topk_method {method!r} is not supported "
                                   "(supported: greedy, group_limited_greedy)")
        grouped = method == "group_limited_greedy"
        # transformers' V2 router never renormalises (it ignores norm_topk_prob); it is the oracle.
        return TopKConfig(
            top_k=config.num_experts_per_tok,
            scoring="softmax",
            renormalize=False,
            num_expert_group=config.n_group if grouped else None,
            topk_group=config.topk_group if grouped else None,
            group_scoring="max",
            routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        )

    @staticmethod
    def rope_interleaved(config: ModelConfig) -> bool:
        return True  # V2 rotates adjacent pairs (its reference applies rope as complex multiplication)


class DeepseekV3ForCausalLM(DeepseekForCausalLM):
    has_correction_bias = True

    @staticmethod
    def topk_config(config: ModelConfig) -> TopKConfig:
        return TopKConfig(
            top_k=config.num_experts_per_tok,
            scoring="sigmoid",
            renormalize=bool(config.get("norm_topk_prob", True)),
            num_expert_group=int(config.get("n_group", 1)),
            topk_group=int(config.get("topk_group", 1)),
            group_scoring="top2_sum",
            routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        )

    @staticmethod
    def rope_interleaved(config: ModelConfig) -> bool:
        return bool(config.get("rope_interleave", True))
