"""A MoE runner (the Triton runner; ``--runner deep_gemm``: DeepGEMM's grouped GEMMs at every size) on one layer
(runner only: random weights, random routing), against the bounds measured in the same run.

Layers: Qwen3-30B-A3B widths (128 experts, top-8, hidden 2048, intermediate 768) and DeepSeek-V3 widths at EP=8
(top-8 routed over 256 experts, experts 0..31 local, the other slots -1; hidden 7168, intermediate 2048), bf16, at
1, 16, 64, 256, 1024 and 8192 tokens (``--models deepseek-v3``: all 256 experts local, the one-GPU DeepSeek shape of
bench_gpu_serve.py; with ``--tokens 16384`` its 16K prefill chunk). Every time is the median of
triton.testing.do_bench over a CUDA graph holding one call (how decode runs; the eager time of the runner is shown too).

Columns:
- ``us``: the runner (align, gate_up GEMM, act-and-mul, down GEMM with the routed weight, per-token sum).
- ``GB/s``, ``%copy``: weight bytes read (distinct hit local experts x bytes of one expert's w13 + w2) / time,
  against a device-to-device copy of a 2 GiB tensor measured in this run, counting read + write bytes
  (2 x 2 GiB per copy). The bound for weight-bound (decode) batches.
- ``TFLOP/s``, ``%mm``: 6 x local pairs x H x I / time, against a dense bf16 torch.mm of the same FLOPs
  ([pairs, H] x [H, 3I]) in this run. The bound for compute-bound (prefill) batches.
- ``x gmm``: time of torch._grouped_mm on rows already sorted by expert (gate_up, SiLU-and-mul, down: the GEMMs
  transformers' grouped_mm experts run, without their sort and combine) / the runner's time (> 1: faster).
- ``x gmm+perm``: the same with transformers' whole path (argsort, gather, the GEMMs, weight, index_add_), timed
  eagerly (its sort need not be capturable).

With --check each runner output is first compared with TorchMoeRunner (relative L2 error, bf16). About 2 minutes
on an H200 (mostly Triton compilation).

Usage: python benchmarks/bench_moe_kernel.py [--runner triton|deep_gemm] [--check] [--out result.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
from pd.moe.dispatcher.base import DispatchOutput  # noqa: E402
from pd.moe.runner.torch_ref import TorchMoeRunner  # noqa: E402
from pd.moe.runner.triton_runner import TritonMoeRunner  # noqa: E402

# name -> (local experts, hidden, intermediate, top_k, experts routed over)
MODELS = {
    "qwen3-30b-a3b": (128, 2048, 768, 8, 128),
    "deepseek-v3-ep8": (32, 7168, 2048, 8, 256),
    "deepseek-v3": (256, 7168, 2048, 8, 256),  # EP=1: bench_gpu_serve.py's one-GPU DeepSeek shape
}
TOKENS = [1, 16, 64, 256, 1024, 8192]
COPY_BYTES = 2 << 30
DEVICE = "cuda"
COLUMNS = [
    ("us", "9.1f"),
    ("eager_us", "9.1f"),
    ("weight_GBps", "7.0f"),
    ("pct_copy", "6.1f"),
    ("tflops", "8.1f"),
    ("pct_mm", "5.1f"),
    ("x_grouped_mm", "6.2f"),
    ("x_grouped_mm_full", "10.2f"),
    ("rel_l2_vs_torch", "8.1e"),
]


def graph_ms(fn: Callable[[], object]) -> float:
    """Median ms of one replay of a CUDA graph holding ``fn`` (warmed up, so compiled, before capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = float(triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median"))
    del graph
    return ms


def eager_ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of COPY_BYTES, counting read + write bytes."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / eager_ms(lambda: dst.copy_(src)) / 1e6


def routing(tokens: int, top_k: int, routed: int, local: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random top-k over ``routed`` experts; ids >= ``local`` become -1. -> ids int64, weights float32."""
    gen = torch.Generator(DEVICE).manual_seed(seed)
    weights, ids = torch.rand(tokens, routed, generator=gen, device=DEVICE).topk(top_k, dim=-1)
    return torch.where(ids < local, ids, -1), weights / weights.sum(-1, keepdim=True)


def grouped_mm_paths(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                     w2: torch.Tensor) -> tuple[Callable[[], object], Callable[[], object]]:  # fmt: skip
    """(GEMMs on pre-sorted rows, transformers' whole grouped_mm path) as callables over fixed inputs."""
    num_experts, inter = w13.shape[0], w2.shape[2]
    flat = ids.view(-1)
    keys = torch.where(flat >= 0, flat, num_experts)
    order = torch.argsort(keys, stable=True)
    local = int((flat >= 0).sum())  # setup only: the timed paths below have static shapes
    order = order[:local]
    offs = torch.cumsum(torch.bincount(keys, minlength=num_experts + 1)[:num_experts], 0).to(torch.int32)
    x_sorted = x.index_select(0, order // ids.shape[1])
    w13_t, w2_t = w13.transpose(-2, -1), w2.transpose(-2, -1)

    def gemms(rows: torch.Tensor) -> torch.Tensor:
        gate_up = torch._grouped_mm(rows, w13_t, offs=offs)
        return torch._grouped_mm(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2_t, offs=offs)

    def full() -> torch.Tensor:
        sort = torch.argsort(keys, stable=True)[:local]
        down = gemms(x.index_select(0, sort // ids.shape[1]))
        scaled = (down * weights.view(-1)[sort, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, sort // ids.shape[1], scaled)

    return (lambda: gemms(x_sorted)), full


def make_runner(name: str) -> object:
    """The runner timed: ``deep_gemm`` without its hand-off of small batches to the Triton runner (the table then
    shows where that hand-off belongs)."""
    if name == "deep_gemm":
        from pd.moe.runner.deep_gemm_runner import DeepGemmMoeRunner

        return DeepGemmMoeRunner(min_pairs_per_expert=0)
    return TritonMoeRunner()


def bench_layer(name: str, tokens: int, w13: torch.Tensor, w2: torch.Tensor, copy_gbps: float,
                check: bool, runner_name: str = "triton") -> dict[str, object]:  # fmt: skip
    experts, hidden, inter, top_k, routed = MODELS[name]
    ids, weights = routing(tokens, top_k, routed, experts, seed=tokens)
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=w13.dtype)
    dispatched = DispatchOutput(x, ids, weights, handle=None)
    runner = make_runner(runner_name)
    pairs = int((ids >= 0).sum())
    hit = int(torch.unique(ids[ids >= 0]).numel())
    row: dict[str, object] = {"model": name, "runner": runner_name, "tokens": tokens, "local_pairs": pairs,
                              "hit_experts": hit}  # fmt: skip
    if check:
        out = runner.run(dispatched, w13, w2).hidden_states
        ref = TorchMoeRunner().run(dispatched, w13, w2).hidden_states
        row["rel_l2_vs_torch"] = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
    t = graph_ms(lambda: runner.run(dispatched, w13, w2))
    row["us"], row["eager_us"] = t * 1e3, eager_ms(lambda: runner.run(dispatched, w13, w2)) * 1e3
    weight_bytes = hit * (w13[0].numel() + w2[0].numel()) * w13.element_size()
    row["weight_GBps"] = weight_bytes / t / 1e6
    row["pct_copy"] = 100 * row["weight_GBps"] / copy_gbps  # type: ignore[operator]
    if pairs:
        flops = 6 * pairs * hidden * inter
        a = torch.randn(pairs, hidden, device=DEVICE, dtype=w13.dtype)
        b = torch.randn(hidden, 3 * inter, device=DEVICE, dtype=w13.dtype)
        t_mm = graph_ms(lambda: torch.mm(a, b))
        row["tflops"], row["dense_mm_tflops"] = flops / t / 1e9, flops / t_mm / 1e9
        row["pct_mm"] = 100 * t_mm / t
        try:
            sorted_gemms, full_path = grouped_mm_paths(x, ids, weights, w13, w2)
            sorted_gemms()
        except Exception as e:  # torch._grouped_mm is missing or refuses this GPU or shape
            row["grouped_mm_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        else:
            try:
                row["x_grouped_mm"] = graph_ms(sorted_gemms) / t
            except Exception as e:  # not capturable here: time it eagerly
                row["grouped_mm_error"] = f"timed eagerly, capture failed: {type(e).__name__}: {str(e)[:200]}"
                row["x_grouped_mm"] = eager_ms(sorted_gemms) / t
            row["x_grouped_mm_full"] = eager_ms(full_path) / t
    return row


def fmt(row: dict[str, object], key: str, spec: str) -> str:
    value = row.get(key)
    return format(value, spec) if isinstance(value, float | int) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--models", nargs="+", default=["qwen3-30b-a3b", "deepseek-v3-ep8"], choices=list(MODELS))
    parser.add_argument("--runner", default="triton", choices=["triton", "deep_gemm"])
    parser.add_argument("--check", action="store_true", help="compare with TorchMoeRunner first")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth_gbps()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbps:.0f} GB/s (read + write bytes); "
          f"runner {args.runner}")
    rows = []
    header = (f"{'model':16s} {'tokens':>6s} {'pairs':>6s} {'hit':>4s} {'us':>9s} {'eager us':>9s} {'GB/s':>7s} "
              f"{'%copy':>6s} {'TFLOP/s':>8s} {'%mm':>5s} {'x gmm':>6s} {'x gmm+perm':>10s} {'relL2':>8s}")  # fmt: skip
    print(header)
    for name in args.models:
        experts, hidden, inter, _, _ = MODELS[name]
        w13 = torch.randn(experts, 2 * inter, hidden, device=DEVICE, dtype=torch.bfloat16) / hidden**0.5
        w2 = torch.randn(experts, hidden, inter, device=DEVICE, dtype=torch.bfloat16) / inter**0.5
        for tokens in args.tokens:
            row = bench_layer(name, tokens, w13, w2, copy_gbps, args.check, args.runner)
            rows.append(row)
            cells = " ".join(fmt(row, key, spec) for key, spec in COLUMNS)
            print(f"{name:16s} {tokens:6d} {row['local_pairs']:6d} {row['hit_experts']:4d} {cells}", flush=True)
            if "grouped_mm_error" in row:
                print(f"    torch._grouped_mm: {row['grouped_mm_error']}")
        del w13, w2
        torch.cuda.empty_cache()
    targets = []
    for row in rows:
        if row["model"] == "qwen3-30b-a3b" and row["tokens"] == 64:
            targets.append(("decode 64 tok qwen3: weight bytes/s >= 70% of copy", row.get("pct_copy", 0) >= 70))
        if row["tokens"] == 8192:
            targets.append((f"prefill 8192 tok {row['model']}: >= 50% of dense mm", row.get("pct_mm", 0) >= 50))
            targets.append((f"prefill 8192 tok {row['model']}: >= 1.3x torch._grouped_mm (pre-sorted)",
                            row.get("x_grouped_mm", 0) >= 1.3))  # fmt: skip
    for label, ok in targets:
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    if args.out:
        result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "copy_GBps_read_plus_write": copy_gbps, "rows": rows,
                  "targets": [{"target": label, "pass": ok} for label, ok in targets]}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
