"""Where a served decode step's time goes on one GPU: the engine alone, then the engine behind the HTTP front.

Model: Qwen3-MoE at Qwen3-30B-A3B widths with --layers layers (random bf16, as profile_decode_step.py). Workload:
--batch concurrent greedy requests of 128-token prompts and --new-tokens new tokens (ignore_eos).
1. The engine in-process (pd.engine.llm.LLM, CUDA graphs), with and without overlap scheduling: out tok/s.
2. Host cost of building one decode batch (median of 200 builds).
3. `pd serve` run under cProfile (the HTTP front's process; the engine runs in its own process) with the same
   load from a bare asyncio client: out tok/s, and the front's hottest functions in OUT/front_profile.txt.
4. With --py-spy: py-spy (`pip install py-spy`) samples the engine's rank process and the front during a second
   served load, and OUT/py_spy_{rank,front}.txt list the functions and lines where each spent its time (own time
   and with callees). This is how a step that the first three called host-bound is taken apart: in December it
   showed 81% of the rank's time in two lines of the batch builder (torch's repeat_interleave on 64 ints).

Usage: python benchmarks/profile_serve.py --out DIR [--layers 8] [--batch 64] [--new-tokens 128] [--py-spy]
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.bench_gpu_serve import _serve_load, run_load  # noqa: E402
from benchmarks.profile_decode_step import make_checkpoint  # noqa: E402


def engine_rates(path: str, args: argparse.Namespace) -> dict[str, float]:
    from pd.engine.io import SamplingParams
    from pd.engine.llm import LLM

    gen = torch.Generator().manual_seed(0)
    # Fresh random prompts for every run: a repeated prompt would be served from the prefix cache.
    def fresh() -> list[list[int]]:
        return [torch.randint(1, 150000, (128,), generator=gen).tolist() for _ in range(args.batch)]

    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    out: dict[str, float] = {}
    for overlap in (True, False):
        llm = LLM(path, device="cuda", dtype=torch.bfloat16, page_size=16, max_running_requests=args.batch,
                  max_total_tokens=args.batch * 400, chunked_prefill_size=8192, overlap=overlap)  # fmt: skip
        llm.generate(fresh(), SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(fresh(), params)
        torch.cuda.synchronize()
        out[f"engine_tok_s_overlap_{overlap}"] = args.batch * args.new_tokens / (time.perf_counter() - start)
        if overlap:
            out.update(build_cost(llm, args.batch))
        del llm
        torch.cuda.empty_cache()
    return out


def build_cost(llm, batch: int) -> dict[str, float]:  # noqa: ANN001
    sched, runner = llm.scheduler, llm.runner
    rows = []
    for _ in range(batch):
        row = sched.slots.alloc_row()
        pages = sched.pool.alloc(8)
        sched.slots.assign_pages(row, 0, pages)
        rows.append(row)
    out = {}
    pin = torch.Tensor.pin_memory
    for pinned in (True, False):
        if not pinned:  # the same build from pageable memory, for comparison
            torch.Tensor.pin_memory = lambda self: self  # type: ignore[method-assign]
        times = []
        for _ in range(200):
            start = time.perf_counter()
            runner.build_batch([5] * batch, rows, [100] * batch, [1] * batch, sched.slots,
                               token_source=sched.last_tokens)  # fmt: skip
            times.append(time.perf_counter() - start)
        torch.Tensor.pin_memory = pin  # type: ignore[method-assign]
        out[f"build_batch_us_median_pinned_{pinned}"] = 1e6 * statistics.median(times)
    return out


def front_profile(path: str, args: argparse.Namespace) -> dict[str, float]:
    from tests.server_process import free_port, healthy_process

    port = free_port()
    prof_file = os.path.join(args.out, "front.prof")
    profiler = [sys.executable, "-m", "cProfile", "-o", prof_file] if args.cprofile else [sys.executable]
    argv = [*profiler, "-m", "pd", "serve", "--model-path", path, "--device", "cuda", "--dtype", "bfloat16",
            "--port", str(port), "--max-running-requests", str(args.batch), "--chunked-prefill-size", "8192",
            "--log-level", "info", *args.serve_args.split()]  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 150000, (128,), generator=gen).tolist() for _ in range(2 * args.batch)]
    with healthy_process(argv, port, timeout=600, log_path=os.path.join(args.out, "front_server.log")) as (url, proc):
        run_load(_serve_load(url, prompts[args.batch :], 4))  # other prompts: no prefix-cache hit below
        elapsed, arrivals = run_load(_serve_load(url, prompts[: args.batch], args.new_tokens))
        if args.py_spy:
            more = [torch.randint(1, 150000, (128,), generator=gen).tolist() for _ in range(args.batch)]
            sample_processes(url, {"front": proc.pid, "rank": rank_pid()}, more, args)
    if args.cprofile:
        text = io.StringIO()
        stats = pstats.Stats(prof_file, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(40)
        with open(os.path.join(args.out, "front_profile.txt"), "w") as f:
            f.write(text.getvalue())
    gaps = sorted(t1 - t0 for times in arrivals for t0, t1 in zip(times[1:], times[2:], strict=False))
    return {"serve_tok_s": args.batch * args.new_tokens / elapsed,
            "serve_gap_ms_p50": 1e3 * gaps[len(gaps) // 2] if gaps else 0.0}  # fmt: skip


def rank_pid() -> int:
    """The pid of the served engine's first rank (ranks are named pd-rankN)."""
    out = subprocess.run(["pgrep", "-n", "pd-rank0"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def sample_processes(url: str, pids: dict[str, int], prompts: list[list[int]], args: argparse.Namespace) -> None:
    """py-spy on each process while the prompts are served; a summary per process in OUT/py_spy_<name>.txt."""
    seconds = 4
    spies = {name: subprocess.Popen(["py-spy", "record", "--rate", "500", "--duration", str(seconds), "--format",
                                     "raw", "--nonblocking", "--output", os.path.join(args.out, f"py_spy_{name}.raw"),
                                     "--pid", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, pid in pids.items()}  # fmt: skip
    time.sleep(0.5)  # py-spy attaches
    while any(spy.poll() is None for spy in spies.values()):  # the same load again until the window closes
        run_load(_serve_load(url, prompts, args.new_tokens))
        prompts = [[t + 1 for t in p] for p in prompts]  # not the prefix cache's
    for name, spy in spies.items():
        _, err = spy.communicate()
        raw = os.path.join(args.out, f"py_spy_{name}.raw")
        if spy.returncode != 0 or not os.path.exists(raw):
            print(f"py-spy on the {name} failed: {err.strip()[-300:]}", flush=True)
            continue
        with open(os.path.join(args.out, f"py_spy_{name}.txt"), "w") as f:
            f.write(summarize_collapsed(raw))
        os.remove(raw)


def summarize_collapsed(path: str, rows: int = 30) -> str:
    """Top frames of a collapsed-stack file (`frame;frame;... count` lines): by own samples and with callees."""
    own: collections.Counter[str] = collections.Counter()
    total_with_callees: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            frames, n = stack.split(";"), int(count)
            total += n
            own[frames[-1]] += n
            total_with_callees.update(dict.fromkeys(set(frames), n))
    lines = [f"{total} samples", "-- own time"]
    lines += [f"{c / total:6.1%}  {frame}" for frame, c in own.most_common(rows)]
    lines.append("-- with callees")
    lines += [f"{c / total:6.1%}  {frame}" for frame, c in total_with_callees.most_common(2 * rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--cprofile", action="store_true", help="run the front under cProfile")
    parser.add_argument("--skip-engine", action="store_true", help="only the served measurement")
    parser.add_argument("--serve-args", default="", help="extra `pd serve` flags")
    parser.add_argument("--py-spy", action="store_true", help="sample the rank and the front with py-spy")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(tmp, args.layers)
        result = {} if args.skip_engine else engine_rates(tmp, args)
        print(json.dumps(result), flush=True)
        result.update(front_profile(tmp, args))
    result.update(gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(json.dumps(result), flush=True)
    with open(os.path.join(args.out, "serve_profile.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
