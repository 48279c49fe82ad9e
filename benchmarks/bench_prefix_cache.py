"""Prefix-cache benchmark on a multi-turn chat workload (each turn resends the conversation so far), one run:

  (a) cache     one unified `pd serve` with its prefix cache against one with --disable-radix-cache:
                TTFT p50 and throughput
  (b) routing   `pd lb --worker-urls A B --policy cache_aware` against `--policy round_robin` over the same two
                unified instances (prefix cache on): prefix-cache hit rate and TTFT p50

The workload is `pd bench`'s multi-turn dataset through its chat client, runner and report: --num-conversations
conversations of --num-turns user turns, starting as a Poisson process of --conversation-rate per second (so they
do not run in lockstep, where round robin would keep each conversation on one instance by accident), each turn
sent when the previous answer is complete. Later turns share most of their tokens with earlier ones ((T-1)/(T+1)
of all prompt tokens for T equal turns). The modes of a comparison take turns in --rounds rounds (order rotated,
fresh conversations per round), so load drift on a shared machine falls on both alike; every mode starts with the
instances' caches flushed, and (b) starts a fresh balancer per run, so its trees and the caches start empty
together.

Checks, run before anything is written (the JSON lists them under "checks"): every request succeeded; the cache-off
instance served no cached token; per run, the prompt and cached tokens the responses report equal the deltas of the
instances' own counters (/get_server_info), so the hit rates are the engines' figures; in (b) both instances got
requests under both policies. Acceptance (printed, not asserted): (a) TTFT p50 >= 3x lower and throughput >= 1.5x
higher with the cache; (b) cache_aware above round_robin in hit rate and below it in TTFT p50.

Usage: python benchmarks/bench_prefix_cache.py [--out benchmarks/results/prefix_cache_cpu.json] (see --help)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pd.bench.client import BenchClient, RequestOutput  # noqa: E402
from pd.bench.conversations import Conversation, converse, multi_turn_conversations  # noqa: E402
from pd.bench.report import compute_metrics  # noqa: E402
from pd.bench.runner import Job, run_jobs  # noqa: E402
from tests.pd_cluster import Proc, serve_argv, start_proc, wait_healthy  # noqa: E402
from tests.server_process import free_port  # noqa: E402

HOST = "127.0.0.1"


@dataclass
class Run:
    """One mode's run: what the client measured and what the instances counted meanwhile."""

    outputs: list[RequestOutput]
    duration_s: float
    prompt_tokens: int  # sum of the instances' prompt_tokens_total deltas
    cached_tokens: int  # ... and of their cached_tokens_total deltas
    per_instance_prompt: list[int]


def _counters(urls: list[str]) -> list[tuple[int, int]]:
    """(prompt_tokens_total, cached_tokens_total) of each idle instance (its stats are final once it is idle)."""
    out = []
    for url in urls:
        deadline = time.monotonic() + 30
        while (info := httpx.get(url + "/get_server_info", timeout=30).json())["num_running"] + info["num_waiting"]:
            assert time.monotonic() < deadline, f"{url} did not go idle"
            time.sleep(0.05)
        out.append((int(info["prompt_tokens_total"]), int(info["cached_tokens_total"])))
    return out


def _flush(urls: list[str]) -> None:
    for url in urls:
        r = httpx.post(url + "/flush_cache", timeout=60)
        assert r.status_code == 200, f"POST {url}/flush_cache answered {r.status_code}: {r.text[:200]}"


async def _converse_all(url: str, conversations: list[Conversation], rate: float) -> tuple[list[RequestOutput],
                                                                                          float]:  # fmt: skip
    jobs: list[Job] = [lambda send, c=c: converse(c, send) for c in conversations]
    n = sum(len(c.user_turns) for c in conversations)
    async with BenchClient(url, "chat", timeout_s=3600.0, max_connections=len(conversations)) as client:
        result = await run_jobs(client, jobs, n, request_rate=rate)
    return result.outputs, result.duration_s


def run_mode(front: str, instances: list[str], conversations: list[Conversation], rate: float = math.inf) -> Run:
    """Flush the instances' caches, send every conversation through `front` (starting `rate` per second, Poisson),
    and count what the instances did."""
    _flush(instances)
    before = _counters(instances)
    outputs, duration = asyncio.run(_converse_all(front, conversations, rate))
    after = _counters(instances)
    deltas = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]
    return Run(outputs, duration, sum(d[0] for d in deltas), sum(d[1] for d in deltas), [d[0] for d in deltas])


