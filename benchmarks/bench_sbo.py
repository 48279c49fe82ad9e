"""Single-batch overlap (SBO) on one GPU: a DeepSeek-style MoE block (routed experts + shared experts) with the shared
experts on a second CUDA stream, against the same block running them in order, in the same run.

The block: FusedMoE over E routed experts (all local: one GPU, no dispatch traffic), top-K routing from random
logits, intermediate I per expert, and a shared SwiGLU MLP of intermediate I_s, bf16. For each token count both
variants run interleaved (in order, overlapped, in order, ...) so drift reaches both alike; each measurement is
CUDA events around --reps forwards, and the table shows the median over --iters measurements. The outputs are
compared first: max |difference| of the overlapped block, beside the in-order block's own run-to-run difference.
Ratio = overlapped / in order (< 1: the overlap helps).

Usage: python benchmarks/bench_sbo.py [--tokens 16 128 1024 4096] [--out result.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout
from pd.models.llama import DenseMLP  # noqa: E402
from pd.moe.context import MoeContext  # noqa: E402
from pd.moe.layer import FusedMoE  # noqa: E402
from pd.moe.topk import TopKConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 1024, 4096])
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--shared-inter", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    h, e = args.hidden, args.experts
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        layers = {sbo: FusedMoE(e, h, args.inter, TopKConfig(top_k=args.topk), MoeContext(single_batch_overlap=sbo))
                  for sbo in (False, True)}  # fmt: skip
        shared = DenseMLP(h, args.shared_inter)
    torch.set_default_dtype(torch.float32)
    w13 = torch.randn(e, 2 * args.inter, h, device="cuda", dtype=torch.bfloat16) / 64
    w2 = torch.randn(e, h, args.inter, device="cuda", dtype=torch.bfloat16) / 64
    for layer in layers.values():
        layer.load_fused(w13, w2)
        layer.finalize_weights()

    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(tokens, e, device="cuda")
        with torch.inference_mode():
            outs = [layers[sbo](x, logits, shared=lambda x=x: shared(x)) for sbo in (False, False, True)]
        # Not bit for bit: the runner's CUDA index_add_ sums a token's expert rows in a varying order, so compare
        # the overlap's difference with the in-order run's own run-to-run difference.
        repeat_diff = float((outs[0].float() - outs[1].float()).abs().max())
        overlap_diff = float((outs[0].float() - outs[2].float()).abs().max())
        times: dict[bool, list[float]] = {False: [], True: []}
        for it in range(args.iters + 3):  # 3 warm-up rounds
            for sbo, layer in layers.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                with torch.inference_mode():
                    for _ in range(args.reps):
                        layer(x, logits, shared=lambda x=x: shared(x))
                end.record()
                torch.cuda.synchronize()
                if it >= 3:
                    times[sbo].append(start.elapsed_time(end) * 1e3 / args.reps)
        in_order, overlapped = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"tokens": tokens, "in_order_us": round(in_order, 1), "overlapped_us": round(overlapped, 1),
                     "ratio": round(overlapped / in_order, 3), "max_abs_diff_in_order_twice": repeat_diff,
                     "max_abs_diff_overlapped": overlap_diff})  # fmt: skip
        print(f"T={tokens:5d}  in order {in_order:9.1f} us  overlapped {overlapped:9.1f} us  "
              f"ratio {overlapped / in_order:.3f}  max |diff| in order twice {repeat_diff:.2g}, "
              f"overlapped {overlap_diff:.2g}", flush=True)
    if args.out:
        record = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
                  "device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args),
                  "rows": rows}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
