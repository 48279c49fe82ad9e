"""Where a served prompt burst's time goes outside the device: `pd serve` on the CPU with a stand-in device.

`pd serve` runs as usual (HTTP fronts, engine process, scheduler, batch building with the GPU's attention backend, its
Triton kernels never launched), except that the model's forward is a stand-in: it sleeps as long as a device would
take for the forward (--fixed-ms per forward plus --us-per-token per prompt token; the defaults are the DeepSeek-V3
shape of bench_gpu_serve.py on one H200, whose 16 x 1024 prefill took 66.6 ms of kernels as two 8K forwards and 61.8
ms as one 16K forward) and answers zero logits. The host path is then all that separates a burst from the stand-in's
time.

Workload (the serving issue's prefill): bursts of --prompts fresh random prompts of --length tokens and one new
token, sent as concurrent /generate requests and as one batched /generate request. Printed per form, in the same
run: the median burst, the stand-in device time of the whole burst in one forward (the reference), their ratio, how
many forwards a burst ran as, when its first forward began and how long after its last forward the burst ended.

Usage: python benchmarks/bench_served_prefill.py [--prompts 16] [--length 1024] [--bursts 7] [--fronts 1]
           [--fixed-ms 5] [--us-per-token 3.45] [--serve-args "--prefill-wait-ms 10"] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def stand_in_scheduler(cfg: Any, runner: Any, disagg: Any = None) -> Any:
    """The SchedulerFactory of the served instance: the real scheduler over a runner whose forward sleeps (a module-
    level function: rank processes import it). Each forward's start (time.monotonic, one clock for every process of
    the machine) and token count go to the file PD_BENCH_FORWARDS names."""
    from pd.engine.scheduler import Scheduler

    fixed_s, per_token_s = float(os.environ["PD_BENCH_FIXED_S"]), float(os.environ["PD_BENCH_PER_TOKEN_S"])
    record = os.environ["PD_BENCH_FORWARDS"]
    vocab = runner.model.config.vocab_size

    def forward(batch: Any, logits: bool = True, eager: bool = False) -> torch.Tensor:
        start = time.monotonic()
        with open(record, "a") as f:  # before the sleep: the record's write is the bench's, not the host path's
            f.write(json.dumps({"start": start, "tokens": batch.num_tokens}) + "\n")
        time.sleep(max(0.0, start + fixed_s + per_token_s * batch.num_tokens - time.monotonic()))
        return torch.zeros(int(batch.logits_index.shape[0]), vocab)

    runner.forward = forward
    return Scheduler(cfg, runner)


def serve(argv: list[str]) -> None:
    """The server child: `pd serve ARGV` with the stand-in device."""
    from pd.engine.spec import EngineSpec
    from pd.server.app import run_server
    from pd.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = ServerArgs.from_namespace(parser.parse_args(argv))
    run_server(args, EngineSpec.from_server_args(args, stand_in_scheduler))


def _forwards(path: str, start: float, end: float) -> list[dict[str, float]]:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if start <= r["start"] <= end]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.bench_gpu_serve import _batch_load, _serve_load, run_load
    from tests.server_process import free_port, healthy_process
    from tests.tiny_checkpoints import make_checkpoint

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    gen = torch.Generator().manual_seed(int(time.time()))
    tokens = args.prompts * args.length
    device_ms = args.fixed_ms + args.us_per_token * tokens / 1e3
    result: dict[str, Any] = {"args": vars(args), "stand_in_burst_ms": device_ms}
    with tempfile.TemporaryDirectory() as path:
        make_checkpoint("llama", path)
        record = os.path.join(path, "forwards.jsonl")
        port = free_port()
        command = [sys.executable, "-m", "benchmarks.bench_served_prefill", "--serve", "--model-path", path,
                   "--device", "cpu", "--dtype", "float32", "--port", str(port), "--attention-backend", "triton",
                   "--max-running-requests", str(max(64, args.prompts)), "--chunked-prefill-size", str(tokens),
                   "--max-total-tokens", str(4 * tokens + 4096), "--log-level", "warning",
                   "--tokenizer-worker-num", str(args.fronts), *args.serve_args.split()]  # fmt: skip
        path_now = os.environ.get("PYTHONPATH")
        env = {"TRITON_INTERPRET": "1", "PD_BENCH_FORWARDS": record, "PD_BENCH_FIXED_S": str(args.fixed_ms / 1e3),
               "PD_BENCH_PER_TOKEN_S": str(args.us_per_token / 1e6),
               "PYTHONPATH": os.pathsep.join([root, path_now]) if path_now else root}  # fmt: skip

        def fresh() -> list[list[int]]:  # fresh prompts: a repeated one would come from the prefix cache
            return [torch.randint(1, 250, (args.length,), generator=gen).tolist() for _ in range(args.prompts)]

        loads = {"concurrent": lambda p, b=None: _serve_load(url, p, 1, b),
                 "batched": lambda p, b=None: _batch_load(url, p, 1, b)}
        with healthy_process(command, port, env=env) as (url, _):
            run_load(_serve_load(url, [[1, 2, 3]], 4))  # warm-up
            for form, load in loads.items():
                run_load(load(fresh()))
                bursts = []
                for _ in range(args.bursts):
                    prompts = fresh()
                    began: list[float] = []  # the burst's own clock start (after the client's loop and encoding)
                    took = run_load(load(prompts, began))
                    start = began[0]
                    took = took[0] if isinstance(took, tuple) else took
                    time.sleep(0.1)  # bursts apart (each forward's record is written before its answer)
                    fwd = _forwards(record, start, start + took)
                    last_end = max(f["start"] + args.fixed_ms / 1e3 + args.us_per_token * f["tokens"] / 1e6
                                   for f in fwd)  # fmt: skip
                    bursts.append({"ms": 1e3 * took, "forwards": [f["tokens"] for f in fwd],
                                   "first_forward_ms": 1e3 * (fwd[0]["start"] - start),
                                   "after_last_forward_ms": 1e3 * (start + took - last_end)})  # fmt: skip
                median = statistics.median(b["ms"] for b in bursts)
                result[form] = {"bursts": bursts, "median_ms": median, "x_stand_in": median / device_ms}
                print(f"{form:>10}: median burst {median:6.1f} ms = {median / device_ms:.3f}x the stand-in's "
                      f"{device_ms:.1f} ms; forwards per burst {[len(b['forwards']) for b in bursts]}; first "
                      f"forward at {statistics.median(b['first_forward_ms'] for b in bursts):.1f} ms; done "
                      f"{statistics.median(b['after_last_forward_ms'] for b in bursts):.1f} ms after the last",
                      flush=True)  # fmt: skip
    return result


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--bursts", type=int, default=7)
    parser.add_argument("--fronts", type=int, default=1, help="front processes (pd serve --tokenizer-worker-num)")
    parser.add_argument("--fixed-ms", type=float, default=5.0, help="the stand-in's time per forward")
    parser.add_argument("--us-per-token", type=float, default=3.45, help="the stand-in's time per prompt token")
    parser.add_argument("--serve-args", default="", help="more pd serve flags")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
