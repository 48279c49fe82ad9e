"""Every production Triton kernel compiles for an H100/H200 (sm_90) at the shapes and block sizes it runs with, on
this GPU-less machine (tests/hopper_compile.py): the interpreter tests check what the kernels compute, this what
the compiler accepts (the interpreter runs code the compiler rejects)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (the test extra installs it)")  # fmt: skip

BLOCK = (128, 128)


def _assert_compiled(result, kernels: set[str]) -> None:  # noqa: ANN001
    assert not result.failed, "\n\n".join(f"{name} {consts}:\n{message[-3000:]}" for name, consts, message
                                          in result.failed)  # fmt: skip
    assert kernels <= {name for name, _ in result.ok}, (kernels, result.ok)


def _decode_attention_writing_fp8_rows() -> None:
    """Decode attention at GQA-8 head shapes whose merge also writes e4m3 rows for a block-FP8 o_proj."""
    import pd.attention.triton_decode as decode
    from tests.test_attention_kernels import GPU_HEADS, make_batch

    h = GPU_HEADS["gqa8"]
    b = make_batch(0, [40, 7], [1, 1], h, 16, torch.bfloat16)
    out = torch.empty(2, h.q, h.dv, dtype=torch.bfloat16)
    quant = (torch.empty(2, h.q * h.dv, dtype=torch.float8_e4m3fn), torch.empty(2, h.q * h.dv // 128), 128)
    decode.decode_attention(b.q, b.k_buffer, b.v_buffer, out, b.page_table, b.rows, b.prefix_lens + 1, b.scale, 16,
                            4, fp8_rows=quant)  # fmt: skip


def test_fused_moe_kernels_compile_for_hopper() -> None:
    """The runner's launches: FP8 in the standard and batched formats with one scale row per column block
    (SCALAR_B), FP8 with one per column (gate/up split off a scale block), FP8 decode tiles (the GEMM quantizes its
    A tiles, the act-and-mul launch its rows), bf16. (Each variant costs seconds of
    compilation on a cold cache: the few that cover every constexpr branch.)"""
    from pd.moe.runner.triton_runner import TritonMoeRunner
    from tests.hopper_compile import compile_for_hopper
    from tests.test_moe_triton import make_batched_case, make_case
    from tests.test_moe_triton_fp8 import quantize_experts

    with compile_for_hopper() as result:
        for inter, block_n, fp8, batched, block_m in ((384, 128, True, False, 64), (384, 128, True, True, 64),
                                                      (320, 64, True, False, 64), (384, 128, False, False, 64),
                                                      (384, 128, True, False, 16)):  # fmt: skip
            config = dict(BLOCK_SIZE_M=block_m, BLOCK_SIZE_N=block_n, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4,
                          num_stages=3)  # fmt: skip
            dispatched, w13, w2 = (make_batched_case(0, 4, 16, torch.bfloat16, hidden=256, inter=inter) if batched
                                   else make_case(0, 16, 2, 8, torch.bfloat16, hidden=256, inter=inter))  # fmt: skip
            if fp8:
                q13, q2, scales = quantize_experts(w13, w2, BLOCK)
                TritonMoeRunner(config).run(dispatched, q13, q2, "silu", scales)
            else:
                TritonMoeRunner(config).run(dispatched, w13, w2, "silu")
    _assert_compiled(result, {"_fused_moe_kernel", "_act_and_mul_quant_kernel", "_act_and_mul_kernel"})
    variants = {(c["USE_FP8"], c["SCALAR_B"], c["QUANTIZE_A"]) for name, c in result.ok if name == "_fused_moe_kernel"}
    assert variants == {(True, True, False), (True, False, False), (False, False, False), (True, True, True)}, variants


def test_fp8_linear_kernels_compile_for_hopper() -> None:
    """The block-FP8 GEMM (prefill rows) and the split-K GEMM (decode rows), activations quantized inside or
    before, with and without a bias."""
    from pd.layers.triton_fp8_gemm import token_group_quant, w8a8_block_gemm, w8a8_split_k_linear
    from pd.quant.fp8 import block_quant
    from tests.hopper_compile import compile_for_hopper

    weight, scale = block_quant(torch.randn(512, 1024) / 32, BLOCK)
    bias = torch.randn(512, dtype=torch.bfloat16)
    with compile_for_hopper() as result:
        x = torch.randn(256, 1024, dtype=torch.bfloat16)
        a_q, a_scale = token_group_quant(x, BLOCK[1])
        w8a8_block_gemm(a_q, a_scale, weight, scale, BLOCK, torch.bfloat16)
        for before in (False, True):
            for b in (None, bias):
                w8a8_split_k_linear(x[:16], weight, scale, BLOCK, b, splits=4, quantize_before=before)
    _assert_compiled(result, {"_token_group_quant_kernel", "_w8a8_block_gemm_kernel", "_w8a8_split_k_kernel",
                              "_sum_splits_kernel"})  # fmt: skip


def test_attention_kernels_compile_for_hopper() -> None:
    """Paged decode (split keys, then the merge) and extend at production head shapes: GQA over a bf16 and an FP8
    cache, and MLA's latent heads; the merge also writing e4m3 rows for a block-FP8 o_proj."""
    import pd.attention.triton_decode as decode
    import pd.attention.triton_extend as extend
    from tests.hopper_compile import compile_for_hopper
    from tests.test_attention_kernels import GPU_HEADS, make_batch, run_decode, run_extend

    with compile_for_hopper() as result:
        for heads, kv_dtype in (("gqa4", None), ("gqa4", torch.float8_e4m3fn), ("mla", None)):
            h = GPU_HEADS[heads]
            run_decode(decode, make_batch(0, [40, 7], [1, 1], h, 16, torch.bfloat16, kv_dtype=kv_dtype), splits=4)
            run_extend(extend, make_batch(0, [40, 7], [30, 5], h, 16, torch.bfloat16, kv_dtype=kv_dtype))
        _decode_attention_writing_fp8_rows()
    _assert_compiled(result, {"_decode_stage1_kernel", "_decode_stage2_kernel", "_extend_kernel"})
    assert {c["QUANT_GROUP"] for name, c in result.ok if name == "_decode_stage2_kernel"} == {0, 128}


