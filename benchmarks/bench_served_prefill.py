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
With --against ROOT, another checkout's server runs beside this one's and the bursts take turns between them (ABBA):
host-path changes of a millisecond are inside the spread of two separate runs on a small host, not of the median of
the paired differences, which is printed per form.

Usage: python benchmarks/bench_served_prefill.py [--prompts 16] [--length 1024] [--bursts 7] [--fronts 1]
           [--fixed-ms 5] [--us-per-token 3.45] [--serve-args "--prefill-wait-ms 10"] [--against ROOT] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

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


FORMS = ("concurrent", "batched")


@contextlib.contextmanager
def _server(root: str, checkpoint: str, record: str, args: argparse.Namespace) -> Iterator[str]:
    """`pd serve` of the checkout at ``root`` with the stand-in device, recording its forwards in ``record``;
    yields its URL. It runs in ``root``, so `python -m` imports that checkout's code whatever this one is."""
    from tests.server_process import free_port, healthy_process

    tokens = args.prompts * args.length
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.bench_served_prefill", "--serve", "--model-path", checkpoint,
               "--device", "cpu", "--dtype", "float32", "--port", str(port), "--attention-backend", "triton",
               "--max-running-requests", str(max(64, args.prompts)), "--chunked-prefill-size", str(tokens),
               "--max-total-tokens", str(4 * tokens + 4096), "--log-level", "warning",
               "--tokenizer-worker-num", str(args.fronts), *args.serve_args.split()]  # fmt: skip
    path_now = os.environ.get("PYTHONPATH")
    env = {"TRITON_INTERPRET": "1", "PD_BENCH_FORWARDS": record, "PD_BENCH_FIXED_S": str(args.fixed_ms / 1e3),
           "PD_BENCH_PER_TOKEN_S": str(args.us_per_token / 1e6),
           "PYTHONPATH": os.pathsep.join([root, path_now]) if path_now else root}  # fmt: skip
    with healthy_process(command, port, env=env, cwd=root) as (url, _):
        yield url


def _summary(bursts: list[dict[str, Any]], device_ms: float) -> dict[str, Any]:
    median = statistics.median(b["ms"] for b in bursts)
    return {"bursts": bursts, "median_ms": median, "x_stand_in": median / device_ms}


def _line(summary: dict[str, Any], device_ms: float) -> str:
    bursts, median = summary["bursts"], summary["median_ms"]
    return (f"median burst {median:6.1f} ms = {median / device_ms:.3f}x the stand-in's {device_ms:.1f} ms; forwards "
            f"per burst {[len(b['forwards']) for b in bursts]}; first forward at "
            f"{statistics.median(b['first_forward_ms'] for b in bursts):.1f} ms; done "
            f"{statistics.median(b['after_last_forward_ms'] for b in bursts):.1f} ms after the last")  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The bursts against this checkout's server; with ``args.against`` (another checkout's root) against both,
    taking turns burst by burst (ABBA), with the median of the paired differences (this - against) per form."""
    from benchmarks.bench_gpu_serve import _batch_load, _serve_load, run_load
    from tests.tiny_checkpoints import make_checkpoint

    roots = {"this": ROOT}
    if args.against:
        roots["against"] = os.path.abspath(args.against)
    gen = torch.Generator().manual_seed(int(time.time()))
    device_ms = args.fixed_ms + args.us_per_token * args.prompts * args.length / 1e3
    result: dict[str, Any] = {"args": vars(args), "stand_in_burst_ms": device_ms}

    def fresh() -> list[list[int]]:  # fresh prompts: a repeated one would come from the prefix cache
        return [torch.randint(1, 250, (args.length,), generator=gen).tolist() for _ in range(args.prompts)]

    def burst(url: str, form: str, record: str) -> dict[str, Any]:
        began: list[float] = []  # the burst's own clock start (after the client's loop and encoding)
        load = _serve_load(url, fresh(), 1, began) if form == "concurrent" else _batch_load(url, fresh(), 1, began)
        took = run_load(load)
        took = took[0] if isinstance(took, tuple) else took
        start = began[0]
        time.sleep(0.1)  # bursts apart (each forward's record is written before its answer)
        fwd = _forwards(record, start, start + took)
        last_end = max(f["start"] + args.fixed_ms / 1e3 + args.us_per_token * f["tokens"] / 1e6 for f in fwd)
        return {"ms": 1e3 * took, "forwards": [f["tokens"] for f in fwd],
                "first_forward_ms": 1e3 * (fwd[0]["start"] - start),
                "after_last_forward_ms": 1e3 * (start + took - last_end)}  # fmt: skip

    with tempfile.TemporaryDirectory() as path, contextlib.ExitStack() as stack:
        make_checkpoint("llama", path)
        records = {name: os.path.join(path, f"forwards-{name}.jsonl") for name in roots}
        urls = {name: stack.enter_context(_server(root, path, records[name], args)) for name, root in roots.items()}
        for url in urls.values():
            run_load(_serve_load(url, [[1, 2, 3]], 4))  # warm-up
        names = list(roots)
        for form in FORMS:
            for name in names:
                burst(urls[name], form, records[name])  # a first burst of the form, not counted
            bursts: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for k in range(args.bursts):
                for name in names if k % 4 in (0, 3) else names[::-1]:  # ABBA: both see the machine alike
                    bursts[name].append(burst(urls[name], form, records[name]))
            result[form] = _summary(bursts["this"], device_ms)
            print(f"{form:>10}: {_line(result[form], device_ms)}", flush=True)
            if "against" in bursts:
                against = result[form]["against"] = _summary(bursts["against"], device_ms)
                pairs = zip(bursts["this"], bursts["against"], strict=True)
                diff = statistics.median(a["ms"] - b["ms"] for a, b in pairs)
                result[form]["paired_diff_ms"] = diff
                print(f"{'against':>10}: {_line(against, device_ms)}\n{'':>10}  median of the paired differences "
                      f"(this - against): {diff:+.2f} ms", flush=True)  # fmt: skip
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
    parser.add_argument("--against", default=None, help="another checkout's root: its server too, bursts taking "
                        "turns, and the paired differences")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
