"""One in-process decode step on a GPU, per attention backend: time, and a torch-profiler table of its kernels.

Model: Qwen3-MoE at Qwen3-30B-A3B widths (hidden 2048, 32 query / 4 KV heads of dim 128, 128 experts top-8 of
moe_intermediate 768, vocab 151936) with --layers decoder layers (default 8), random bf16 weights. Workload:
--batch requests (default 64) of --prompt tokens (default 128) prefilled, then decode steps of one token each.
For each variant (`triton`: the Triton attention backend with decode batches replayed from CUDA graphs, the CUDA
default; `triton-eager`: the same without graphs; `torch`: the SDPA reference backend, eager): the median wall
time of --steps decode steps (host included, as the engine runs them), and one profiled step whose per-kernel
table is written to OUT/profile_<variant>.txt. The run fails if a triton decode step calls SDPA, launches a
cuDNN/flash/SDPA kernel, or gathers KV.

Usage: python benchmarks/profile_decode_step.py [--out DIR] [--layers 8] [--batch 64] [--prompt 128]
       [--variants triton,prefill] [--quantization fp8] [--model deepseek --layers 2 --variants prefill]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pd.engine.profiler import idle_spells, kernel_timeline  # noqa: E402

FORBIDDEN = ("scaled_dot_product", "cudnn", "flash_attention", "efficient_attention")


def make_checkpoint(path: str, layers: int) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tests.tiny_checkpoints import write_tokenizer

    config = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                            num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
                            decoder_sparse_step=1, mlp_only_layers=[], bos_token_id=None, eos_token_id=None,
                            pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    write_tokenizer(path)


def run_backend(path: str, variant: str, args: argparse.Namespace) -> dict[str, object]:
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from pd.engine.kv_cache import KVCache
    from pd.engine.llm import LLM
    from pd.engine.sampler import all_greedy_rows, sample

    backend = variant.removesuffix("-eager")
    llm = LLM(path, device="cuda", dtype=torch.bfloat16, page_size=16, max_running_requests=args.batch,
              max_total_tokens=args.batch * (args.prompt + args.steps + 32), chunked_prefill_size=8192,
              attention_backend=backend, cuda_graph_bs=None if variant == "triton" else (),
              quantization=args.quantization)  # fmt: skip
    runner, sched = llm.runner, llm.scheduler
    gen = torch.Generator().manual_seed(0)
    rows, pages_all = [], []
    for _ in range(args.batch):
        pages = sched.pool.alloc(sched._pages_for(args.prompt + args.steps + 8))
        row = sched.slots.alloc_row()
        assert pages is not None and row is not None
        sched.slots.assign_pages(row, 0, pages)
        rows.append(row)
        pages_all.append(pages)
    prompts = [torch.randint(1, 150000, (args.prompt,), generator=gen).tolist() for _ in rows]
    for i in range(0, args.batch, 16):  # prefill 16 requests per forward
        ids = [t for p in prompts[i : i + 16] for t in p]
        runner.forward(runner.build_batch(ids, rows[i : i + 16], [0] * len(rows[i : i + 16]),
                                          [args.prompt] * len(rows[i : i + 16]), sched.slots))  # fmt: skip
    context = args.prompt
    greedy = all_greedy_rows(args.batch, torch.device("cuda"))
    times = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        batch = runner.build_batch([1] * args.batch, rows, [context] * args.batch, [1] * args.batch, sched.slots)
        logits = runner.forward(batch)
        sample(logits, greedy).tolist()  # the engine's greedy sampling and its one copy of sampled ids
        times.append(time.perf_counter() - start)
        context += 1

    gathered: list[str] = []
    real_gather, real_sdpa = KVCache.gather, F.scaled_dot_product_attention

    def spy_gather(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        gathered.append("KVCache.gather")
        return real_gather(self, *a, **k)

    def spy_sdpa(*a, **k):  # noqa: ANN002, ANN003
        gathered.append("scaled_dot_product_attention")
        return real_sdpa(*a, **k)

    KVCache.gather, F.scaled_dot_product_attention = spy_gather, spy_sdpa
    try:
        batch = runner.build_batch([1] * args.batch, rows, [context] * args.batch, [1] * args.batch, sched.slots)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sample(runner.forward(batch), greedy).tolist()
            torch.cuda.synchronize()
    finally:
        KVCache.gather, F.scaled_dot_product_attention = real_gather, real_sdpa
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    timeline = kernel_timeline(prof)
    # Steps queued back to back (as under overlap scheduling): the device's wall time per step, launch gaps included.
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(20):
        runner.forward(batch)
    end.record()
    end.synchronize()
    timeline["back_to_back_step_ms"] = begin.elapsed_time(end) / 20
    with open(os.path.join(args.out, f"profile_{variant}{_suffix(args)}.txt"), "w") as f:
        f.write(f"{torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        f.write(f"decode step, batch {args.batch}, context {context}, {args.layers} layers, {variant}, "
                f"quantization {args.quantization}\n")  # fmt: skip
        f.write(table)
        f.write(f"\ntimeline of the profiled step: {json.dumps(timeline)}\n")
    names = sorted({e.key for e in prof.key_averages()})
    bad = sorted(n for n in names if any(w in n.lower() for w in FORBIDDEN))
    gpu_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    for row, pages in zip(rows, pages_all, strict=True):
        sched.pool.free(pages)
        sched.slots.free_row(row)
    return {"variant": variant, "step_ms_median": 1e3 * statistics.median(times[2:] or times),
            "profiled_gpu_ms": gpu_us / 1e3, **timeline, "forbidden_kernels": bad,
            "python_calls": sorted(set(gathered)),
            "out_tok_per_s": args.batch / statistics.median(times[2:] or times)}  # fmt: skip


def profile_prefill(path: str, args: argparse.Namespace) -> dict[str, object]:
    """16 prompts of 1024 tokens, one new token each, through the scheduler (chunks of --chunk tokens, by default
    pd serve's for this GPU) as `pd serve` runs them: the wall time of the burst after a warm-up at the same shape,
    and one profiled burst."""
    from torch.profiler import ProfilerActivity, profile

    from pd.engine.io import SamplingParams
    from pd.engine.llm import LLM

    llm = LLM(path, device="cuda", dtype=torch.bfloat16, page_size=16, max_running_requests=64,
              max_total_tokens=64 * 1200, chunked_prefill_size=args.chunk, quantization=args.quantization)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    vocab = llm.runner.model_config.vocab_size
    prompts = [torch.randint(1, vocab, (1024,), generator=gen).tolist() for _ in range(16)]
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    llm.generate(prompts, params)  # every kernel variant of the shape compiles here
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params)
        torch.cuda.synchronize()
    # The host's own time, by Python function: what the device waits on before the first kernel and between
    # admitting requests and launching their forward (cProfile slows the host, so compare shares, not times).
    host = cProfile.Profile()
    host.enable()
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    host.disable()
    with open(os.path.join(args.out, f"host_prefill{_suffix(args)}.txt"), "w") as f:
        stats = pstats.Stats(host, stream=f)
        stats.sort_stats("cumulative").print_stats(60)
        stats.sort_stats("tottime").print_stats(30)
    with open(os.path.join(args.out, f"profile_prefill{_suffix(args)}.txt"), "w") as f:
        f.write(f"{torch.cuda.get_device_name()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        chunk = llm.scheduler.cfg.chunked_prefill_size
        f.write(f"prefill 16 x 1024, {args.model}, {args.layers} layers, chunk {chunk}, wall {wall * 1e3:.1f} ms\n")
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
        timeline = kernel_timeline(prof)
        # host time before the first kernel and after the last one (building the first batch; the last outputs)
        events = [e for e in prof.events() if e.time_range.end > e.time_range.start]
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        if kernels:
            timeline["host_lead_ms"] = (min(e.time_range.start for e in kernels)
                                        - min(e.time_range.start for e in events)) / 1e3  # fmt: skip
            timeline["host_tail_ms"] = (max(e.time_range.end for e in events)
                                        - max(e.time_range.end for e in kernels)) / 1e3  # fmt: skip
        f.write(f"\ntimeline of the profiled burst: {json.dumps(timeline)}\n")
        f.write("the device's longest idle spells (where the wall time beyond the kernels goes):\n")
        for gap in idle_spells(prof, 12):
            f.write(f"  {json.dumps(gap)}\n")
    gpu_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return {"variant": "prefill", "wall_ms": wall * 1e3, "tok_per_s": 16 * 1024 / wall, "profiled_gpu_ms": gpu_us / 1e3,
            **timeline}


def _suffix(args: argparse.Namespace) -> str:
    model = "" if args.model == "qwen3" else f"_{args.model}"
    chunk = "" if args.chunk is None else f"_chunk{args.chunk}"
    return model + ("" if args.quantization == "none" else f"_{args.quantization}") + chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".")
    parser.add_argument("--model", choices=("qwen3", "deepseek"), default="qwen3",
                        help="deepseek: bench_gpu_serve.py's DeepSeek-V3 shape (its context is 4096 tokens)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default="triton,triton-eager,torch")
    parser.add_argument("--chunk", type=int, default=None,
                        help="prefill: --chunked-prefill-size (default: the GPU's, as pd serve resolves it)")
    parser.add_argument("--quantization", default="none", choices=["none", "fp8"],
                        help="fp8: the same checkpoint with its weights block-quantized at load (--quantization fp8)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "qwen3":
            make_checkpoint(tmp, args.layers)
        else:  # the serving benchmark's DeepSeek-V3 shape (MLA, 256 experts, group-limited routing)
            from benchmarks.bench_gpu_serve import model_config, write_checkpoint

            write_checkpoint(tmp, model_config(args.model, args.layers, False), "cuda")
        for variant in args.variants.split(","):
            results.append(profile_prefill(tmp, args) if variant == "prefill" else run_backend(tmp, variant, args))
            print(json.dumps(results[-1]), flush=True)
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, f"decode_step{_suffix(args)}.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "args": vars(args), "results": results}, f, indent=1)  # fmt: skip
    for r in results:
        if r["variant"].startswith("triton") and (r["forbidden_kernels"] or r["python_calls"]):  # type: ignore
            raise SystemExit(f"{r['variant']} decode step still runs {r['forbidden_kernels']} {r['python_calls']}")


if __name__ == "__main__":
    main()
