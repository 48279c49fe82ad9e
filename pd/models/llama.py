"""Llama-style decoder (dense Llama; the attention and layer skeleton reused by Mixtral and Qwen MoE models).

Parameter names mirror the Hugging Face checkpoint names, so the loader copies tensors 1:1.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch
from torch import nn

from pd.dist.tp import SINGLE, TensorParallel
from pd.engine.forward_batch import ForwardBatch
from pd.layers.activation import silu_and_mul
from pd.layers.attention import paged_attention
from pd.layers.norm import RMSNorm
from pd.layers.rotary import RotaryEmbedding
from pd.models.base import CausalLM
from pd.models.config import ModelConfig
from pd.moe.context import MoeContext


class Attention(nn.Module):
    """GQA attention with optional q/k/v bias (Qwen2) and per-head q/k RMSNorm before rope (Qwen3).

    Under tensor parallelism each rank runs a contiguous block of query heads (q_proj column-, o_proj
    row-parallel, all-reduced) and computes and caches only the KV heads those queries use (TensorParallel.kv_heads:
    kv_heads / tp each, or one head shared by tp / kv_heads ranks when there are fewer KV heads than ranks). With
    sharding off every rank caches all KV heads and its queries attend over their share of them.
    """

    def __init__(
        self,
        config: ModelConfig,
        layer_id: int,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        tp: TensorParallel = SINGLE,
    ) -> None:
        super().__init__()
        self.layer_id, self.tp = layer_id, tp
        num_heads, total_kv_heads, self.head_dim = config.num_attention_heads, config.num_kv_heads, config.head_dim
        try:
            self.first_kv_head, self.num_kv_heads = tp.kv_heads(total_kv_heads)
        except ValueError as e:
            raise ValueError(f"{config.architecture}: {e}") from None
        self.num_heads = tp.split(num_heads, "the number of attention heads")
        # The cached heads this rank's queries use, relative to its cached range (None: all of them).
        group = num_heads // total_kv_heads  # query heads per KV head
        first_head = tp.rank * self.num_heads
        used = slice(first_head // group - self.first_kv_head,
                     (first_head + self.num_heads - 1) // group + 1 - self.first_kv_head)
        assert 0 <= used.start < used.stop <= self.num_kv_heads, (used, self.first_kv_head, self.num_kv_heads)
        self.attended_kv_heads = None if used == slice(0, self.num_kv_heads) else used
        hidden = config.hidden_size
        self.q_proj = tp.column_linear(hidden, num_heads, self.head_dim, qkv_bias, "the number of attention heads")
        self.k_proj = tp.kv_linear(hidden, total_kv_heads, self.head_dim, qkv_bias)
        self.v_proj = tp.kv_linear(hidden, total_kv_heads, self.head_dim, qkv_bias)
        self.o_proj = tp.row_linear(num_heads, self.head_dim, hidden, o_bias, "the number of attention heads")
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rotary: RotaryEmbedding) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(batch.positions, q, k)
        out = paged_attention(self.layer_id, q, k, v, batch, self.scale, self.attended_kv_heads)
        return self.tp.all_reduce(self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim)))


class DenseMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); gate/up column- and down row-parallel under ``tp``."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        what = "the MLP intermediate size"
        self.gate_proj = tp.column_linear(hidden_size, intermediate_size, 1, False, what)
        self.up_proj = tp.column_linear(hidden_size, intermediate_size, 1, False, what)
        self.down_proj = tp.row_linear(intermediate_size, 1, hidden_size, False, what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(silu_and_mul(torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1))))


class DecoderLayer(nn.Module):
    """Pre-norm residual block. The MLP sits under `mlp_name` (e.g. Mixtral's checkpoints say block_sparse_moe)."""

    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: nn.Module, mlp_name: str = "mlp") -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rotary: RotaryEmbedding) -> torch.Tensor:
        if x.shape[0]:  # an idle DP-attention rank runs the MoE collectives with no tokens and no requests
            x = x + self.self_attn(self.input_layernorm(x), batch, rotary)
        mlp, h = getattr(self, self.mlp_name), self.post_attention_layernorm(x)
        return x + (mlp(h, mode=batch.moe_mode) if hasattr(mlp, "stages") else mlp(h))

    def stages(
        self, x: torch.Tensor, batch: ForwardBatch, rotary: RotaryEmbedding
    ) -> Generator[None, None, torch.Tensor]:
        """forward for two-batch overlap: yields where the MoE block lets tokens travel (never for a dense MLP)."""
        if x.shape[0]:
            x = x + self.self_attn(self.input_layernorm(x), batch, rotary)
        mlp = getattr(self, self.mlp_name)
        h = self.post_attention_layernorm(x)
        out = (yield from mlp.stages(h, mode=batch.moe_mode)) if hasattr(mlp, "stages") else mlp(h)
        return x + out


class DecoderModel(nn.Module):
    """Embedding, decoder layers built by `make_layer(layer_id)`, final norm, one shared rotary table."""

    def __init__(self, config: ModelConfig, make_layer: Callable[[int], nn.Module], rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([make_layer(i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = rotary

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        for layer in self.layers:
            x = layer(x, batch, self.rotary_emb)
        return self.norm(x)

    def forward_two(self, first: ForwardBatch, second: ForwardBatch) -> torch.Tensor:
        """Two-batch overlap: the micro-batches go through each layer in turn, one's attention and experts running
        while the other's tokens travel. -> hidden states [T1 + T2, hidden], first's tokens then second's."""
        xs = [self.embed_tokens(first.input_ids), self.embed_tokens(second.input_ids)]
        for layer in self.layers:
            xs = interleave([layer.stages(xs[0], first, self.rotary_emb), layer.stages(xs[1], second, self.rotary_emb)])
        return self.norm(torch.cat(xs))


def interleave(steps: list[Generator[None, None, torch.Tensor]]) -> list[torch.Tensor]:
    """Runs the generators a step each in turn until all are done; -> their return values, in order. Every rank
    runs the same steps in the same order, so their collectives line up."""
    results: list[torch.Tensor | None] = [None] * len(steps)
    active = list(range(len(steps)))
    while active:
        for i in list(active):
            try:
                next(steps[i])
            except StopIteration as done:
                results[i] = done.value
                active.remove(i)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def default_rotary(config: ModelConfig, max_position: int) -> RotaryEmbedding:
    return RotaryEmbedding(config.head_dim, config.rope_parameters, max_position)


class GQACausalLM(CausalLM):
    """A `DecoderModel` under `self.model` with grouped-query attention: K and V per layer, kv_heads x head_dim."""

    config: ModelConfig

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        return self.model(batch)

    def kv_layout(self) -> list[tuple[int, int]]:
        attn = self.model.layers[0].self_attn
        return [(attn.num_kv_heads, attn.head_dim)] * 2

    def kv_heads(self) -> tuple[int, int, int]:
        attn = self.model.layers[0].self_attn
        return attn.first_kv_head, attn.num_kv_heads, self.config.num_kv_heads


class LlamaForCausalLM(GQACausalLM):
    def __init__(
        self, config: ModelConfig, moe_ctx: MoeContext, max_position: int, tp: TensorParallel = SINGLE
    ) -> None:
        super().__init__()
        bias = bool(config.get("attention_bias", False))

        def make_layer(i: int) -> nn.Module:
            attn = Attention(config, i, qkv_bias=bias, o_bias=bias, tp=tp)
            return DecoderLayer(config, attn, DenseMLP(config.hidden_size, config.intermediate_size, tp))

        self.config = config
        self.model = DecoderModel(config, make_layer, default_rotary(config, max_position))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

