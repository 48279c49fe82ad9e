"""Throughput of `pd serve` against transformers `generate` on the same checkpoint, measured in one run.

Checkpoint: Qwen3-MoE-like (hidden 512, 4 layers, 32 experts top-4, vocab 8192), random weights, fp32.
Workload: 16 requests of random prompt lengths (64-191 tokens), 128 new tokens each, greedy, no EOS.
transformers runs them as one left-padded batch through `generate`; pd serve gets them as 16 concurrent
HTTP /generate requests. Prints both throughputs (output tokens per second) and their ratio, per round
and the median over rounds.

Usage: python benchmarks/bench_serve_vs_hf.py [--out results.json] [--device cpu] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx
import torch

NUM_REQUESTS, NEW_TOKENS = 16, 128


def make_checkpoint(path: str) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1024,
        moe_intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=32,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    Qwen3MoeForCausalLM(config).float().save_pretrained(path)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tests.tiny_checkpoints import write_tokenizer

    write_tokenizer(path)


def make_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(64, 192, (NUM_REQUESTS,), generator=gen)
    return [torch.randint(1, 8192, (int(n),), generator=gen).tolist() for n in lens]


def load_transformers(path: str, device: str):  # noqa: ANN201 (transformers is imported lazily)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def bench_transformers(model, prompts: list[list[int]], device: str) -> float:  # noqa: ANN001
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
        elapsed = time.perf_counter() - start
    assert out.shape[1] - width == NEW_TOKENS
    return NUM_REQUESTS * NEW_TOKENS / elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _send_all(url: str, prompts: list[list[int]]) -> tuple[float, int]:
    async with httpx.AsyncClient(timeout=600) as client:
        params = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}
        # Warm-up (first-call allocations), then the measured burst.
        await client.post(
            f"{url}/generate", json={"input_ids": prompts[0], "sampling_params": {**params, "max_new_tokens": 4}}
        )
        start = time.perf_counter()
        results = await asyncio.gather(
            *[client.post(f"{url}/generate", json={"input_ids": p, "sampling_params": params}) for p in prompts]
        )
        elapsed = time.perf_counter() - start
    tokens = 0
    for r in results:
        r.raise_for_status()
        tokens += len(r.json()["output_ids"])
    return elapsed, tokens


@contextlib.contextmanager
def pd_serve(path: str, device: str) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pd", "serve", "--model-path", path, "--device", device, "--dtype", "float32",
           "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("pd serve did not become healthy")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def bench_pd_serve(url: str, prompts: list[list[int]]) -> float:
    elapsed, tokens = asyncio.run(_send_all(url, prompts))
    assert tokens == NUM_REQUESTS * NEW_TOKENS, tokens
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating transformers / pd serve measurements; the median ratio is reported")
    args = parser.parse_args()
    hf_runs, our_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "qwen3-moe-bench")
        make_checkpoint(path)
        prompts = make_prompts()
        model = load_transformers(path, args.device)
        # The server idles (blocked on its pipe) while transformers runs, and the other way round; alternating
        # rounds keep a passing load spike from landing on one side only.
        with pd_serve(path, args.device) as url:
            for r in range(args.rounds):
                hf_runs.append(bench_transformers(model, prompts, args.device))
                our_runs.append(bench_pd_serve(url, prompts))
                print(f"round {r + 1}/{args.rounds}: transformers {hf_runs[-1]:.1f} tok/s, pd serve "
                      f"{our_runs[-1]:.1f} tok/s, ratio {our_runs[-1] / hf_runs[-1]:.2f}", flush=True)
    ratios = sorted(o / h for o, h in zip(our_runs, hf_runs, strict=True))
    hf, ours = statistics.median(hf_runs), statistics.median(our_runs)
    result = {
        "checkpoint": "Qwen3-MoE-like: hidden 512, 4 layers, 32 experts top-4, vocab 8192, fp32",
        "workload": f"{NUM_REQUESTS} concurrent requests x {NEW_TOKENS} new tokens, prompts 64-191 tokens",
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        # whether pd serve's CPU MoE decode had its grouped GEMV kernel (it needs a C compiler on this machine)
        "cpu_grouped_gemv_kernel": args.device == "cpu" and _grouped_gemv_available(),
        "transformers_generate_tok_s": round(hf, 1),
        "pd_serve_tok_s": round(ours, 1),
        "ratio": round(statistics.median(ratios), 2),
        "rounds": [{"transformers_tok_s": round(h, 1), "pd_serve_tok_s": round(o, 1), "ratio": round(o / h, 2)}
                   for h, o in zip(hf_runs, our_runs, strict=True)],
    }
    print(json.dumps(result, indent=2))
    print(f"pd serve / transformers generate throughput (median of {args.rounds} rounds): {result['ratio']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def _grouped_gemv_available() -> bool:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from pd.layers import cpu_grouped_gemv

    return cpu_grouped_gemv.available()


if __name__ == "__main__":
    main()
