"""The compute roofline of a prompt forward: the matmul FLOPs it must do over the GPU's bf16 matmul rate.

A prefill of P prompts of L tokens is compute-bound: every token goes through each layer's projections, its
experts and its attention over the tokens before it; only the last position of each prompt needs logits. Its
FLOPs over the rate of one large GEMM on the same GPU (measured in the same run) is the shortest time any server
could take, and that time over transformers' gives the largest ratio to transformers any server could reach.
Elementwise work (norms, rotary, activations) is left out: it is memory-bound and small beside the GEMMs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def prefill_flops(config, prompts: int, length: int, causal: bool = True) -> float:  # noqa: ANN001
    """Matmul FLOPs (2 per multiply-add) of one forward over ``prompts`` prompts of ``length`` tokens with logits at
    each prompt's last position, for a transformers Qwen3-MoE or DeepSeek-V3 config. causal=False counts every
    query against every key of its prompt (what a FLOP counter reports for an attention kernel given a mask)."""
    tokens = prompts * length
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    if hasattr(config, "kv_lora_rank"):  # MLA: prompts attend over per-head keys expanded from the latents
        qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        v_dim = config.v_head_dim
        q = (hidden * heads * qk_dim if config.q_lora_rank is None
             else hidden * config.q_lora_rank + config.q_lora_rank * heads * qk_dim)  # fmt: skip
        kv = hidden * (config.kv_lora_rank + config.qk_rope_head_dim)
        kv += config.kv_lora_rank * heads * (config.qk_nope_head_dim + v_dim)
        projections = q + kv + heads * v_dim * hidden
    else:
        qk_dim = v_dim = config.head_dim
        projections = hidden * config.head_dim * (2 * heads + 2 * config.num_key_value_heads)
    pairs = length * (length + 1) // 2 if causal else length * length  # (query, key) pairs per prompt
    attention = prompts * pairs * heads * (qk_dim + v_dim)
    experts = getattr(config, "num_experts", None) or config.n_routed_experts
    routed = hidden * experts + config.num_experts_per_tok * 3 * hidden * config.moe_intermediate_size
    shared = 3 * hidden * config.moe_intermediate_size * (getattr(config, "n_shared_experts", None) or 0)
    dense_layers = getattr(config, "first_k_dense_replace", 0)
    mlp = dense_layers * 3 * hidden * config.intermediate_size + (layers - dense_layers) * (routed + shared)
    lm_head = prompts * hidden * config.vocab_size
    return 2.0 * (tokens * (layers * projections + mlp) + layers * attention + lm_head)


def sync(device: str) -> None:
    """Waits for the device's queued work (nothing to wait for on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(run: Callable[[], object], device: str) -> float:
    """The median wall time of 10 calls of ``run`` after 3 warm-ups, each fenced by a device sync: how this benchmark
    measures a hardware rate (a GEMM's here, a copy's bandwidth in bench_gpu_serve)."""
    times = []
    for _ in range(13):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def matmul_rate(device: str, n: int | None = None) -> float:
    """bf16 FLOP/s of one [n, n] x [n, n] GEMM (n 8192 on CUDA, 1024 elsewhere), timed by median_seconds: the rate
    every GEMM of the roofline is counted at."""
    n = n or (8192 if device == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2.0 * n**3 / median_seconds(lambda: torch.mm(a, b), device)
