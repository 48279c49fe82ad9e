"""PD serving benchmark: `pd serve` vs prefill+decode behind `pd lb`, behind sglang-router, and with no balancer
at all, plus the KV transfer throughput of the Mooncake backend against a raw loopback TCP socket; one run.

Modes (same workload, same fixed concurrency, all measured with `pd bench`'s client, runner and report):
  unified  one non-disaggregated `pd serve` instance
  direct   1 prefill + 1 decode, no balancer: the client does the balancer's job inline (adds bootstrap_host/
           port/room, POSTs to prefill and decode at once, reads decode's stream); the zero-overhead baseline
  pd-lb    the same two instances behind `pd lb --policy round_robin`
  sglang   the same two instances behind `python -m sglang_router.launch_router --pd-disaggregation`
All instances and both balancers run throughout (an idle instance blocks, it does not spin); the modes take
turns in --rounds rounds of --num-prompts requests (order rotated, fresh prompts per round), so load drift on
a shared machine falls on all modes alike. Balancer overhead = p50 (E2E, TTFT) through it minus the same in
`direct`, with a 95% interval (bootstrap over rounds, then requests). A request at concurrency 8 on 2 cores
takes ~1 s and varies by 100s of ms, far coarser than the 2 ms target, so a paired probe follows: short
requests one at a time, each through direct, pd-lb and sglang in turn; median per-request difference. The
balancers' CPU time per request is measured too (independent of load). Targets: pd-lb adds <= 2 ms p50 and
reaches >= sglang-router's throughput. KV transfer: see benchmarks/bench_kv_transfer.py.

Usage: python benchmarks/bench_pd.py [--out benchmarks/results/pd_serving_cpu.json] (see --help)
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import httpx
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.bench_kv_transfer import bench_kv, format_kv  # noqa: E402
from pd.bench.client import BenchClient, RequestOutput  # noqa: E402
from pd.bench.datasets import BenchRequest, make_requests  # noqa: E402
from pd.bench.report import build_report, compute_metrics  # noqa: E402
from pd.bench.runner import run_requests, warm_up  # noqa: E402
from tests.pd_cluster import Proc, serve_argv, start_proc, wait_healthy  # noqa: E402
from tests.server_process import free_port  # noqa: E402
from tests.tiny_checkpoints import write_tokenizer  # noqa: E402

MODES = ("unified", "direct", "pd-lb", "sglang")
PROBED = ("direct", "pd-lb", "sglang")
HOST = "127.0.0.1"
# Qwen3-MoE-like: 16 experts top-4; KV per token = layers * 2 (K, V) * kv_heads * head_dim * 4 bytes = 4 KiB.
MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
             norm_topk_prob=True, max_position_embeddings=8192, bos_token_id=None, eos_token_id=None,
             pad_token_id=None)  # fmt: skip
_BOOTSTRAP: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("bootstrap")


def make_checkpoint(path: str) -> None:
    """Random-weight fp32 checkpoint of MODEL (no EOS, so every request makes exactly max_new_tokens)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**MODEL)).float().save_pretrained(path)
    write_tokenizer(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True}, f)