def check_run(name: str, run: Run, checks: list[str]) -> None:
    """The run's own consistency checks; each one passed is appended to `checks`."""
    failed = [o.error for o in run.outputs if not o.success]
    assert not failed, f"{name}: {len(failed)} requests failed, the first: {failed[0]}"
    checks.append(f"{name}: all {len(run.outputs)} requests succeeded")
    got_prompt = sum(o.prompt_len for o in run.outputs)
    got_cached = sum(o.cached_tokens for o in run.outputs)
    assert (got_prompt, got_cached) == (run.prompt_tokens, run.cached_tokens), (
        f"{name}: responses report {got_prompt} prompt / {got_cached} cached tokens, the instances counted "
        f"{run.prompt_tokens} / {run.cached_tokens}"
    )
    checks.append(f"{name}: responses' prompt and cached tokens equal the instances' counters")


def pooled(runs: list[Run]) -> dict[str, Any]:
    """Metrics over every run of one mode: latencies pooled, throughput over the summed durations; and the same per
    round (how much the machine's load moved them)."""
    summary = _summary([o for r in runs for o in r.outputs], sum(r.duration_s for r in runs))
    keep = ("duration_s", "cache_hit_rate", "ttft_p50_ms", "ttft_mean_ms", "total_token_throughput")
    summary["per_round"] = [
        {**{k: v for k, v in _summary(r.outputs, r.duration_s).items() if k in keep},
         "instance_prompt_share": [n / max(1, sum(r.per_instance_prompt)) for n in r.per_instance_prompt]}
        for r in runs
    ]  # fmt: skip
    return summary


def _summary(outputs: list[RequestOutput], duration_s: float) -> dict[str, Any]:
    m = compute_metrics(outputs, duration_s)
    return {
        "requests": m["completed"],
        "duration_s": m["duration_s"],
        "prompt_tokens": m["total_input_tokens"],
        "cached_tokens": m["total_cached_tokens"],
        "cache_hit_rate": m["cache_hit_rate"],
        "ttft_p50_ms": m["ttft_ms"]["p50"],
        "ttft_mean_ms": m["ttft_ms"]["mean"],
        "ttft_p90_ms": m["ttft_ms"]["p90"],
        "e2e_p50_ms": m["e2e_ms"]["p50"],
        "request_throughput": m["request_throughput"],
        "total_token_throughput": m["total_token_throughput"],
    }


def alternate(
    modes: dict[str, Callable[[list[Conversation]], Run]], rounds: int, workload: Callable[[int], list[Conversation]]
) -> dict[str, list[Run]]:
    """Each round: fresh conversations, every mode once, in an order rotated per round."""
    names = list(modes)
    runs: dict[str, list[Run]] = {name: [] for name in modes}
    for r in range(rounds):
        conversations = workload(r)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            runs[name].append(modes[name](conversations))
            print(f"  round {r + 1}/{rounds} {name}: {time.perf_counter() - t:.1f} s", flush=True)
    return runs


@contextmanager
def processes(procs: list[Proc], timeout: float = 600.0) -> Iterator[list[Proc]]:
    try:
        wait_healthy(procs, timeout)
        yield procs
    finally:
        for p in procs:
            p.popen.terminate()
        for p in procs:
            try:
                p.popen.wait(30)
            except Exception:
                p.kill()


def start_instances(model_path: str, extra: list[list[str]], serve_args: list[str]) -> list[Proc]:
    """One `pd serve` per entry of extra (its own flags). serve_args: flags for every instance instead of the CPU
    defaults (--device cpu --dtype float32), e.g. ``--device cuda --mem-fraction-static 0.4``."""
    procs = []
    for i, flags in enumerate(extra):
        port = free_port()
        argv = (serve_argv(model_path, port, "--host", HOST, *flags) if not serve_args else
                [sys.executable, "-m", "pd", "serve", "--model-path", model_path, "--port", str(port), "--host", HOST,
                 *serve_args, *flags])  # fmt: skip
        procs.append(start_proc(f"serve-{i}", argv, f"http://{HOST}:{port}"))
    return procs


