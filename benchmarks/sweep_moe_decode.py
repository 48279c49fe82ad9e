"""Expert GEMM block sizes timed as a decode step runs them: every MoE layer of the model replayed from one CUDA graph.

tune_fused_moe.py times each GEMM alone with triton.testing.do_bench; at decode sizes its ranking did not carry over
to the served step (a table it picked made the batch-64 FP8 step's experts 5% slower). Here the model's own MoE
blocks (router, alignment, gate_up, act-and-mul, down, slot sums) for a [--batch, hidden] input are captured in one
graph, layer after layer as in the step (so no layer's weights are still in L2 when it runs), and replayed
--replays times; each candidate config of one GEMM is timed with the other GEMM at its table's config. The model is
profile_decode_step.py's (Qwen3-MoE at Qwen3-30B-A3B widths, random weights), --quantization fp8 for FP8 experts.

Prints the median replay time per candidate (ms for all layers) and the fastest per GEMM; writes them to --out.

Usage: python benchmarks/sweep_moe_decode.py [--layers 8] [--batch 64] [--quantization fp8] [--out sweep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.profile_decode_step import make_checkpoint  # noqa: E402


def candidates(block_ns: list[int], stages: list[int]) -> list[dict[str, int]]:
    return [dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=n, BLOCK_SIZE_K=128, GROUP_SIZE_M=1, num_warps=4 if n < 256 else 8,
                 num_stages=s) for n in block_ns for s in stages]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--replays", type=int, default=30)
    parser.add_argument("--quantization", default="fp8", choices=["none", "fp8"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import pd.moe.runner.triton_runner as triton_runner
    from pd.engine.llm import LLM
    from pd.models.llama import DecoderLayer
    from pd.moe.runner.fused_moe_kernel import describe

    override: dict[tuple[int, int], dict[str, int]] = {}
    table_config = triton_runner.get_config

    def get_config(num_experts, n, k, dtype, num_tokens, top_k, device_name):  # noqa: ANN001, ANN202
        found = override.get((n, k))
        return dict(found) if found else table_config(num_experts, n, k, dtype, num_tokens, top_k, device_name)

    triton_runner.get_config = get_config
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(tmp, args.layers)
        llm = LLM(tmp, device="cuda", dtype=torch.bfloat16, page_size=16, max_running_requests=args.batch,
                  max_total_tokens=args.batch * 64, cuda_graph_bs=(), quantization=args.quantization)  # fmt: skip
        blocks = [m.mlp for m in llm.runner.model.modules() if isinstance(m, DecoderLayer)]
        hidden = blocks[0].gate.weight.shape[1]
        moe = blocks[0].experts
        inter = moe.w2_weight.shape[-1]
        x = torch.randn(args.batch, hidden, dtype=torch.bfloat16, device="cuda")

        def replay_ms() -> float:
            for block in blocks:  # compiles any new kernel variant outside the capture
                block(x)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for block in blocks:
                    block(x)
            graph.replay()
            times = []
            for _ in range(args.replays):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            del graph
            return statistics.median(times)

        base = replay_ms()
        print(f"table configs: {base:.4f} ms for {len(blocks)} layers", flush=True)
        results.append({"gemm": "table", "ms": base})
        shapes = {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}
        print(f"(N, K) {shapes}, {moe.num_local_experts} experts, {moe.w13_weight.dtype}", flush=True)
        for name, shape in shapes.items():
            for cfg in candidates([32, 64, 128, 256], [2, 3, 4, 5, 6]):
                override.clear()
                override[shape] = cfg
                try:
                    ms = replay_ms()
                except Exception as e:  # noqa: BLE001 (a config that does not fit: shared memory, registers)
                    print(f"{name} {describe(cfg)}: failed {type(e).__name__}", flush=True)
                    continue
                results.append({"gemm": name, "config": cfg, "ms": ms})
                print(f"{name} {describe(cfg)}: {ms:.4f} ms ({ms / base:.3f} of the tables')", flush=True)
        override.clear()
        for name in shapes:
            mine = [r for r in results if r["gemm"] == name]
            if mine:
                best = min(mine, key=lambda r: r["ms"])
                print(f"fastest {name}: {describe(best['config'])} {best['ms']:.4f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "args": vars(args), "results": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
