"""Llama-style decoder (dense Llama; the attention and layer skeleton reused by Mixtral and Qwen MoE models).

Parameter names mirror the Hugging Face checkpoint names, so the loader copies tensors 1:1.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

import torch
from torch import nn

from pd.dist.tp import SINGLE, TensorParallel
from pd.engine.forward_batch import ForwardBatch
from pd.layers import fp8_rows, fused_kernels
from pd.layers.activation import silu_and_mul
from pd.layers.attention import paged_attention
from pd.layers.norm import RMSNorm
from pd.layers.rotary import RotaryEmbedding
from pd.layers.split_k_parts import SplitKParts
from pd.models.base import CausalLM
from pd.models.config import ModelConfig
from pd.models.fused_linear import fuse_linears
from pd.moe.context import MoeContext
from pd.quant.fp8 import Fp8Linear

T = TypeVar("T")


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
        # fuse_qkv(): the fused linear (in a tuple: not a submodule, so the checkpoint's names stay q/k/v's) and the
        # three output sizes
        self._qkv: tuple[nn.Module, list[int]] | None = None
        # quantize_output_for_o_proj(): (scale group, most rows) of the attention outputs written in e4m3 too
        self._o_proj_fp8: tuple[int, int] | None = None
        # a block-FP8 o_proj's split-K partials go out unsummed (DecoderLayer.sum_o_proj_in_norm)
        self.o_proj_unsummed = False

    def quantize_output_for_o_proj(self) -> bool:
        """Has decode attention also write its output in e4m3 for a block-FP8 o_proj (pd.layers.fp8_rows: the
        o_proj's quantization launch folded into the attention's last one; the same values). For fused kernels
        only (it imports them). -> whether it does."""
        from pd.layers.triton_fp8_gemm import SPLIT_K_MAX_ROWS

        if not isinstance(self.o_proj, Fp8Linear):
            return False
        group = self.o_proj.block[1]
        if group < 16 or group & (group - 1) or self.head_dim % group or self.head_dim & (self.head_dim - 1):
            return False
        self._o_proj_fp8 = (group, SPLIT_K_MAX_ROWS)
        return True

    def _o_proj_fp8_group(self, num_tokens: int) -> int | None:
        """The group the attention writes e4m3 rows in for o_proj, if its GEMM reads them: only the split-K one
        (decode-sized rows, PD_FP8_GEMM=auto; pd.layers.triton_fp8_gemm.w8a8_block_linear)."""
        if self._o_proj_fp8 is None or num_tokens > self._o_proj_fp8[1]:
            return None
        from pd.layers import fp8_scaled_mm

        return self._o_proj_fp8[0] if fp8_scaled_mm.mode() == "auto" else None

    def fuse_qkv(self) -> bool:
        """Runs q/k/v as one GEMM from now on (pd.models.fused_linear: one launch instead of three; a block-FP8 one
        also quantizes its input once instead of three times). -> whether it fused."""
        if self._qkv is None:
            linears = (self.q_proj, self.k_proj, self.v_proj)
            fused = fuse_linears(linears)
            if fused is not None:
                self._qkv = (fused, [m.out_features for m in linears])
        return self._qkv is not None

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rotary: RotaryEmbedding) -> torch.Tensor | SplitKParts:
        """x [T, hidden] -> [T, hidden] (with o_proj_unsummed, maybe o_proj's unsummed split-K partials)."""
        num_tokens = x.shape[0]
        if self._qkv is not None:
            fused, sizes = self._qkv
            q, k, v = fused(x).split(sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        cache, store = batch.kv_cache, None
        if fused_kernels.enabled(q) and cache.dtype == q.dtype:  # (an FP8 cache converts in the backend's store)
            store = (v, *cache.buffers[self.layer_id], batch.layout.out_loc)
        # Qwen3's q/k norms, and on CUDA the KV store, fused into the rotation: rotated is None once K and V are
        # in the cache
        q, rotated = rotary(batch.positions, q, k, self.q_norm, self.k_norm, store)
        out = paged_attention(self.layer_id, q, k if rotated is None else rotated, v, batch, self.scale,
                              self.attended_kv_heads, kv_stored=rotated is None,
                              fp8_group=self._o_proj_fp8_group(num_tokens))  # fmt: skip
        rows = fp8_rows.flatten_rows(out)
        if self.o_proj_unsummed:  # (one rank: nothing to all-reduce)
            return self.o_proj.forward_unsummed(rows)
        return self.tp.all_reduce(self.o_proj(rows))


class DenseMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); gate/up column- and down row-parallel under ``tp``."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        what = "the MLP intermediate size"
        self.gate_proj = tp.column_linear(hidden_size, intermediate_size, 1, False, what)
        self.up_proj = tp.column_linear(hidden_size, intermediate_size, 1, False, what)
        self.down_proj = tp.row_linear(intermediate_size, 1, hidden_size, False, what)
        # fuse_gate_up(): the fused linear, in a tuple (not a submodule: the checkpoint's names stay gate's and up's)
        self._gate_up: tuple[nn.Module] | None = None

    def fuse_gate_up(self) -> bool:
        """Runs gate and up as one GEMM from now on (pd.models.fused_linear), whose [gate | up] rows the activation
        reads as they are: one launch fewer and no concatenation of the two outputs. -> whether it fused."""
        if self._gate_up is None:
            fused = fuse_linears((self.gate_proj, self.up_proj))
            self._gate_up = None if fused is None else (fused,)
        return self._gate_up is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is not None:
            gate_up = self._gate_up[0](x)
        else:
            gate_up = torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)
        return self.tp.all_reduce(self.down_proj(silu_and_mul(gate_up)))