def test_router_norm_and_rotary_kernels_compile_for_hopper() -> None:
    """The fused router (softmax top-8 of 128, DeepSeek-V3's grouped sigmoid top-8 of 256 with bias), RMSNorm
    (plain, with the residual add, with e4m3 rows written too, adding split-K partials) and the rotary kernel (with
    q/k norms)."""
    from pd.layers.split_k_parts import SplitKParts
    from pd.layers.triton_rmsnorm import add_rms_norm, rms_norm
    from pd.layers.triton_rotary import apply_rotary
    from pd.moe.topk import TopKConfig
    from pd.moe.triton_topk import fused_select_experts
    from tests.hopper_compile import compile_for_hopper

    with compile_for_hopper() as result:
        fused_select_experts(torch.randn(64, 128, dtype=torch.bfloat16), TopKConfig(top_k=8))
        deepseek = TopKConfig(top_k=8, scoring="sigmoid", num_expert_group=8, topk_group=4, group_scoring="top2_sum",
                              routed_scaling_factor=2.5)  # fmt: skip
        fused_select_experts(torch.randn(64, 256, dtype=torch.bfloat16), deepseek, torch.randn(256))
        x = torch.randn(64, 2048, dtype=torch.bfloat16)
        w = torch.ones(2048, dtype=torch.bfloat16)
        rms_norm(x, w, 1e-6)
        add_rms_norm(x, x.clone(), w, 1e-6)
        add_rms_norm(x, x.clone(), w, 1e-6, quant_group=128)  # also writing e4m3 rows for an FP8 linear
        add_rms_norm(x, SplitKParts(torch.randn(4, 64, 2048), w, x.dtype), w, 1e-6)  # summing split-K partials
        q, k = torch.randn(64, 32, 128, dtype=torch.bfloat16), torch.randn(64, 4, 128, dtype=torch.bfloat16)
        table = torch.randn(4096, 2, 64)
        norm_w = torch.ones(128, dtype=torch.bfloat16)
        apply_rotary(torch.arange(64), q, k, table, False, (norm_w, 1e-6, norm_w, 1e-6))
    _assert_compiled(result, {"_select_experts_kernel", "_rmsnorm_kernel", "_add_rmsnorm_kernel", "_rotary_kernel"})
    assert {(c["QUANT_GROUP"], c["SPLITS"]) for name, c in result.ok if name == "_add_rmsnorm_kernel"} == {
        (0, 0), (128, 0), (0, 4)}


