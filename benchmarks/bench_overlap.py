"""Two-batch overlap, the mechanism alone: a stack of layers (a dense "attention" stand-in, then a FusedMoE over the
torch all-to-all dispatcher in normal mode) run on T tokens per rank as one batch, and as two micro-batches of T/2
interleaved through the layers' stages (pd.models.llama.interleave, what --enable-two-batch-overlap runs), in the
same run. Both give the same output (checked first); the ratio two / one (< 1: the overlap pays) is what hiding
one micro-batch's transfers behind the other's compute is worth on this transport.

Per layer: x += x @ W_attn (a [H, H] GEMM standing for attention), then x += MoE(x) with E experts, top-K,
intermediate I. Timed: the slowest rank's wall time of --layers layers, median over --iters, after warm-up.

Usage (one process per rank: gloo on CPU, NCCL on CUDA):
    python benchmarks/bench_overlap.py [--ep 2] [--tokens 256 1024] [--device cpu] [--out result.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Generator
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
from pd.models.llama import interleave  # noqa: E402
from pd.moe.context import MoeContext  # noqa: E402
from pd.moe.layer import FusedMoE  # noqa: E402
from pd.moe.topk import TopKConfig  # noqa: E402


class Layer(torch.nn.Module):
    def __init__(self, args: argparse.Namespace, ctx: MoeContext, gen: torch.Generator) -> None:
        super().__init__()
        h, e = args.hidden, args.experts
        self.register_buffer("attn", torch.randn(h, h, generator=gen) * h**-0.5)
        self.register_buffer("router", torch.randn(e, h, generator=gen) * h**-0.5)
        self.moe = FusedMoE(e, h, args.inter, TopKConfig(top_k=args.topk), ctx)
        self.moe.load_fused(torch.randn(e, 2 * args.inter, h, generator=gen) * h**-0.5,
                            torch.randn(e, h, args.inter, generator=gen) * args.inter**-0.5)  # fmt: skip
        self.moe.finalize_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + x @ self.attn
        return x + self.moe(x, x @ self.router.t())

    def stages(self, x: torch.Tensor) -> Generator[None, None, torch.Tensor]:
        x = x + x @ self.attn
        return x + (yield from self.moe.stages(x, x @ self.router.t()))


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ep))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=args.ep, timeout=timedelta(seconds=120))  # fmt: skip
    ctx = MoeContext(ep_rank=rank, ep_size=args.ep, dispatcher="torch", group=dist.group.WORLD)
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(0)  # built on the host, then moved: the same weights on any device
        layers = [Layer(args, ctx, gen).to(device) for _ in range(args.layers)]
        rows = []
        for tokens in args.tokens:
            x = torch.randn(tokens, args.hidden, generator=torch.Generator().manual_seed(rank)).to(device)

            def one(x: torch.Tensor = x) -> torch.Tensor:
                y = x
                for layer in layers:
                    y = layer(y)
                return y

            def two(x: torch.Tensor = x) -> torch.Tensor:
                half = x.shape[0] // 2
                ys = [x[:half], x[half:]]
                for layer in layers:
                    ys = interleave([layer.stages(ys[0]), layer.stages(ys[1])])
                return torch.cat(ys)

            torch.testing.assert_close(two(), one(), rtol=1e-4, atol=1e-4)
            times: dict[str, list[float]] = {"one": [], "two": []}
            for it in range(args.iters + 2):
                for name, run in (("one", one), ("two", two)):
                    dist.barrier()
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    run()
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
                    dist.all_reduce(took, op=dist.ReduceOp.MAX)
                    if it >= 2:
                        times[name].append(float(took) * 1e3)
            one_ms, two_ms = statistics.median(times["one"]), statistics.median(times["two"])
            rows.append({"tokens": tokens, "one_batch_ms": round(one_ms, 2), "two_micro_batches_ms": round(two_ms, 2),
                         "ratio": round(two_ms / one_ms, 3)})  # fmt: skip
            if rank == 0:
                print(f"T={tokens:5d}/rank  one batch {one_ms:8.2f} ms  two micro-batches {two_ms:8.2f} ms  "
                      f"ratio {two_ms / one_ms:.3f}", flush=True)
    if rank == 0 and args.out:
        record = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"), "args": vars(args),
                  "torch": torch.__version__, "cpus": os.cpu_count(), "rows": rows}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--inter", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args, port), nprocs=args.ep, join=True)


if __name__ == "__main__":
    main()