class DecoderLayer(nn.Module):
    """Pre-norm residual block. The MLP sits under `mlp_name` (e.g. Mixtral's checkpoints say block_sparse_moe).

    The residual stream travels as a pair (x, delta) whose sum is the hidden state: each residual add happens inside
    the next norm's kernel (RMSNorm.add_forward), so on CUDA the two adds per layer cost no launch of their own. The
    sums are the ones the unfused block computes, rounded the same way.
    """

    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: nn.Module, mlp_name: str = "mlp") -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rotary: RotaryEmbedding,
                delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """x + delta enters the layer (delta None: zero) -> (x', mlp_out), whose sum leaves it."""
        x, h = self._attention(x, batch, rotary, delta)
        mlp = getattr(self, self.mlp_name)
        return x, (mlp(h, mode=batch.moe_mode) if hasattr(mlp, "stages") else mlp(h))

    def stages(
        self, x: torch.Tensor, batch: ForwardBatch, rotary: RotaryEmbedding, delta: torch.Tensor | None = None
    ) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor]]:
        """forward for two-batch overlap: yields where the MoE block lets tokens travel (never for a dense MLP)."""
        x, h = self._attention(x, batch, rotary, delta)
        mlp = getattr(self, self.mlp_name)
        out = (yield from mlp.stages(h, mode=batch.moe_mode)) if hasattr(mlp, "stages") else mlp(h)
        return x, out

    def quantize_norm_for_qkv(self) -> bool:
        """Has the input norm also write its decode-sized rows in e4m3 for a fused block-FP8 q/k/v projection
        (pd.layers.fp8_rows: one quantization launch fewer per layer; the same values). -> whether it does."""
        qkv = getattr(self.self_attn, "_qkv", None)
        if qkv is None or not isinstance(qkv[0], Fp8Linear):
            return False
        group, hidden = qkv[0].block[1], self.input_layernorm.weight.shape[0]
        if group < 16 or group & (group - 1) or group > hidden:  # the kernel's groups: powers of two in the row
            return False
        self.input_layernorm.quant_group = group
        return True

    def sum_o_proj_in_norm(self) -> bool:
        """Has a block-FP8 o_proj hand its split-K partials to the post-attention add-and-norm, which sums them as
        it loads them (pd.layers.split_k_parts: one launch fewer per layer at decode sizes; the same values). One
        rank only (an all-reduce needs the sum). For fused kernels only. -> whether it does."""
        attn = self.self_attn
        if not isinstance(attn, Attention) or not isinstance(attn.o_proj, Fp8Linear) or attn.tp.size != 1:
            return False
        attn.o_proj_unsummed = True
        return True

    def _attention(self, x: torch.Tensor, batch: ForwardBatch, rotary: RotaryEmbedding,
                   delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """-> (hidden state after attention, its post-attention norm)."""
        x, h = self.input_layernorm.add_forward(x, delta)
        # an idle DP-attention rank runs the MoE collectives with no tokens and no requests
        attn = self.self_attn(h, batch, rotary) if x.shape[0] else None
        return self.post_attention_layernorm.add_forward(x, attn)


class DecoderModel(nn.Module):
    """Embedding, decoder layers built by `make_layer(layer_id)`, final norm, one shared rotary table."""

    def __init__(self, config: ModelConfig, make_layer: Callable[[int], nn.Module], rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([make_layer(i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = rotary

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        x, delta = self.embed_tokens(batch.input_ids), None
        for layer in self.layers:
            x, delta = layer(x, batch, self.rotary_emb, delta)
        return self.norm.add_forward(x, delta)[1]

    def forward_two(self, first: ForwardBatch, second: ForwardBatch) -> torch.Tensor:
        """Two-batch overlap: the micro-batches go through each layer in turn, one's attention and experts running
        while the other's tokens travel. -> hidden states [T1 + T2, hidden], first's tokens then second's."""
        xs: list[tuple[torch.Tensor, torch.Tensor | None]] = [(self.embed_tokens(first.input_ids), None),
                                                              (self.embed_tokens(second.input_ids), None)]
        for layer in self.layers:
            (x0, d0), (x1, d1) = xs
            rotary = self.rotary_emb
            xs = interleave([layer.stages(x0, first, rotary, d0), layer.stages(x1, second, rotary, d1)])
        deltas = [d for _, d in xs]
        delta = None if deltas[0] is None or deltas[1] is None else torch.cat(deltas)
        return self.norm.add_forward(torch.cat([x for x, _ in xs]), delta)[1]


def interleave(steps: list[Generator[None, None, T]]) -> list[T]:
    """Runs the generators a step each in turn until all are done; -> their return values, in order. Every rank
    runs the same steps in the same order, so their collectives line up."""
    results: list[T | None] = [None] * len(steps)
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

