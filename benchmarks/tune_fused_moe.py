"""Tune the fused-MoE GEMM block sizes on this GPU and write the tables pd.moe.runner.fused_moe_kernel reads.

Layers: Qwen3-30B-A3B (128 experts, hidden 2048, intermediate 768, top-8) and DeepSeek-V3 at EP=8 (32 local experts
of 256, hidden 7168, intermediate 2048, top-8 over all 256, so about 1/8 of the slots are local and the others are
-1); with --models deepseek-v3, all 256 of them on one GPU (the one-GPU serving benchmark's shape). For each
token count, random routing, each candidate config times both GEMMs (gate_up: N = 2I, K = H; down:
N = H, K = I, routed weight multiplied in) with triton.testing.do_bench (median); the two GEMMs share one
alignment, so the BLOCK_M whose best gate_up + best down is fastest wins, and each GEMM takes its best config at
that BLOCK_M. Writes ``E=..,N=..,K=..,dtype=..,device=...json`` per GEMM (token count -> config) into --out-dir.

The search space is pruned by rows per expert (tokens * local slots / experts): few rows stream the weights with
16-row blocks over many programs; many rows use large tiles; configs that cannot fit the shared memory or the
registers are skipped without compiling. About 50 configs in all, each compiled once per GEMM; a whole run takes
about 4-5 minutes on an H200 (mostly compilation). Past --time-limit the remaining token counts keep the
default config (marked "default" in the summary).

With --dtype fp8 the experts are block-FP8 (128x128 weight scales, activations quantized per row and 128 columns
as the runner does) and the tables are the float8_e4m3fn ones.

Usage: python benchmarks/tune_fused_moe.py [--out-dir pd/moe/runner/configs] [--summary tune.json] [--dtype fp8]
       [--tokens 1,16,64 --merge]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
from pd.moe.runner.fused_moe_kernel import (  # noqa: E402
    CONFIG_DIR,
    CONFIG_KEYS,
    BlockFp8,
    config_file_name,
    default_config,
    describe,
    invoke_fused_moe_gemm,
)
from pd.moe.runner.moe_align import align_pairs_to_blocks  # noqa: E402
from pd.quant.fp8 import FP8_DTYPE, block_quant  # noqa: E402

# name -> (local experts, hidden, intermediate, top_k, experts routed over)
MODELS = {
    "qwen3-30b-a3b": (128, 2048, 768, 8, 128),
    "deepseek-v3-ep8": (32, 7168, 2048, 8, 256),
    # all 256 experts on one GPU (benchmarks/bench_gpu_serve.py --model deepseek); not in the default set (~23 GB of
    # bf16 weights to time)
    "deepseek-v3": (256, 7168, 2048, 8, 256),
}
DEFAULT_MODELS = ["qwen3-30b-a3b", "deepseek-v3-ep8"]
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
SMEM_BYTES = 200 * 1024  # below the H200's 227 KiB per block, leaving room for the epilogue
FP8_BLOCK = (128, 128)  # DeepSeek-V3's and Qwen3 FP8's weight scale blocks
MAX_ACC_PER_THREAD = 128  # float32 accumulators per thread before registers spill
DEVICE = "cuda"


def routing(tokens: int, top_k: int, routed: int, local: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random top-k over ``routed`` experts; ids >= ``local`` (other ranks') become -1.
    -> ids [T, K] int64, weights [T, K] float32 (renormalised)."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    weights, ids = torch.rand(tokens, routed, generator=gen, device=DEVICE).topk(top_k, dim=-1)
    return torch.where(ids < local, ids, -1), weights / weights.sum(-1, keepdim=True)


def search_space(rows_per_expert: float, fp8: bool = False) -> Iterator[dict[str, int]]:
    """Candidate configs for a GEMM whose experts get about ``rows_per_expert`` rows. Block-FP8 weights: k-steps of
    one scale group (128 columns of one byte each, so twice the stages fit)."""
    grid = _fp8_grid(rows_per_expert) if fp8 else _grid(rows_per_expert)
    element_bytes = 1 if fp8 else 2
    for bm, bn, bk, group, (warps, stages) in grid:
        if stages * (bm * bk + bk * bn) * element_bytes > SMEM_BYTES or bm * bn > MAX_ACC_PER_THREAD * 32 * warps:
            continue
        yield dict(zip(CONFIG_KEYS, (bm, bn, bk, group, warps, stages), strict=True))


def _grid(rows_per_expert: float) -> Iterator[tuple]:
    if rows_per_expert <= 16:  # decode: weight-bound, many narrow programs
        return itertools.product((16,), (32, 64, 128), (64, 128, 256), (1,), ((4, 3), (4, 5)))
    if rows_per_expert <= 128:
        return itertools.chain(itertools.product((32, 64), (64, 128), (64, 128), (8,), ((4, 3), (8, 3))),
                               itertools.product((16,), (64, 128), (128,), (1,), ((4, 4),)))  # fmt: skip
    # prefill: compute-bound, large tiles
    return itertools.product((64, 128), (128, 256), (64, 128), (8,), ((4, 3), (8, 3), (8, 4)))


def _fp8_grid(rows_per_expert: float) -> Iterator[tuple]:
    if rows_per_expert <= 16:  # (BLOCK_N 256, 6 stages and 8 warps were tried too: none faster on an H200)
        return itertools.product((16,), (32, 64, 128), (128,), (1,), ((4, 3), (4, 4), (4, 5)))
    if rows_per_expert <= 128:
        return itertools.chain(itertools.product((32, 64), (64, 128), (128,), (8,), ((4, 3), (4, 4), (8, 3))),
                               itertools.product((16,), (64, 128), (128,), (1,), ((4, 4),)))  # fmt: skip
    return itertools.product((64, 128), (64, 128, 256), (128,), (8,), ((4, 3), (4, 4), (8, 3), (8, 4)))


def _fp8_operands(x: torch.Tensor, inter_in: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
                  ) -> tuple[tuple, tuple]:  # fmt: skip
    """(A, B, BlockFp8) of gate_up and of down with block-FP8 weights, as TritonMoeRunner hands them to the kernel:
    activations quantized per row and 128 columns (I a multiple of 128: gate and up quantized apart is w13 whole)."""
    from pd.layers.triton_fp8_gemm import token_group_quant

    inter = w2.shape[2]
    assert inter % FP8_BLOCK[0] == 0, inter
    q13, s13 = zip(*(block_quant(w, FP8_BLOCK) for w in w13), strict=True)
    q2, s2 = zip(*(block_quant(w, FP8_BLOCK) for w in w2), strict=True)
    x_q, x_s = token_group_quant(x, FP8_BLOCK[1])
    i_q, i_s = token_group_quant(inter_in, FP8_BLOCK[1])
    up = (x_q, torch.stack(q13), BlockFp8(x_s, torch.stack(s13), FP8_BLOCK, inter))
    down = (i_q, torch.stack(q2), BlockFp8(i_s, torch.stack(s2), FP8_BLOCK, w2.shape[1]))
    return up, down


def time_ms(fn: object) -> float:
    """Median ms of ``fn`` (inf when the config does not compile or run)."""
    try:
        return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))  # type: ignore[arg-type]
    except Exception as e:  # out of shared memory or registers: not a candidate
        print(f"    skipped: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return float("inf")


def tune_model(name: str, dtype: torch.dtype, deadline: float, summary: dict[str, object], tokens_list: list[int]
               ) -> tuple[dict, dict]:  # fmt: skip
    """-> (gate_up table, down table): token count (str) -> config. dtype float8_e4m3fn: block-FP8 experts (the
    activations are bf16 and quantized as the runner does it)."""
    experts, hidden, inter, top_k, routed = MODELS[name]
    fp8 = dtype == FP8_DTYPE
    act_dtype = torch.bfloat16 if fp8 else dtype
    torch.manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, device=DEVICE, dtype=act_dtype) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, device=DEVICE, dtype=act_dtype) / inter**0.5
    up_table: dict[str, dict[str, int]] = {}
    down_table: dict[str, dict[str, int]] = {}
    rows = []
    for tokens in tokens_list:
        ids, weights = routing(tokens, top_k, routed, experts, seed=tokens)
        x = torch.randn(tokens, hidden, device=DEVICE, dtype=act_dtype)
        inter_in = torch.randn(tokens * top_k, inter, device=DEVICE, dtype=act_dtype)
        gate_up = torch.empty(tokens * top_k, 2 * inter, device=DEVICE, dtype=act_dtype)
        down = torch.empty(tokens * top_k, hidden, device=DEVICE, dtype=act_dtype)
        if fp8:
            (x_in, b13, fp8_up), (down_in, b2, fp8_down) = _fp8_operands(x, inter_in, w13, w2)
        else:
            (x_in, b13, fp8_up), (down_in, b2, fp8_down) = (x, w13, None), (inter_in, w2, None)
        flat_weights = weights.view(-1)
        rows_per_expert = tokens * top_k / routed  # local slots (experts / routed of them) over experts
        candidates = list(search_space(rows_per_expert, fp8))
        if time.monotonic() > deadline:
            candidates = []
        best: dict[int, dict[str, tuple[float, dict[str, int]]]] = {}
        aligned = {}
        for cfg in candidates:
            bm = cfg["BLOCK_SIZE_M"]
            if bm not in aligned:
                a = align_pairs_to_blocks(ids, experts, bm)
                aligned[bm] = (a.sorted_ids, a.expert_of_block, a.num_rows_post_pad)
            blocks = aligned[bm]
            t_up = time_ms(functools.partial(invoke_fused_moe_gemm, x_in, b13, gate_up, *blocks, top_k, False, cfg,
                                             fp8=fp8_up))  # fmt: skip
            t_down = time_ms(functools.partial(invoke_fused_moe_gemm, down_in, b2, down, *blocks, top_k, True, cfg,
                                               flat_weights, fp8_down))  # fmt: skip
            mine = best.setdefault(bm, {})
            for gemm, t in (("up", t_up), ("down", t_down)):
                if t < mine.get(gemm, (float("inf"), cfg))[0]:
                    mine[gemm] = (t, cfg)
        viable = {bm: b for bm, b in best.items() if len(b) == 2 and b["up"][0] + b["down"][0] < float("inf")}
        if viable:
            bm = min(viable, key=lambda m: viable[m]["up"][0] + viable[m]["down"][0])
            (t_up, cfg_up), (t_down, cfg_down) = viable[bm]["up"], viable[bm]["down"]
            source = "tuned"
        else:
            cfg_up = cfg_down = default_config(tokens, top_k, experts, dtype)
            t_up = t_down = float("nan")
            source = "default"
        up_table[str(tokens)], down_table[str(tokens)] = cfg_up, cfg_down
        rows.append({"tokens": tokens, "source": source, "candidates": len(candidates), "gate_up_us": t_up * 1e3,
                     "down_us": t_down * 1e3, "gate_up": cfg_up, "down": cfg_down})  # fmt: skip
        print(
            f"{name:16s} {tokens:5d} tok  {len(candidates):3d} cfgs  gate_up {t_up * 1e3:8.1f} us "
            f"[{describe(cfg_up)}]  down {t_down * 1e3:8.1f} us [{describe(cfg_down)}]  {source}",
            flush=True,
        )
    summary[name] = rows
    return up_table, down_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=CONFIG_DIR, help="where the JSON tables go")
    parser.add_argument("--summary", default=None, help="also write every timing here (JSON)")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "fp8"],
                        help="the experts' weights; fp8: block-FP8 (128x128 scales, tables of dtype float8_e4m3fn)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                        help="token counts to tune (comma-separated); the runner takes the nearest one's config")
    parser.add_argument("--time-limit", type=float, default=330.0, help="seconds before falling back to defaults")
    parser.add_argument("--merge", action="store_true",
                        help="keep the existing tables' other token counts (retune some sizes only)")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "tuning needs a CUDA GPU"
    dtype = FP8_DTYPE if args.dtype == "fp8" else getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name()
    start = time.monotonic()
    summary: dict[str, object] = {"device": device_name, "dtype": args.dtype, "torch": torch.__version__,
                                  "triton": triton.__version__}  # fmt: skip
    os.makedirs(args.out_dir, exist_ok=True)
    for name in args.models:
        experts, hidden, inter, _, _ = MODELS[name]
        up, down = tune_model(name, dtype, start + args.time_limit, summary, [int(t) for t in args.tokens.split(",")])
        for (n, k), table in (((2 * inter, hidden), up), ((hidden, inter), down)):
            path = os.path.join(args.out_dir, config_file_name(experts, n, k, dtype, device_name))
            if args.merge and os.path.exists(path):
                with open(path) as f:
                    table = {**json.load(f), **table}
                table = dict(sorted(table.items(), key=lambda item: int(item[0])))
            with open(path, "w") as f:
                json.dump(table, f, indent=1)
            print(f"wrote {path}", flush=True)
    summary["seconds"] = round(time.monotonic() - start, 1)
    print(f"done in {summary['seconds']} s", flush=True)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
