"""Block-FP8 (W8A8, 128x128 weight blocks, 1x128 activation groups) Triton kernels against torch._scaled_mm and bf16,
all measured in the same run on the same shapes.

Dense linears (pd.layers.triton_fp8_gemm): DeepSeek-V3 and Qwen3-30B-A3B projection shapes at decode and prefill
token counts. Per shape:
- ``fp8 us``: the Triton block-FP8 GEMM on pre-quantized activations; ``cublas us``: cuBLAS's block-scaled GEMM
  (pd.layers.fp8_scaled_mm, where the GPU and CUDA run it) on the same operands; ``linear us``: the whole linear
  as Fp8Linear runs it (activation quantization, then whichever GEMM pd.layers.fp8_scaled_mm.use_cublas picks);
- ``_scaled_mm``: torch._scaled_mm on the same [M, K] x [K, N] e4m3 operands with one scale per tensor (no
  blocks: cuBLAS's FP8 GEMM, the compute bound), M padded to 16 where cuBLAS needs it;
- ``bf16``: torch.matmul of the bf16 operands;
- ``TFLOP/s`` = 2MNK / time, ``%smm`` = _scaled_mm's time / the block-FP8 GEMM's (acceptance at prefill sizes:
  >= 60; ``%smm cb`` the same for cuBLAS's block-scaled GEMM), ``x bf16`` = bf16 time / the FP8 linear's time
  (> 1: FP8 faster), ``%copy`` = weight bytes / time against
  a device-to-device copy measured in this run (the bound at decode sizes).

Fused MoE (the Triton runner, pd.moe.runner.triton_runner): Qwen3-30B-A3B (128 experts, hidden 2048, intermediate
768, top-8) and DeepSeek-V3 at EP=8 (32 local of 256 experts, hidden 7168, intermediate 2048, top-8) with FP8
experts and with bf16 experts, against torch._scaled_mm on dense GEMMs of the same FLOPs ([pairs, H] x [H, 2I] and
[pairs, I] x [I, H]); TFLOP/s = 6 x local pairs x H x I / time. Beside it, the experts' own shapes: ``%smm e``, torch.
_scaled_mm once per expert on its rows ([rows_e, H] x [H, 2I] and [rows_e, I] x [I, H], all in one CUDA graph), and
``%sgmm``, torch._scaled_grouped_mm over the same groups (row-wise scales), each time / the FP8 runner's.

Times are medians of triton.testing.do_bench over a CUDA graph holding one call. With --check each FP8 output is
first compared with the dequantize-then-bf16 reference (relative L2 error, printed). About 3 minutes on an H200.
With --sweep, the dense GEMM's block sizes: per shape and token count, the fastest of a small candidate set next
to what pd.layers.triton_fp8_gemm.gemm_config picks (how its defaults were chosen). With --sweep-split-k the same
for the decode-sized split-K linear (BLOCK_N, splits, warps, stages; its sums included; SPLIT_K_CONFIG's choice).

Usage: python benchmarks/bench_fp8_gemm.py [--check] [--sweep] [--tokens 1 64 4096] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
from benchmarks.bench_moe_kernel import graph_ms  # noqa: E402
from pd.quant.fp8 import FP8_DTYPE, block_dequant, block_quant  # noqa: E402

DEVICE = "cuda"
BLOCK = (128, 128)
COPY_BYTES = 2 << 30
# name -> (N, K) of one linear
DENSE = {
    "dsv3.q_a": (1536, 7168),
    "dsv3.kv_a_mqa": (576, 7168),
    "dsv3.q_b": (24576, 1536),
    "dsv3.o": (7168, 16384),
    "dsv3.mlp_gate_up": (36864, 7168),
    "dsv3.mlp_down": (7168, 18432),
    "qwen3.qkv": (5120, 2048),
    "qwen3.o": (2048, 4096),
}
# name -> (local experts, hidden, intermediate, top_k, experts routed over)
MOE = {"qwen3-30b-a3b": (128, 2048, 768, 8, 128), "deepseek-v3-ep8": (32, 7168, 2048, 8, 256)}
TOKENS = [1, 16, 64, 256, 1024, 4096, 8192]


def copy_gbps() -> float:
    """A device-to-device copy of COPY_BYTES, counting the bytes read and written."""
    import triton

    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / float(triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")) / 1e6


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def scaled_mm_ms(m: int, n: int, k: int) -> float:
    """torch._scaled_mm on [m, k] x [k, n] e4m3 with per-tensor scales, bf16 out (m padded to a multiple of 16)."""
    m = -(-m // 16) * 16
    a = torch.randn(m, k, device=DEVICE).to(FP8_DTYPE)
    b = torch.randn(n, k, device=DEVICE).to(FP8_DTYPE).t()  # column-major, as cuBLAS wants the second operand
    one = torch.ones((), device=DEVICE)
    return graph_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))


def per_expert_scaled_mm_ms(rows: list[int], hidden: int, inter: int) -> float:
    """torch._scaled_mm on the MoE's own shapes: for each expert with rows, [rows, H] x [H, 2I] and [rows, I] x [I, H]
    (e4m3, per-tensor scales, bf16 out, rows padded to 16 as cuBLAS needs), every call in one CUDA graph (no launch
    gaps between them)."""
    calls = []
    for r in rows:
        if r:
            m = -(-r // 16) * 16
            for k, n in ((hidden, 2 * inter), (inter, hidden)):
                a = torch.randn(m, k, device=DEVICE).to(FP8_DTYPE)
                calls.append((a, torch.randn(n, k, device=DEVICE).to(FP8_DTYPE).t()))
    one = torch.ones((), device=DEVICE)
    return graph_ms(lambda: [torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
                             for a, b in calls])  # fmt: skip


def grouped_scaled_mm_ms(rows: list[int], hidden: int, inter: int) -> float:
    """torch._scaled_grouped_mm (one grouped FP8 GEMM, row-wise scales: no blocks) on the same expert groups, each
    padded to 16 rows: [sum rows, H] x [E, H, 2I], then [sum rows, I] x [E, I, H]."""
    padded = [-(-r // 16) * 16 for r in rows]
    offs = torch.tensor(padded, device=DEVICE).cumsum(0).to(torch.int32)
    total, experts = int(offs[-1]), len(rows)
    calls = []
    for k, n in ((hidden, 2 * inter), (inter, hidden)):
        a = torch.randn(total, k, device=DEVICE).to(FP8_DTYPE)
        b = torch.randn(experts, n, k, device=DEVICE).to(FP8_DTYPE).transpose(-2, -1)  # each expert column-major
        calls.append((a, b, torch.ones(total, device=DEVICE), torch.ones(experts, n, device=DEVICE)))
    return graph_ms(lambda: [torch._scaled_grouped_mm(a, b, sa, sb, offs=offs, out_dtype=torch.bfloat16)
                             for a, b, sa, sb in calls])  # fmt: skip


def bench_dense(name: str, m: int, copy: float, check: bool) -> dict[str, object]:
    from pd.layers import fp8_scaled_mm
    from pd.layers.triton_fp8_gemm import (
        token_group_quant,
        token_group_quant_for_cublas,
        w8a8_block_gemm,
        w8a8_block_linear,
    )

    n, k = DENSE[name]
    w_q, w_scale = block_quant(torch.randn(n, k, device=DEVICE) / k**0.5, BLOCK)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    a_q, a_scale = token_group_quant(x, BLOCK[1])
    w_bf16 = block_dequant(w_q, w_scale, BLOCK, torch.bfloat16)
    row: dict[str, object] = {"kind": "dense", "name": name, "m": m, "n": n, "k": k}
    if check:
        row["rel_l2_vs_bf16"] = rel_l2(w8a8_block_linear(x, w_q, w_scale, BLOCK), F.linear(x, w_bf16))
    t_gemm = graph_ms(lambda: w8a8_block_gemm(a_q, a_scale, w_q, w_scale, BLOCK, torch.bfloat16))
    t_linear = graph_ms(lambda: w8a8_block_linear(x, w_q, w_scale, BLOCK))
    if fp8_scaled_mm.available(torch.device(DEVICE)):
        c_q, c_scale = token_group_quant_for_cublas(x, BLOCK[1])
        if check:
            got = fp8_scaled_mm.block_scaled_mm(c_q, c_scale, w_q, w_scale, torch.bfloat16)[:m]
            row["cublas_rel_l2_vs_bf16"] = rel_l2(got, F.linear(x, w_bf16))
        t_cublas = graph_ms(lambda: fp8_scaled_mm.block_scaled_mm(c_q, c_scale, w_q, w_scale, torch.bfloat16))
        row.update(cublas_us=t_cublas * 1e3)
    t_smm = scaled_mm_ms(m, n, k)
    t_bf16 = graph_ms(lambda: torch.matmul(x, w_bf16.t()))
    flops = 2 * m * n * k
    row.update(fp8_us=t_gemm * 1e3, linear_us=t_linear * 1e3, scaled_mm_us=t_smm * 1e3, bf16_us=t_bf16 * 1e3,
               tflops=flops / t_gemm / 1e9, scaled_mm_tflops=flops / t_smm / 1e9, pct_scaled_mm=100 * t_smm / t_gemm,
               x_bf16=t_bf16 / t_linear, pct_copy=100 * (n * k) / t_linear / 1e6 / copy)  # fmt: skip
    if "cublas_us" in row:
        row["pct_scaled_mm_cublas"] = 100 * t_smm / (row["cublas_us"] / 1e3)  # type: ignore[operator]
    return row


def bench_moe(name: str, tokens: int, copy: float, check: bool) -> dict[str, object]:
    from pd.moe.dispatcher.base import DispatchOutput
    from pd.moe.runner import ExpertScales
    from pd.moe.runner.torch_ref import TorchMoeRunner
    from pd.moe.runner.triton_runner import TritonMoeRunner

    experts, hidden, inter, top_k, routed = MOE[name]
    gen = torch.Generator(DEVICE).manual_seed(tokens)
    weights, ids = torch.rand(tokens, routed, generator=gen, device=DEVICE).topk(top_k, dim=-1)
    ids = torch.where(ids < experts, ids, -1)  # other ranks' experts
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16)
    dispatched = DispatchOutput(x, ids, weights / weights.sum(-1, keepdim=True), handle=None)
    # Gate and up quantized apart, as the loader stores them; with I a multiple of 128 that is quantizing w13 whole.
    w13_q, w13_s = zip(*(block_quant(torch.randn(2 * inter, hidden, device=DEVICE) / hidden**0.5, BLOCK)
                         for _ in range(experts)), strict=True)  # fmt: skip
    w2_q, w2_s = zip(*(block_quant(torch.randn(hidden, inter, device=DEVICE) / inter**0.5, BLOCK)
                       for _ in range(experts)), strict=True)  # fmt: skip
    q13, q2 = torch.stack(w13_q), torch.stack(w2_q)
    scales = ExpertScales(torch.stack(w13_s), torch.stack(w2_s), BLOCK)
    w13, w2 = block_dequant(q13, scales.w13, BLOCK, torch.bfloat16), block_dequant(q2, scales.w2, BLOCK, torch.bfloat16)
    runner = TritonMoeRunner()
    pairs = int((ids >= 0).sum())
    hit = int(torch.unique(ids[ids >= 0]).numel())
    row: dict[str, object] = {"kind": "moe", "name": name, "m": tokens, "pairs": pairs, "hit": hit}
    if check:
        got = runner.run(dispatched, q13, q2, scales=scales).hidden_states
        row["rel_l2_vs_bf16"] = rel_l2(got, TorchMoeRunner().run(dispatched, w13, w2).hidden_states)
    t_fp8 = graph_ms(lambda: runner.run(dispatched, q13, q2, scales=scales))
    t_bf16 = graph_ms(lambda: runner.run(dispatched, w13, w2))
    flops = 6 * pairs * hidden * inter
    row.update(fp8_us=t_fp8 * 1e3, bf16_us=t_bf16 * 1e3, x_bf16=t_bf16 / t_fp8,
               pct_copy=100 * hit * 3 * hidden * inter / t_fp8 / 1e6 / copy)  # fmt: skip
    if pairs:
        t_smm = scaled_mm_ms(pairs, 2 * inter, hidden) + scaled_mm_ms(pairs, hidden, inter)
        row.update(tflops=flops / t_fp8 / 1e9, scaled_mm_tflops=flops / t_smm / 1e9, scaled_mm_us=t_smm * 1e3,
                   pct_scaled_mm=100 * t_smm / t_fp8)  # fmt: skip
        # The same GEMMs as the experts compute them, one per expert (the dense pair above is one GEMM of all rows,
        # which no MoE gets to run), and as torch's grouped FP8 GEMM.
        rows = torch.bincount(ids[ids >= 0].flatten(), minlength=experts).tolist()
        for key, reference in (("per_expert", per_expert_scaled_mm_ms), ("grouped", grouped_scaled_mm_ms)):
            try:
                t_ref = reference(rows, hidden, inter)
            except Exception as e:  # e.g. a torch without the grouped GEMM for this GPU
                print(f"    {name} {tokens}: {key} reference failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            row[f"{key}_scaled_mm_us"] = t_ref * 1e3
            row[f"pct_{key}_scaled_mm"] = 100 * t_ref / t_fp8
    return row


def candidates(m: int) -> list[tuple[int, ...]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) worth trying at m rows."""
    if m <= 16:
        return [(16, n, 128, 1, 4, s) for n in (32, 64, 128) for s in (3, 4, 5)]
    if m <= 128:
        return [(bm, n, 128, 1, 4, s) for bm in (32, 64) for n in (64, 128) for s in (3, 4)]
    return [(bm, n, 128, 8, w, s) for bm in (64, 128) for n in (128, 256) for w in (4, 8) for s in (3, 4)
            if bm * n <= 128 * 128 or w == 8]  # fmt: skip