class DirectPDClient(BenchClient):
    """The load balancer's job done in the client: per request, a random bootstrap_room plus the prefill's
    bootstrap host/port go into the body, which is POSTed to prefill and decode concurrently; decode's stream
    is timed (by BenchClient.send), prefill's answer is read and only checked for success."""

    def __init__(self, prefill_url: str, bootstrap_port: int, decode_url: str, **kwargs: Any) -> None:
        super().__init__(decode_url, **kwargs)
        self._prefill = httpx.AsyncClient(base_url=prefill_url, timeout=3600.0,
                                          limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self._bootstrap_port = bootstrap_port

    async def __aexit__(self, *exc: object) -> None:
        await self._prefill.aclose()
        await super().__aexit__(*exc)

    def payload(self, req: BenchRequest) -> dict[str, Any]:
        # The room is per request; a context variable (one context per runner task) carries it into the body
        # BenchClient.send builds, so the decode and the prefill POST name the same room.
        return {**super().payload(req), **_BOOTSTRAP.get()}

    async def send(self, req: BenchRequest) -> RequestOutput:
        _BOOTSTRAP.set({"rid": uuid.uuid4().hex, "bootstrap_host": HOST, "bootstrap_port": self._bootstrap_port,
                        "bootstrap_room": random.getrandbits(63)})  # fmt: skip
        prefill = asyncio.create_task(self._prefill.post(self._path, json=self.payload(req)))
        out = await super().send(req)
        try:
            resp = await prefill
            problem = "" if resp.status_code == 200 else f"prefill HTTP {resp.status_code}: {resp.text[:200]}"
        except httpx.HTTPError as e:
            problem = f"prefill {type(e).__name__}: {e}"
        if problem and out.success:
            out.success, out.error = False, problem
        return out


def start_stack(model: str) -> tuple[dict[str, str], int, list[Proc]]:
    """Starts unified, prefill and decode instances, then both balancers; returns (urls by role, prefill
    bootstrap port, processes)."""
    ports = {name: free_port() for name in ("unified", "prefill", "bootstrap", "decode", "pd-lb", "sglang")}
    url = {name: f"http://{HOST}:{p}" for name, p in ports.items()}
    procs = [start_proc("unified", serve_argv(model, ports["unified"]), url["unified"]),
             start_proc("prefill", serve_argv(model, ports["prefill"], "--disaggregation-mode", "prefill",
                                              "--disaggregation-bootstrap-port", str(ports["bootstrap"])),
                        url["prefill"]),
             start_proc("decode", serve_argv(model, ports["decode"], "--disaggregation-mode", "decode"), url["decode"])]
    wait_healthy(procs)
    pair = ["--prefill", url["prefill"], str(ports["bootstrap"]), "--decode", url["decode"]]
    lbs = [start_proc("pd-lb", [sys.executable, "-m", "pd", "lb", "--port", str(ports["pd-lb"]), "--policy",
                                "round_robin", *pair], url["pd-lb"]),
           start_proc("sglang", [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
                                 "--host", HOST, "--port", str(ports["sglang"]), "--policy", "round_robin",
                                 "--prometheus-port", str(free_port()), *pair],
                      url["sglang"])]  # fmt: skip
    procs += lbs
    wait_healthy(lbs, timeout=60)
    return url, ports["bootstrap"], procs


async def bench_serving(args: argparse.Namespace, url: dict[str, str], bootstrap_port: int,
                        lb_pids: dict[str, int]) -> dict[str, Any]:
    """Every mode, round after round, then the paired probe; returns {mode: pooled metrics, per-round numbers,
    balancer CPU time, probe outputs}. lb_pids: mode -> its balancer's process id."""
    vocab, lens = MODEL["vocab_size"], (tuple(args.input_len), tuple(args.output_len))
    clients = {m: BenchClient(url[m], max_connections=None) for m in MODES if m != "direct"}
    clients["direct"] = DirectPDClient(url["prefill"], bootstrap_port, url["decode"])
    runs: dict[str, list[Any]] = {m: [] for m in MODES}
    probe: dict[str, list[RequestOutput]] = {m: [] for m in PROBED}
    lb_cpu_s = dict.fromkeys(MODES, 0.0)
    try:
        warm = make_requests("random-ids", args.concurrency, *lens, 999, vocab)
        for m in MODES:  # every batch size up to the concurrency, once, untimed
            await warm_up(clients[m], warm, len(warm), args.concurrency)
        for r in range(args.rounds):
            reqs = make_requests("random-ids", args.num_prompts, *lens, args.seed + r, vocab)
            for m in MODES[r % len(MODES):] + MODES[: r % len(MODES)]:
                cpu0 = cpu_seconds(lb_pids[m]) if m in lb_pids else 0.0
                runs[m].append(res := await run_requests(clients[m], reqs, max_concurrency=args.concurrency))
                lb_cpu_s[m] += cpu_seconds(lb_pids[m]) - cpu0 if m in lb_pids else 0.0
                ok = compute_metrics(res.outputs, res.duration_s)
                print(f"round {r} {m:8s} p50 E2E {ok['e2e_ms']['p50']:8.1f} ms  "
                      f"{ok['output_token_throughput']:7.1f} tok/s  failed {ok['failed']}", flush=True)
        # One request at a time, each sent through every PD path in turn: paired, so load drift cancels.
        out_len = (args.probe_output_len, args.probe_output_len)
        for i, req in enumerate(make_requests("random-ids", args.probe_requests, lens[0], out_len, 10**6, vocab)):
            for m in PROBED[i % 3:] + PROBED[: i % 3]:
                probe[m].append(await clients[m].send(req))
    finally:
        for c in clients.values():
            await c.__aexit__(None, None, None)
    result = {}
    for m in MODES:
        outs = [o for res in runs[m] for o in res.outputs]
        rep = build_report({}, outs, sum(res.duration_s for res in runs[m]))
        per_round = [compute_metrics(res.outputs, res.duration_s) for res in runs[m]]
        result[m] = {"metrics": rep["metrics"], "errors": rep["errors"],
                     "round_p50_e2e_ms": [x["e2e_ms"]["p50"] for x in per_round],
                     "round_output_token_throughput": [x["output_token_throughput"] for x in per_round],
                     "balancer_cpu_ms_per_request": lb_cpu_s[m] * 1e3 / len(outs) if m in lb_pids else None,
                     "_e2e": [[o.latency for o in res.outputs if o.success] for res in runs[m]],
                     "_ttft": [[o.ttft for o in res.outputs if o.success] for res in runs[m]]}
        if m in PROBED:
            result[m]["probe"] = compute_metrics(probe[m], sum(o.latency for o in probe[m]))
            result[m]["_probe"] = probe[m]
    return result


def median_paired_difference(a_s: list[float], b_s: list[float], n: int = 2000) -> list[float]:
    """[estimate, 2.5%, 97.5%] in ms of the median of a[i] - b[i] (seconds in), bootstrapped over pairs."""
    d, rng = (np.asarray(a_s) - np.asarray(b_s)) * 1e3, np.random.default_rng(0)
    boot = np.median(d[rng.integers(0, len(d), (n, len(d)))], axis=1)
    return [float(np.median(d)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def p50_difference(a_rounds: list[list[float]], b_rounds: list[list[float]], n: int = 2000) -> list[float]:
    """[estimate, 2.5%, 97.5%] in ms of p50(a) - p50(b) over all rounds (seconds in, one list per round). The
    bootstrap resamples rounds (the same ones for a and b, which ran back to back), then requests within them,
    so drift between rounds widens the interval instead of passing for a difference between modes."""
    rng = np.random.default_rng(0)
    a_r, b_r = [np.asarray(x) * 1e3 for x in a_rounds], [np.asarray(x) * 1e3 for x in b_rounds]
    boot = []
    for _ in range(n):
        picked = rng.integers(0, len(a_r), len(a_r))
        a, b = np.concatenate([a_r[i] for i in picked]), np.concatenate([b_r[i] for i in picked])
        boot.append(np.median(rng.choice(a, len(a))) - np.median(rng.choice(b, len(b))))
    est = float(np.median(np.concatenate(a_r)) - np.median(np.concatenate(b_r)))
    return [est, float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def summarize(serving: dict[str, Any], kv: dict[str, Any]) -> dict[str, Any]:
    """Ratios and balancer overheads (ms, [estimate, 95% low, 95% high]); drops the raw samples from `serving`."""
    m = {mode: rep["metrics"] for mode, rep in serving.items()}
    s: dict[str, Any] = {"pd-lb_vs_sglang_throughput": m["pd-lb"]["output_token_throughput"]
                         / m["sglang"]["output_token_throughput"]}  # fmt: skip
    for lb in ("pd-lb", "sglang"):
        for k in ("e2e", "ttft"):
            s[f"{lb}_added_p50_{k}_ms"] = p50_difference(serving[lb][f"_{k}"], serving["direct"][f"_{k}"])
            pairs = [(x, y) for x, y in zip(serving[lb]["_probe"], serving["direct"]["_probe"], strict=True)
                     if x.success and y.success]
            key = "latency" if k == "e2e" else k
            s[f"probe_{lb}_added_{k}_ms"] = median_paired_difference([getattr(x, key) for x, _ in pairs],
                                                                     [getattr(y, key) for _, y in pairs])
    # A latency target is met only if the whole 95% interval is within it, missed only if all of it is beyond.
    for name, key in (("p50_e2e", "pd-lb_added_p50_e2e_ms"), ("probe", "probe_pd-lb_added_e2e_ms")):
        est, lo, hi = s[key]
        s[f"target_lb_added_le_2ms_{name}"] = "met" if hi <= 2.0 else "missed" if lo > 2.0 else "inconclusive"
    ours, theirs = (serving[lb]["round_output_token_throughput"] for lb in ("pd-lb", "sglang"))
    s["round_pd-lb_vs_sglang_throughput"] = [a / b for a, b in zip(ours, theirs, strict=True)]
    s["target_throughput_ge_sglang"] = "met" if s["pd-lb_vs_sglang_throughput"] >= 1.0 else "missed"
    s |= {f"kv_{layout}_vs_tcp": kv[f"{layout}_vs_tcp"] for layout in ("contiguous", "shuffled")}
    for rep in serving.values():
        for key in [k for k in rep if k.startswith("_")]:
            del rep[key]
    return s


def print_table(serving: dict[str, Any], kv: dict[str, Any], s: dict[str, Any], args: argparse.Namespace) -> None:
    cols = ("req/s", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99", "failed")
    print(f"\nconcurrency {args.concurrency}, {args.rounds} x {args.num_prompts} requests per mode; latencies in ms")
    print(f"{'mode':9s}" + "".join(f"{c:>10s}" for c in cols))
    for mode, rep in serving.items():
        m = rep["metrics"]
        vals = [m["request_throughput"], m["output_token_throughput"], m["ttft_ms"]["p50"], m["ttft_ms"]["p99"],
                m["itl_ms"]["p50"], m["itl_ms"]["p99"], m["e2e_ms"]["p50"], m["e2e_ms"]["p99"], m["failed"]]
        print(f"{mode:9s}" + "".join(f"{v:10.2f}" if isinstance(v, float) else f"{v:10d}" for v in vals))

    def ci(v: list[float]) -> str:
        return f"{v[0]:+8.2f} ms [{v[1]:+.2f}, {v[2]:+.2f}]"

    rounds = " ".join(f"{x:.2f}" for x in s["round_pd-lb_vs_sglang_throughput"])
    print(f"\npd-lb / sglang-router output throughput: {s['pd-lb_vs_sglang_throughput']:.3f} (per round: {rounds}); "
          f"target >= 1: {s['target_throughput_ge_sglang']}")
    print("added latency vs direct, estimate [95% bootstrap interval]; target pd-lb <= 2 ms: "
          f"{s['target_lb_added_le_2ms_p50_e2e']} (p50 E2E), {s['target_lb_added_le_2ms_probe']} (probe)")
    for lb in ("pd-lb", "sglang"):
        print(f"  {lb:7s} p50 E2E {ci(s[f'{lb}_added_p50_e2e_ms'])}  p50 TTFT {ci(s[f'{lb}_added_p50_ttft_ms'])}")
        print(f"  {lb:7s} paired probe, concurrency 1, median E2E {ci(s[f'probe_{lb}_added_e2e_ms'])}  "
              f"TTFT {ci(s[f'probe_{lb}_added_ttft_ms'])}")
    cpu = {lb: serving[lb]["balancer_cpu_ms_per_request"] for lb in ("pd-lb", "sglang")}
    print(f"balancer CPU time per request (load-independent): pd-lb {cpu['pd-lb']:.2f} ms, "
          f"sglang-router {cpu['sglang']:.2f} ms")
    print(format_kv(kv))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=32, help="requests per mode per round (default: 32)")
    p.add_argument("--rounds", type=int, default=4, help="rounds; each runs every mode once (default: 4)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight, every mode (default: 8)")
    p.add_argument("--input-len", type=int, nargs=2, default=[64, 256], metavar=("A", "B"),
                   help="prompt tokens, uniform over [A, B] (default: 64 256)")
    p.add_argument("--output-len", type=int, nargs=2, default=[32, 64], metavar=("A", "B"),
                   help="new tokens (ignore_eos), uniform over [A, B] (default: 32 64)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed of round 0 (round r uses seed + r)")
    p.add_argument("--probe-requests", type=int, default=60,
                   help="paired probe: requests sent one at a time through direct, pd-lb and sglang (default: 60)")
    p.add_argument("--probe-output-len", type=int, default=8, help="new tokens per probe request (default: 8)")
    p.add_argument("--kv-tokens", type=int, default=4096, help="prompt length of the KV transfer test")
    p.add_argument("--kv-repeats", type=int, default=20, help="timed transfers per KV measurement")
    p.add_argument("--out", default=None, metavar="FILE", help="write the results as JSON to FILE")
    args = p.parse_args()
    meta: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
                            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
                            "torch": torch.__version__, "uptime_before": uptime()}  # fmt: skip
    print("KV transfer ...", flush=True)
    kv = bench_kv(MODEL["num_hidden_layers"], MODEL["num_key_value_heads"], MODEL["head_dim"], args.kv_tokens,
                  16, args.kv_repeats)
    with tempfile.TemporaryDirectory() as model:
        make_checkpoint(model)
        url, bootstrap_port, procs = start_stack(model)
        try:
            lb_pids = {p.name: p.popen.pid for p in procs if p.name in ("pd-lb", "sglang")}
            serving = asyncio.run(bench_serving(args, url, bootstrap_port, lb_pids))
        except BaseException:
            for proc in procs:
                print(f"----- {proc.name} -----\n{proc.log()[-2000:]}", file=sys.stderr)
            raise
        finally:
            meta["uptime_after"] = uptime()
            for proc in procs:
                proc.popen.terminate()
            for proc in procs:
                proc.popen.wait(30)
                os.unlink(proc.log_path)
    summary = summarize(serving, kv)
    print_table(serving, kv, summary, args)
    config = {k: v for k, v in vars(args).items() if k != "out"} | {"model": MODEL, "dtype": "float32"}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "config": config, "summary": summary, "serving": serving, "kv_transfer": kv},
                      f, indent=2)
            f.write("\n")
    return 0 if all(rep["metrics"]["failed"] == 0 for rep in serving.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
