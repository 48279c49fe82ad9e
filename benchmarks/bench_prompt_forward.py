"""Host launch time and wall time of one prompt forward, with and without piecewise CUDA graphs, in one run.

The engine in-process (pd.engine.llm.LLM, the server's scheduler and runner) on the serving benchmark's model
(Qwen3-MoE at Qwen3-30B-A3B widths, 8 layers, random bf16): a forward of --requests prompts of --prompt-len tokens
each (one chunk, as the served prefill bursts run it). Per setting: the engine's start-up (graph capture and
warm-up included; the first setting's also compiles the Triton kernels both use) and the piecewise graphs'
capture time and memory, then the median over --iters forwards of
- ``launch ms``: from building the batch until ModelRunner.forward returns (the host's share; the GPU runs behind),
- ``total ms``: until the GPU has finished as well.
A launch as long as the total means the host paces prompt forwards.

Usage: python benchmarks/bench_prompt_forward.py [--requests 8] [--prompt-len 1024] [--iters 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
from benchmarks.bench_gpu_serve import model_config, write_checkpoint  # noqa: E402
from pd.engine.llm import LLM  # noqa: E402


def measure(path: str, args: argparse.Namespace, piecewise: bool) -> dict[str, float]:
    tokens = args.requests * args.prompt_len
    start = time.perf_counter()
    llm = LLM(path, device="cuda", dtype=torch.bfloat16, chunked_prefill_size=tokens, max_running_requests=64,
              max_total_tokens=4 * tokens, piecewise_tokens=None if piecewise else ())  # fmt: skip
    startup = time.perf_counter() - start
    runner, sched = llm.runner, llm.scheduler
    graphs = runner.prompt_graphs
    assert (graphs is not None) == piecewise
    capture = {"capture_s": round(graphs.capture_s, 2), "capture_mib": round(graphs.capture_mib)} if graphs else {}
    rows = []
    for _ in range(args.requests):
        row = sched.slots.alloc_row()
        sched.slots.assign_pages(row, 0, sched.pool.alloc(sched._pages_for(args.prompt_len)))
        rows.append(row)
    gen = torch.Generator().manual_seed(0)
    launch, total = [], []
    for i in range(args.iters + 2):  # two unmeasured
        ids = torch.randint(1, 1000, (tokens,), generator=gen).tolist()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch = runner.build_batch(ids, rows, [0] * args.requests, [args.prompt_len] * args.requests, sched.slots)
        runner.forward(batch)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= 2:
            launch.append(1e3 * (t1 - t0))
            total.append(1e3 * (t2 - t0))
    del llm, runner, sched, batch, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return {"startup_s": round(startup, 2), **capture, "launch_ms": round(statistics.median(launch), 2),
            "total_ms": round(statistics.median(total), 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as path:
        write_checkpoint(path, model_config("qwen3", args.layers, False), "cuda")
        for name, piecewise in (("piecewise", True), ("eager", False)):
            results[name] = measure(path, args, piecewise)
            print(name, results[name], flush=True)
    pw, eager = results["piecewise"], results["eager"]
    print(f"{args.requests} x {args.prompt_len} tokens: launch {eager['launch_ms']} -> {pw['launch_ms']} ms "
          f"({eager['launch_ms'] / pw['launch_ms']:.1f}x less), total {eager['total_ms']} -> {pw['total_ms']} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "args": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