def sweep(name: str, m: int) -> dict[str, object]:
    """The fastest candidate config for one dense shape, and the default's time."""
    from pd.layers.triton_fp8_gemm import CONFIG_KEYS, gemm_config, token_group_quant, w8a8_block_gemm

    n, k = DENSE[name]
    w_q, w_scale = block_quant(torch.randn(n, k, device=DEVICE) / k**0.5, BLOCK)
    a_q, a_scale = token_group_quant(torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16), BLOCK[1])
    times = {}
    for cfg in candidates(m):
        config = dict(zip(CONFIG_KEYS, cfg, strict=True))
        try:
            times[cfg] = graph_ms(lambda c=config: w8a8_block_gemm(a_q, a_scale, w_q, w_scale, BLOCK, torch.bfloat16,
                                                                   config=c))  # fmt: skip
        except Exception as e:  # out of shared memory or registers: skip it
            print(f"    {cfg}: {type(e).__name__}")
    default = graph_ms(lambda: w8a8_block_gemm(a_q, a_scale, w_q, w_scale, BLOCK, torch.bfloat16))
    best = min(times, key=times.__getitem__)
    return {"name": name, "m": m, "best": best, "best_us": times[best] * 1e3, "default_us": default * 1e3,
            "default": tuple(gemm_config(m, n, k, BLOCK[1]).values())}  # fmt: skip