def start_lb(policy: str, workers: list[str]) -> Proc:
    port = free_port()
    argv = [sys.executable, "-m", "pd", "lb", "--host", HOST, "--port", str(port), "--worker-urls", *workers,
            "--policy", policy, "--log-level", "warning"]  # fmt: skip
    return start_proc(f"lb-{policy}", argv, f"http://{HOST}:{port}")


def ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else math.nan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-path", default=None, help="checkpoint to serve (default: pd's built-in default model)")
    p.add_argument("--num-conversations", type=int, default=6)
    p.add_argument("--num-turns", type=int, default=9, help="user turns per conversation (default: %(default)s)")
    p.add_argument("--turn-words", type=int, nargs=2, default=[30, 40], metavar=("A", "B"),
                   help="words per user turn, uniform over [A, B] (default: %(default)s)")  # fmt: skip
    p.add_argument("--output-len", type=int, nargs=2, default=[8, 8], metavar=("A", "B"),
                   help="tokens per answer, uniform over [A, B] (default: %(default)s)")  # fmt: skip
    p.add_argument("--conversation-rate", type=float, default=2.0,
                   help="conversations starting per second, Poisson (default: %(default)s)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="cache,routing", help="comma-separated: cache, routing (default: both)")
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="recorded in the JSON")
    p.add_argument("--machine", default=f"{os.cpu_count()}-core CPU", help="recorded in the JSON")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--serve-args", default="",
                   help="flags for every `pd serve` instead of --device cpu --dtype float32, e.g. '--device cuda "
                        "--mem-fraction-static 0.4' (two instances share one GPU in the routing part)")  # fmt: skip
    a = p.parse_args()
    serve_args = shlex.split(a.serve_args)
    parts = set(a.parts.split(","))
    assert parts <= {"cache", "routing"}, f"--parts takes cache and/or routing, got {a.parts!r}"
    model_path = a.model_path
    if model_path is None:
        from pd.default_model import build_default_model

        model_path = build_default_model()

    def workload(r: int) -> list[Conversation]:
        return multi_turn_conversations(a.num_conversations, a.num_turns, tuple(a.turn_words), tuple(a.output_len),
                                        a.seed + r)  # fmt: skip

    # One untimed conversation per instance first: the first forwards of a process pay one-off costs.
    warm = multi_turn_conversations(1, 2, (8, 8), (2, 2), a.seed + 10_000)
    result: dict[str, Any] = {
        "date": a.date,
        "machine": a.machine,
        "command": "python " + shlex.join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        # The checkpoint's name, not its path (a cache directory of this machine).
        "model": "pd's built-in default model"
        if a.model_path is None
        else os.path.basename(os.path.normpath(model_path)),
        "workload": {
            "dataset": "multi-turn (pd bench --backend chat)",
            "num_conversations": a.num_conversations,
            "num_turns": a.num_turns,
            "turn_words": a.turn_words,
            "output_len": a.output_len,
            "conversation_rate": a.conversation_rate,
            "rounds": a.rounds,
            "seed": a.seed,
        },
    }
    checks: list[str] = []

    if "cache" in parts:
        print("(a) one instance with the prefix cache vs one without", flush=True)
        with processes(start_instances(model_path, [[], ["--disable-radix-cache"]], serve_args)) as (on, off):
            for proc in (on, off):
                run_mode(proc.url, [proc.url], warm)
            runs = alternate(
                {"cache": lambda c: run_mode(on.url, [on.url], c, a.conversation_rate),
                 "no_cache": lambda c: run_mode(off.url, [off.url], c, a.conversation_rate)},
                a.rounds, workload,
            )  # fmt: skip
        for name, mode_runs in runs.items():
            for i, run in enumerate(mode_runs):
                check_run(f"(a) {name} round {i + 1}", run, checks)
        assert all(r.cached_tokens == 0 for r in runs["no_cache"]), "the cache-off instance served cached tokens"
        checks.append("(a) the instance without the cache served no cached token")
        cache, no_cache = pooled(runs["cache"]), pooled(runs["no_cache"])
        result["cache"] = {
            "cache": cache,
            "no_cache": no_cache,
            "ttft_p50_ratio_no_cache_over_cache": ratio(no_cache["ttft_p50_ms"], cache["ttft_p50_ms"]),
            "throughput_ratio_cache_over_no_cache": ratio(
                cache["total_token_throughput"], no_cache["total_token_throughput"]
            ),
        }

    if "routing" in parts:
        print("(b) pd lb cache_aware vs round_robin over two instances", flush=True)
        with processes(start_instances(model_path, [[], []], serve_args)) as instances:
            urls = [i.url for i in instances]
            for url in urls:
                run_mode(url, [url], warm)

            def through_lb(policy: str) -> Callable[[list[Conversation]], Run]:
                def run(conversations: list[Conversation]) -> Run:
                    with processes([start_lb(policy, urls)], 60) as (lb,):
                        return run_mode(lb.url, urls, conversations, a.conversation_rate)

                return run

            runs = alternate({"cache_aware": through_lb("cache_aware"), "round_robin": through_lb("round_robin")},
                             a.rounds, workload)  # fmt: skip
        for name, mode_runs in runs.items():
            for i, run in enumerate(mode_runs):
                check_run(f"(b) {name} round {i + 1}", run, checks)
                assert all(n > 0 for n in run.per_instance_prompt), f"(b) {name}: an instance got no request"
            checks.append(f"(b) {name}: both instances served requests in every round")
        ca, rr = pooled(runs["cache_aware"]), pooled(runs["round_robin"])
        result["routing"] = {
            "cache_aware": ca,
            "round_robin": rr,
            "hit_rate_ratio_cache_aware_over_round_robin": ratio(ca["cache_hit_rate"], rr["cache_hit_rate"]),
            "ttft_p50_ratio_round_robin_over_cache_aware": ratio(rr["ttft_p50_ms"], ca["ttft_p50_ms"]),
            "ttft_mean_ratio_round_robin_over_cache_aware": ratio(rr["ttft_mean_ms"], ca["ttft_mean_ms"]),
        }

    result["checks"] = checks
    result["acceptance"] = acceptance(result)
    print(format_result(result))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


