"""Multi-head latent attention (MLA) of DeepSeek-V2/V3, caching the compressed latent.

Per token the cache holds one row of kv_lora_rank + qk_rope_head_dim values: the normalised compressed KV
latent followed by the roped, head-shared k_pe. Decode (and any batch with more cached than new tokens) attends in
the latent space (the "absorbed" form of DeepSeek's and SGLang's decode): kv_b_proj's key half W_UK is folded into
the query (q_nope @ W_UK per head), so every head attends the cached latent rows directly as one shared key/value
head (values: the latent's first kv_lora_rank columns), and the value half W_UV maps the attended latent to each
head's v. No per-head K or V is ever materialised, and the cache is read once per head group.

A prompt's forward (at least as many new tokens as cached ones) attends as plain multi-head attention instead, as
SGLang's prefill does: the context's latents are expanded by kv_b_proj into per-head keys and values, one GEMM, and
each head's dot products are then 192 and 128 wide (DeepSeek-V3) instead of 576 and 512. On an H200 the latent
form's attention was a third of a 16 x 1024-token prefill's GPU time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pd.dist.tp import SINGLE, TensorParallel
from pd.engine.forward_batch import ForwardBatch
from pd.layers.attention import expanded_latent_attention, latent_attention
from pd.layers.norm import RMSNorm
from pd.layers.rotary import RotaryEmbedding
from pd.models.config import ModelConfig
from pd.quant.fp8 import dense_weight


def yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """The config's rope parameters, with YaRN's `factor` and `original_max_position_embeddings` filled in from
    max_position_embeddings when absent (as transformers does), so neither depends on the engine's context."""
    params = dict(config.rope_parameters)
    if params["rope_type"] == "yarn":
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        if params.get("factor") is None:
            params["factor"] = config.max_position_embeddings / params["original_max_position_embeddings"]
    return params


def mla_softmax_scale(config: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under scaled rope: YaRN's attention temperature
    applies to the whole query/key (nope and rope parts), not only to the rotary cos/sin."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = mla_rope_parameters(config)
    mscale_all_dim = params.get("mscale_all_dim")
    if params["rope_type"] != "default" and mscale_all_dim:
        scale *= yarn_mscale(float(params["factor"]), float(mscale_all_dim)) ** 2
    return scale


class MLAttention(nn.Module):
    """DeepSeek MLA. Parameter names mirror the checkpoint: q_proj (q_lora_rank None) or q_a_proj,
    q_a_layernorm, q_b_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj. Under tensor parallelism
    the per-head projections (q, kv_b, o) are split by heads and every rank caches the whole latent."""

    def __init__(self, config: ModelConfig, layer_id: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.layer_id, self.tp = layer_id, tp
        hidden, bias = config.hidden_size, bool(config.get("attention_bias", False))
        heads, what = config.num_attention_heads, "the number of attention heads"
        self.num_heads = tp.split(heads, what)  # this rank's heads; the latent is the same for all of them
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_lora_rank = config.v_head_dim, config.kv_lora_rank
        self.q_lora_rank: int | None = config.get("q_lora_rank")
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank is None:
            self.q_proj = tp.column_linear(hidden, heads, qk_dim, False, what)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            # transformers builds these two norms with its default eps (1e-6), not rms_norm_eps.
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = tp.column_linear(self.q_lora_rank, heads, qk_dim, False, what)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        self.kv_b_proj = tp.column_linear(self.kv_lora_rank, heads, self.nope_dim + self.v_dim, False, what)
        self.o_proj = tp.row_linear(heads, self.v_dim, hidden, bias, what)
        self.scale = mla_softmax_scale(config)

    @property
    def latent_dim(self) -> int:
        """Width of one cached token: kv_lora_rank + qk_rope_head_dim."""
        return self.kv_lora_rank + self.rope_dim

    def _expand(self, latent_SL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Context latents [S, C + R] -> this rank's heads' keys as their nope part [S, H, nope] and the rope part
        all heads share [S, 1, rope], and values [S, H, v]: kv_b_proj over the latent's first C columns. All three
        are views (of kv_b_proj's output and of the latents): the attention reads a key's two parts from where they
        lie instead of a concatenated [S, H, nope + rope] copy."""
        num = latent_SL.shape[0]
        kv_c, k_pe = latent_SL.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_nope, v = self.kv_b_proj(kv_c).view(num, self.num_heads, self.nope_dim + self.v_dim).split(
            [self.nope_dim, self.v_dim], dim=-1)  # fmt: skip
        return k_nope, k_pe.unsqueeze(1), v

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(x.shape[0], self.num_heads, self.nope_dim + self.rope_dim)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rotary: RotaryEmbedding) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]. Writes the new tokens' latents [T, 1, latent_dim] into the layer's
        single KV buffer, then attends over each request's whole cached context in the latent space."""
        num_tokens = x.shape[0]
        q_THD = self._query(x)
        q_nope, q_pe = q_THD.split([self.nope_dim, self.rope_dim], dim=-1)
        kv_c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        # Rotated where they lie: q_THD becomes the whole roped query with no concatenation.
        rotary(batch.positions, q_pe, k_pe.unsqueeze(1), inplace=True)  # k_pe: [T, 1, rope_dim], one shared head
        latent_T1L = torch.cat((self.kv_a_layernorm(kv_c).unsqueeze(1), k_pe.unsqueeze(1)), dim=-1)
        if batch.layout.mostly_new:  # a prompt: per-head K and V expanded from the context's latents
            out_THV = expanded_latent_attention(self.layer_id, q_THD, latent_T1L, self._expand, self.v_dim, batch,
                                                self.scale)  # fmt: skip
            return self.tp.all_reduce(self.o_proj(out_THV.reshape(num_tokens, self.num_heads * self.v_dim)))

        # kv_b_proj.weight [H * (nope + v), C] holds per head W_UK [nope, C] then W_UV [v, C] (views, no copies
        # unless it is FP8, then dequantized).
        w_HXC = dense_weight(self.kv_b_proj).view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk_HNC, w_uv_HVC = w_HXC.split([self.nope_dim, self.v_dim], dim=1)
        q_lat_HTC = torch.bmm(q_nope.transpose(0, 1), w_uk_HNC)  # [H, T, C]
        q_THL = torch.cat((q_lat_HTC.transpose(0, 1), q_pe), dim=-1)  # [T, H, C + R]
        out_THC = latent_attention(self.layer_id, q_THL, latent_T1L, self.kv_lora_rank, batch, self.scale)
        out_HTV = torch.bmm(out_THC.transpose(0, 1), w_uv_HVC.transpose(1, 2))  # [H, T, v]
        out = out_HTV.transpose(0, 1).reshape(num_tokens, self.num_heads * self.v_dim)
        return self.tp.all_reduce(self.o_proj(out))