def test_dense_mlp_activation_compiles_for_hopper() -> None:
    """silu(gate) * up of DeepSeek-V3's dense MLP rows (18432 wide) in bf16, and of a width below one block."""
    from pd.layers.triton_activation import silu_and_mul_rows
    from tests.hopper_compile import compile_for_hopper

    with compile_for_hopper() as result:
        silu_and_mul_rows(torch.randn(64, 2 * 18432, dtype=torch.bfloat16))
        silu_and_mul_rows(torch.randn(4, 2 * 100))
    _assert_compiled(result, {"_silu_and_mul_kernel"})


def test_greedy_argmax_kernels_compile_for_hopper() -> None:
    """Greedy sampling's argmax over a Qwen3 vocabulary, bf16 and float32 logits."""
    from pd.engine.triton_argmax import argmax_rows
    from tests.hopper_compile import compile_for_hopper

    with compile_for_hopper() as result:
        argmax_rows(torch.randn(64, 151936, dtype=torch.bfloat16))
        argmax_rows(torch.randn(1, 151936))
    _assert_compiled(result, {"_chunk_argmax_kernel", "_rows_argmax_kernel"})


def test_fused_moe_weight_descriptor_compiles_for_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused-MoE GEMM with its weight tiles read through a tensor descriptor (PD_MOE_TMA=1), bf16 and FP8."""
    from pd.moe.runner.fused_moe_kernel import BlockFp8, invoke_fused_moe_gemm
    from pd.moe.runner.moe_align import align_pairs_to_blocks
    from pd.quant.fp8 import FP8_DTYPE
    from tests.hopper_compile import compile_for_hopper

    experts, n, k, tokens, top_k = 8, 768, 512, 64, 2
    config = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=128, BLOCK_SIZE_K=128, GROUP_SIZE_M=8, num_warps=4, num_stages=3)
    c = torch.empty(tokens * top_k, n, dtype=torch.bfloat16)
    with compile_for_hopper() as result:
        aligned = align_pairs_to_blocks(torch.randint(0, experts, (tokens, top_k)), experts, 64)  # shapes only
        blocks = (aligned.sorted_ids, aligned.expert_of_block, aligned.num_rows_post_pad)
        x, w = torch.randn(tokens, k, dtype=torch.bfloat16), torch.randn(experts, n, k, dtype=torch.bfloat16)
        invoke_fused_moe_gemm(x, w, c, *blocks, top_k, False, dict(config, BLOCK_SIZE_K=64), tma=True)
        fp8 = BlockFp8(torch.ones(tokens, k // 128), torch.ones(experts, n // 128, k // 128), BLOCK, n)
        invoke_fused_moe_gemm(x.to(FP8_DTYPE), w.to(FP8_DTYPE), c, *blocks, top_k, False, config, fp8=fp8, tma=True)
    _assert_compiled(result, {"_fused_moe_kernel"})
    variants = {(c["USE_FP8"], c["B_DESC"]) for name, c in result.ok if name == "_fused_moe_kernel"}
    assert variants == {(False, True), (True, True)}, variants