def acceptance(r: dict[str, Any]) -> dict[str, bool]:
    out = {}
    if "cache" in r:
        out["(a) TTFT p50 >= 3x lower with the cache"] = r["cache"]["ttft_p50_ratio_no_cache_over_cache"] >= 3.0
        out["(a) throughput >= 1.5x higher with the cache"] = r["cache"]["throughput_ratio_cache_over_no_cache"] >= 1.5
    if "routing" in r:
        b = r["routing"]
        out["(b) cache_aware hit rate > round_robin's"] = b["cache_aware"]["cache_hit_rate"] > b["round_robin"][
            "cache_hit_rate"]  # fmt: skip
        for stat in ("p50", "mean"):
            key = f"ttft_{stat}_ms"
            out[f"(b) cache_aware TTFT {stat} < round_robin's"] = b["cache_aware"][key] < b["round_robin"][key]
    return out


def format_result(r: dict[str, Any]) -> str:
    lines = []
    cols = ("requests", "cache_hit_rate", "ttft_p50_ms", "ttft_mean_ms", "ttft_p90_ms", "e2e_p50_ms",
            "total_token_throughput")  # fmt: skip
    header = f"{'mode':<14}" + "".join(f"{c:>24}" for c in cols)
    for part, modes in (("cache", ("cache", "no_cache")), ("routing", ("cache_aware", "round_robin"))):
        if part not in r:
            continue
        lines += ["", header]
        for m in modes:
            lines.append(f"{m:<14}" + "".join(f"{r[part][m][c]:>24.3f}" for c in cols))
            for i, rnd in enumerate(r[part][m]["per_round"]):
                lines.append(f"  round {i + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in rnd.items()
                                                              if not isinstance(v, list)))  # fmt: skip
        lines += [f"  {k}: {v:.2f}" for k, v in r[part].items() if k.endswith(("ratio_no_cache_over_cache",
                  "over_no_cache", "over_round_robin", "over_cache_aware"))]  # fmt: skip
    lines += ["", "checks passed:", *(f"  {c}" for c in r["checks"]), "", "acceptance:"]
    lines += [f"  {'met' if ok else 'NOT MET'}: {k}" for k, ok in r["acceptance"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