def split_k_candidates(n: int, k: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_N, splits, num_warps, num_stages) worth trying for the split-K GEMM; splits 0: the default count."""
    steps = -(-k // BLOCK[1])
    splits = sorted({0, 2, 4, 8, 16} & ({0} | set(range(1, steps + 1))))
    return [(bn, sp, w, st) for bn in (32, 64, 128) for sp in splits for w in (4,) for st in (3, 4, 6)]


def sweep_split_k(name: str, m: int, copy: float) -> dict[str, object]:
    """The split-K linear (pd.layers.triton_fp8_gemm.w8a8_split_k_linear, its sums included, activations quantized
    by their producer as in a decode step) over candidate configs: the fastest against the default."""
    from pd.layers.triton_fp8_gemm import SPLIT_K_CONFIG, token_group_quant, w8a8_split_k_linear

    n, k = DENSE[name]
    w_q, w_scale = block_quant(torch.randn(n, k, device=DEVICE) / k**0.5, BLOCK)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    quantized = token_group_quant(x, BLOCK[1])
    want = w8a8_split_k_linear(x, w_q, w_scale, BLOCK, quantized=quantized)
    times = {}
    for bn, sp, w, st in split_k_candidates(n, k):
        config = {"BLOCK_N": bn, "num_warps": w, "num_stages": st}
        try:
            got = w8a8_split_k_linear(x, w_q, w_scale, BLOCK, splits=sp or None, quantized=quantized, config=config)
            # another split count sums in another order: bf16 roundings may differ by an ulp, not more
            assert rel_l2(got, want) < 1e-2, rel_l2(got, want)
            times[(bn, sp, w, st)] = graph_ms(
                lambda c=config, s=sp: w8a8_split_k_linear(x, w_q, w_scale, BLOCK, splits=s or None,
                                                           quantized=quantized, config=c))  # fmt: skip
        except Exception as e:  # out of shared memory or registers: skip it
            print(f"    {(bn, sp, w, st)}: {type(e).__name__} {str(e)[:200]}")
    default = graph_ms(lambda: w8a8_split_k_linear(x, w_q, w_scale, BLOCK, quantized=quantized))
    ranked = sorted(times, key=times.__getitem__)
    best = ranked[0]

    def pct_copy(ms: float) -> float:  # the weight's bytes over the time, against the copy bandwidth
        return 100 * n * k / ms / 1e6 / copy

    return {"name": name, "m": m, "best": best, "best_us": times[best] * 1e3, "best_pct_copy": pct_copy(times[best]),
            "default": tuple(SPLIT_K_CONFIG.values()), "default_us": default * 1e3,
            "default_pct_copy": pct_copy(default),
            "top5": [(key, round(times[key] * 1e3, 2)) for key in ranked[:5]],
            "all_us": {str(key): round(t * 1e3, 2) for key, t in times.items()}}  # fmt: skip


COLUMNS = [("fp8_us", "9.1f"), ("cublas_us", "9.1f"), ("linear_us", "9.1f"), ("scaled_mm_us", "9.1f"),
           ("bf16_us", "9.1f"), ("tflops", "8.1f"), ("scaled_mm_tflops", "8.1f"), ("pct_scaled_mm", "6.1f"),
           ("pct_scaled_mm_cublas", "6.1f"), ("pct_per_expert_scaled_mm", "6.1f"), ("pct_grouped_scaled_mm", "6.1f"),
           ("x_bf16", "6.2f"), ("pct_copy", "6.1f"), ("rel_l2_vs_bf16", "8.1e"),
           ("cublas_rel_l2_vs_bf16", "8.1e")]  # fmt: skip


def show(row: dict[str, object]) -> str:
    cells = [format(row[key], spec) if isinstance(row.get(key), float | int) else f"{'-':>{spec.split('.')[0]}s}"
             for key, spec in COLUMNS]  # fmt: skip
    return f"{row['kind']:5s} {row['name']:18s} {row['m']:6d} " + " ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--dense", nargs="*", default=list(DENSE), choices=list(DENSE))
    parser.add_argument("--moe", nargs="*", default=list(MOE), choices=list(MOE))
    parser.add_argument("--check", action="store_true", help="compare each FP8 output with dequantize-then-bf16")
    parser.add_argument("--sweep", action="store_true", help="time candidate block sizes of the dense GEMM instead")
    parser.add_argument("--sweep-split-k", action="store_true",
                        help="time candidate configs of the decode split-K linear (--tokens up to 64) instead")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.manual_seed(0)
    if args.sweep:
        for name in args.dense:
            for m in args.tokens:
                r = sweep(name, m)
                print(f"{name:18s} {m:6d} best {r['best']} {r['best_us']:8.1f} us; default {r['default']} "
                      f"{r['default_us']:8.1f} us", flush=True)  # fmt: skip
        return
    if args.sweep_split_k:
        copy = copy_gbps()
        rows = []
        for name in args.dense:
            for m in args.tokens:
                r = sweep_split_k(name, m, copy)
                rows.append(r)
                print(f"{name:18s} {m:6d} best (BLOCK_N, splits, warps, stages) {r['best']} {r['best_us']:7.2f} us "
                      f"({r['best_pct_copy']:.0f}% copy); default {r['default']} {r['default_us']:7.2f} us "
                      f"({r['default_pct_copy']:.0f}% copy); top5 {r['top5']}", flush=True)  # fmt: skip
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": copy, "rows": rows}, f, indent=1)
        return
    copy = copy_gbps()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy:.0f} GB/s (read + write bytes)")
    print(f"{'kind':5s} {'name':18s} {'tokens':>6s} {'fp8 us':>9s} {'cublas us':>9s} {'linear us':>9s} "
          f"{'smm us':>9s} {'bf16 us':>9s} {'TFLOP/s':>8s} {'smm TF/s':>8s} {'%smm':>6s} {'%smm cb':>6s} "
          f"{'%smm e':>6s} {'%sgmm':>6s} {'x bf16':>6s} {'%copy':>6s} {'relL2':>8s} {'cb relL2':>8s}")  # fmt: skip
    rows = []
    for name in args.dense:
        for m in args.tokens:
            rows.append(bench_dense(name, m, copy, args.check))
            print(show(rows[-1]), flush=True)
    for name in args.moe:
        for m in args.tokens:
            rows.append(bench_moe(name, m, copy, args.check))
            print(show(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GBps": copy, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
