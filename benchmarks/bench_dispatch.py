"""Expert-parallel dispatch + combine: our ``torch`` dispatcher (normal; low_latency eager and replayed in a CUDA
graph, over its automatic transport (symmetric memory on one CUDA host) and over NCCL) against DeepEP normal mode
(through our ``deepep`` backend) and a raw ``all_to_all_single`` moving the same bytes, all measured in the same run.

Per size, every rank holds T tokens of hidden H and routes each to K of E experts, uniformly without replacement,
drawn fresh every iteration from a seeded generator (every backend sees the same sequence). EP = number of ranks,
experts placed contiguously. Between dispatch and combine each rank runs a stand-in expert, untimed:
y = x * sum over its local slots of w_k * s_e, with a fixed random scale s_e per expert. An iteration: synchronise,
barrier, then CUDA events (perf_counter on CPU, where gloo is synchronous) around dispatch; the expert; synchronise,
barrier again (the expert ends at different times on different ranks), then events around combine.
An iteration's time is the slowest rank's; the tables show the median over iterations. Timed iterations run
round-robin over the backends (one of each in turn), so drift during the run reaches all of them alike.

Back to back ("per layer" column): the barrier before each timed call above also charges a call with the ranks'
host skew after it (the first rank to leave the barrier waits for the last inside the call). A forward runs its
MoE layers one after another, each layer's collectives keeping the ranks in step, so the second measure times
--layers dispatch + combine pairs back to back (the combine input is the received rows themselves: no expert)
and divides by --layers: eagerly for the eager backends, as one CUDA graph of all the pairs for the graph ones
(a decode forward is one graph). The slowest rank's time, median over --layer-reps repetitions.

raw_all_to_all: what a deduplicating dispatcher must move, and nothing else: each token once to every distinct
rank owning one of its experts (itself included), H elements per row, then the same rows back. Counts are
exchanged untimed. It is the floor for the collectives our torch dispatcher is built on.

Correctness: the first and the last warm-up iteration of every backend compare the combined output with the
single-process reference x * sum_k w_k * s_{e_k}. All terms share the sign of x, so the bf16 error is a relative
one: each rank's partial is rounded once and the home rank adds at most EP of them, so (EP + 2) * 2^-8 (bf16's unit
roundoff) bounds it. A backend over the bound prints FAIL and fails the targets, so a fast but wrong dispatcher
cannot pass.

Usage (one process per GPU, NCCL):
    python benchmarks/bench_dispatch.py [--ep N] [--tokens 128 1024 4096] [--out result.json]
CPU smoke check (gloo; DeepEP and CUDA graphs are skipped with the reason printed):
    python benchmarks/bench_dispatch.py --device cpu --ep 2 --tokens 16 --hidden 64 --experts 8 --topk 2 --iters 2
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import shlex
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from pd.moe.context import MoeContext  # noqa: E402
from pd.moe.dispatcher import get_dispatcher  # noqa: E402
from pd.moe.dispatcher.base import CombineInput, Dispatcher, DispatchFormat, DispatchOutput  # noqa: E402
from pd.moe.dispatcher.deepep import make_deepep_buffer  # noqa: E402 - imports deep_ep only when called
from pd.moe.dispatcher.routing import owner_rank, token_rank_mask  # noqa: E402
from pd.moe.topk import TopKOutput  # noqa: E402

DTYPE = torch.bfloat16
TARGET_NORMAL_VS_DEEPEP = 1.5
TARGET_LL_TOKENS, TARGET_LL_US = 128, 150.0


# ---- one backend = prepare (untimed) / dispatch (timed) / expert (untimed) / combine (timed) -------------------


def expert_output(out: DispatchOutput, scales_E: torch.Tensor, first_expert: int) -> CombineInput:
    """The stand-in expert: each received row times the sum of its local slots' weight * expert scale (batched
    format: each expert's rows times its scale, unweighted; combine applies the weights)."""
    if out.format == DispatchFormat.BATCHED:
        scale_E = scales_E[first_expert : first_expert + out.hidden_states.shape[0]]
        y_EMH = out.hidden_states.float() * scale_E[:, None, None]
        return CombineInput(y_EMH.to(out.hidden_states.dtype), out.handle)
    ids_NK = out.topk_ids
    scale_NK = torch.where(ids_NK >= 0, scales_E[ids_NK.clamp(min=0) + first_expert], 0.0) * out.topk_weights
    y_NH = out.hidden_states.float() * scale_NK.sum(dim=-1, keepdim=True)
    return CombineInput(y_NH.to(out.hidden_states.dtype), out.handle)


def _no_expert(out: DispatchOutput) -> CombineInput:
    """The back-to-back measure's combine input: the received rows themselves."""
    return CombineInput(out.hidden_states, out.handle)


class DispatcherCase:
    """A pd Dispatcher run eagerly."""

    def __init__(self, dispatcher: Dispatcher, expert: Callable[[DispatchOutput], CombineInput]) -> None:
        self.dispatcher, self.expert = dispatcher, expert

    def prepare(self, x_TH: torch.Tensor, topk: TopKOutput) -> None:
        self.x_TH, self.topk = x_TH, topk

    def dispatch(self) -> DispatchOutput:
        return self.dispatcher.dispatch(self.x_TH, self.topk)

    def combine(self, combine_input: CombineInput) -> torch.Tensor:
        return self.dispatcher.combine(combine_input)

    def layers(self, count: int) -> None:
        for _ in range(count):
            self.dispatcher.combine(_no_expert(self.dispatcher.dispatch(self.x_TH, self.topk)))


class GraphCase:
    """A static-shape dispatcher captured as two CUDA graphs (dispatch; combine) and replayed. Routing is copied
    into the captured input tensors before each replay, the expert's output into the captured combine input."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        expert: Callable[[DispatchOutput], CombineInput],
        x_TH: torch.Tensor,
        topk: TopKOutput,
    ) -> None:
        self.x_TH = x_TH
        self.topk = TopKOutput(topk.topk_ids.clone(), topk.topk_weights.clone(), None)
        self.dispatcher, self.expert_fn = dispatcher, expert
        self.layers_graph: tuple[int, torch.cuda.CUDAGraph] | None = None
        self.dispatch_graph, self.combine_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # thread_local: ProcessGroupNCCL's watchdog thread queries CUDA events while we capture.
        with torch.cuda.graph(self.dispatch_graph, capture_error_mode="thread_local"):
            self.out = dispatcher.dispatch(self.x_TH, self.topk)
        self.y = expert(self.out)
        with torch.cuda.graph(self.combine_graph, capture_error_mode="thread_local"):
            self.combined = dispatcher.combine(self.y)

    def prepare(self, x_TH: torch.Tensor, topk: TopKOutput) -> None:
        assert x_TH is self.x_TH, "the graph was captured on another hidden tensor"
        self.topk.topk_ids.copy_(topk.topk_ids)
        self.topk.topk_weights.copy_(topk.topk_weights)

    def dispatch(self) -> DispatchOutput:
        self.dispatch_graph.replay()
        return self.out

    def expert(self, out: DispatchOutput) -> CombineInput:
        self.y.hidden_states.copy_(self.expert_fn(out).hidden_states)
        return self.y

    def combine(self, combine_input: CombineInput) -> torch.Tensor:
        self.combine_graph.replay()
        return self.combined

    def layers(self, count: int) -> None:
        """``count`` dispatch + combine pairs captured as one graph (on first use), replayed."""
        if self.layers_graph is None or self.layers_graph[0] != count:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                for _ in range(count):
                    self.dispatcher.combine(_no_expert(self.dispatcher.dispatch(self.x_TH, self.topk)))
            self.layers_graph = (count, graph)
        self.layers_graph[1].replay()


class RawCase:
    """all_to_all_single of the rows a deduplicating dispatcher moves (see the module docstring); no check."""

    def __init__(self, group: dist.ProcessGroup, num_local_experts: int) -> None:
        self.group, self.num_local_experts = group, num_local_experts

    def prepare(self, x_TH: torch.Tensor, topk: TopKOutput) -> None:
        ranks = dist.get_world_size(self.group)
        sent_TR = token_rank_mask(owner_rank(topk.topk_ids, self.num_local_experts), ranks)
        send_R = sent_TR.sum(dim=0)
        recv_R = torch.empty_like(send_R)
        dist.all_to_all_single(recv_R, send_R, group=self.group)
        self.send_splits, self.recv_splits = send_R.tolist(), recv_R.tolist()
        self.send = x_TH.new_empty(sum(self.send_splits), x_TH.shape[1])
        self.recv = x_TH.new_empty(sum(self.recv_splits), x_TH.shape[1])
        self.back = torch.empty_like(self.send)

    def dispatch(self) -> torch.Tensor:
        dist.all_to_all_single(self.recv, self.send, self.recv_splits, self.send_splits, group=self.group)
        return self.recv

    def expert(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        dist.all_to_all_single(self.back, rows, self.send_splits, self.recv_splits, group=self.group)
        return self.back

    def layers(self, count: int) -> None:
        for _ in range(count):
            self.combine(self.dispatch())


# ---- timing ------------------------------------------------------------------------------------------------------


class Clock:
    """Timestamps on the device timeline: CUDA events on GPU; perf_counter on CPU, where every op is synchronous."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def stamp(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def us(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) * 1e3 if self.cuda else (end - start) * 1e6


def make_draw(seed: int, tokens: int, experts: int, top_k: int, device: torch.device) -> Callable[[], TopKOutput]:
    """Routing source: uniform top-k without replacement (top-k of uniform scores) and uniform weights in [0, 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw() -> TopKOutput:
        ids = torch.rand(tokens, experts, generator=gen, device=device).topk(top_k, dim=-1).indices
        weights = torch.rand(tokens, top_k, generator=gen, device=device)
        return TopKOutput(ids, weights, None)

    return draw


def reference_error(combined: torch.Tensor, x_TH: torch.Tensor, topk: TopKOutput, scales_E: torch.Tensor) -> float:
    """Largest relative error of ``combined`` against x * sum_k w_k * s_{e_k}, computed here in float32."""
    ref_TH = x_TH.float() * (topk.topk_weights * scales_E[topk.topk_ids]).sum(dim=-1, keepdim=True)
    return ((combined.float() - ref_TH).abs() / (ref_TH.abs() + 1e-30)).max().item()


def run_iteration(case: Any, x_TH: torch.Tensor, topk: TopKOutput, clock: Clock) -> tuple[float, float, Any]:
    """One timed iteration: (dispatch us, combine us, combined output) on this rank."""
    case.prepare(x_TH, topk)
    clock.sync()
    dist.barrier()
    t0 = clock.stamp()
    out = case.dispatch()
    t1 = clock.stamp()
    combine_input = case.expert(out)
    clock.sync()  # the untimed expert step ends at different times on different ranks: align again, as for
    dist.barrier()  # dispatch, so that skew is not charged to combine
    t2 = clock.stamp()
    combined = case.combine(combine_input)
    t3 = clock.stamp()
    clock.sync()
    return clock.us(t0, t1), clock.us(t2, t3), combined


def back_to_back(case: Any, x_TH: torch.Tensor, topk: TopKOutput, clock: Clock, layers: int) -> float:
    """This rank's time per dispatch + combine pair when ``layers`` pairs run back to back (see the docstring)."""
    case.prepare(x_TH, topk)
    case.layers(layers)  # untimed: graph cases capture here
    clock.sync()
    dist.barrier()
    start = clock.stamp()
    case.layers(layers)
    end = clock.stamp()
    clock.sync()
    return clock.us(start, end) / layers


def warm_up(
    case: Any, x_TH: torch.Tensor, draw: Callable[[], TopKOutput], clock: Clock, warmup: int,
    scales_E: torch.Tensor | None,
) -> float | None:  # fmt: skip
    """``warmup`` untimed iterations; the larger reference error of the first and the last (None without scales,
    i.e. no check): a first call may take another path than the ones after it (set-up, graph capture)."""
    errors = []
    for i in range(warmup):
        topk = draw()
        *_, combined = run_iteration(case, x_TH, topk, clock)
        if i in (0, warmup - 1) and scales_E is not None:
            errors.append(reference_error(combined, x_TH, topk, scales_E))
    return max(errors) if errors else None


def summarize(per_rank: list[list[tuple[float, float]]], per_rank_layer: list[list[float]]) -> dict[str, float]:
    """Medians over iterations of the slowest rank's dispatch, combine and dispatch + combine, and over the
    back-to-back repetitions of the slowest rank's time per layer."""
    dispatch, combine, total = [], [], []
    for samples in zip(*per_rank, strict=True):
        dispatch.append(max(d for d, _ in samples))
        combine.append(max(c for _, c in samples))
        total.append(max(d + c for d, c in samples))
    return {
        "dispatch_us": statistics.median(dispatch),
        "combine_us": statistics.median(combine),
        "total_us": statistics.median(total),
        "layer_us": statistics.median(max(samples) for samples in zip(*per_rank_layer, strict=True)),
    }


# ---- per-rank driver ---------------------------------------------------------------------------------------------


def _deepep_buffer(args: argparse.Namespace, group: dist.ProcessGroup) -> tuple[Any, str | None]:
    """(DeepEP normal-mode buffer, None), or (None, why DeepEP is skipped). The same answer on every rank."""
    if args.device != "cuda":
        return None, "deep_ep needs CUDA (--device cpu)"
    try:
        buffer = make_deepep_buffer(
            group,
            mode="normal",
            hidden_size=args.hidden,
            num_experts=args.experts,
            max_tokens_per_rank=max(args.tokens),
            explicitly_destroy=True,
        )
    except Exception as exc:  # noqa: BLE001 - report why and measure the rest (a failure on all ranks alike)
        return None, f"deep_ep unusable here: {exc!r}"
    return buffer, None


def _worker(rank: int, args: argparse.Namespace, port: int, command: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group(
        "nccl" if cuda else "gloo", rank=rank, world_size=args.ep, device_id=device if cuda else None
    )
    try:
        _run(rank, args, device, command)
    finally:
        dist.destroy_process_group()


def _run(rank: int, args: argparse.Namespace, device: torch.device, command: str) -> None:
    group = dist.group.WORLD
    assert group is not None
    ep, clock = args.ep, Clock(device.type == "cuda")
    ctx = MoeContext(ep_rank=rank, ep_size=ep, group=group)
    num_local = ctx.num_local(args.experts)
    first_expert = rank * num_local
    # The same per-expert scales on every rank, in [0.5, 1.5): a slot credited to the wrong expert moves its token by
    # w * |s - s'| (1/3 * w on average) against a sum of K such terms, far above the bf16 bound for some tokens.
    scales_E = 0.5 + torch.rand(args.experts, generator=torch.Generator().manual_seed(args.seed)).to(device)

    def expert(out: DispatchOutput) -> CombineInput:
        return expert_output(out, scales_E, first_expert)

    skipped: dict[str, str] = {}
    buffer, reason = _deepep_buffer(args, group)
    if reason:
        skipped["deepep_normal"] = reason
    if device.type != "cuda":
        skipped["torch_low_latency_graph"] = "CUDA graphs need --device cuda"

    results: list[dict[str, Any]] = []
    for size_index, tokens in enumerate(args.tokens):
        x_TH = torch.randn(
            tokens, args.hidden, generator=torch.Generator(device=device).manual_seed(args.seed + rank), device=device
        ).to(DTYPE)
        seed = args.seed * 7919 + size_index * 1009 + rank  # one routing sequence per (size, rank), every backend

        def draw_fn(seed: int = seed, tokens: int = tokens) -> Callable[[], TopKOutput]:
            """A fresh routing source; the same default seed gives every backend the same routings."""
            return make_draw(seed, tokens, args.experts, args.topk, device)

        cases: list[tuple[str, Any, bool]] = [("raw_all_to_all", RawCase(group, num_local), False)]
        if buffer is not None:
            deepep = get_dispatcher("deepep", ctx, num_experts=args.experts, mode="normal", buffer=buffer)
            cases.append(("deepep_normal", DispatcherCase(deepep, expert), True))
        normal = get_dispatcher("torch", ctx, num_experts=args.experts, mode="normal")
        # low_latency over its automatic transport (symmetric memory on one CUDA host) and over NCCL all-to-all
        low_latency = {
            name: get_dispatcher(
                "torch", ctx, num_experts=args.experts, mode="low_latency", max_tokens_per_rank=tokens,
                transport=transport,
            )
            for name, transport in (("torch_low_latency", "auto"), ("torch_low_latency_nccl", "nccl"))
        }  # fmt: skip
        cases.append(("torch_normal", DispatcherCase(normal, expert), True))
        cases += [(name, DispatcherCase(d, expert), True) for name, d in low_latency.items()]

        draws = {name: draw_fn() for name, _, _ in cases}  # the same routing sequence for every backend
        errors = {
            name: warm_up(case, x_TH, draws[name], clock, args.warmup, scales_E if checked else None)
            for name, case, checked in cases
        }

        # After the eager low_latency runs, so NCCL and the allocator are warm (and the transport is set up), as
        # capture requires (CUDA only; the CPU reason is in ``skipped`` already).
        for name, dispatcher in (low_latency if device.type == "cuda" else {}).items():
            graph_name = f"{name}_graph"
            graph, failure = None, ""
            try:
                graph = GraphCase(dispatcher, expert, x_TH, draw_fn(seed + 1)())
            except Exception as exc:  # noqa: BLE001 - any capture failure is reported, not fatal
                failure = f"capture failed on rank {rank}: {exc!r}"
            failures: list[str] = [""] * ep
            dist.all_gather_object(failures, failure)
            if any(failures):
                skipped[graph_name] = next(f for f in failures if f)
                continue
            cases.append((graph_name, graph, True))
            draws[graph_name] = draw_fn()
            errors[graph_name] = warm_up(graph, x_TH, draws[graph_name], clock, args.warmup, scales_E)

        # Timed iterations round-robin over the backends, so drift in clocks or load during the run reaches every
        # backend alike instead of whichever ran last.
        times: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
        for _ in range(args.iters):
            for name, case, _ in cases:
                dispatch_us, combine_us, _ = run_iteration(case, x_TH, draws[name](), clock)
                times[name].append((dispatch_us, combine_us))
        layer_times: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        for _ in range(args.layer_reps):
            for name, case, _ in cases:
                layer_times[name].append(back_to_back(case, x_TH, draws[name](), clock, args.layers))
        for name, _, _ in cases:
            results.append({"tokens_per_rank": tokens, "backend": name, "times": times[name],
                            "layer_times": layer_times[name], "error": errors[name]})  # fmt: skip
        del cases, draws
        del x_TH
        if device.type == "cuda":
            torch.cuda.empty_cache()

    gathered: list[Any] = [None] * ep
    dist.all_gather_object(gathered, results)
    if buffer is not None:
        buffer.destroy()
    dist.barrier()
    if rank == 0:
        _report(args, gathered, skipped, device, command)


# ---- report (rank 0) ---------------------------------------------------------------------------------------------


def _versions(device: torch.device) -> dict[str, Any]:
    nccl: Any = None
    if device.type == "cuda":
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    deep_ep = None
    for dist_name in ("tokenspeed-deepep", "deep_ep", "deep-ep"):
        try:
            deep_ep = f"{dist_name} {importlib.metadata.version(dist_name)}"
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"torch": torch.__version__, "nccl": nccl, "deep_ep": deep_ep}


def _rows(args: argparse.Namespace, gathered: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (size, backend): medians over the slowest rank, worst error over ranks, ratios."""
    rows = []
    bound = (args.ep + 2) * 2.0**-8
    for i, first in enumerate(gathered[0]):
        entries = [per_rank[i] for per_rank in gathered]
        errors = [e["error"] for e in entries]
        row: dict[str, Any] = {"tokens_per_rank": first["tokens_per_rank"], "backend": first["backend"]}
        row.update(summarize([e["times"] for e in entries], [e["layer_times"] for e in entries]))
        row["max_rel_err"] = None if errors[0] is None else max(errors)
        row["check"] = "n/a" if errors[0] is None else ("ok" if max(errors) <= bound else "FAIL")
        rows.append(row)
    for row in rows:
        peers = {r["backend"]: r for r in rows if r["tokens_per_rank"] == row["tokens_per_rank"]}
        for key, peer in (("vs_deepep", "deepep_normal"), ("vs_raw", "raw_all_to_all")):
            row[key] = row["total_us"] / peers[peer]["total_us"] if peer in peers else None
            row[f"layer_{key}"] = row["layer_us"] / peers[peer]["layer_us"] if peer in peers else None
    return rows


MEASURES = (("total_us", "single call"), ("layer_us", "back to back"))


def _targets(args: argparse.Namespace, rows: list[dict[str, Any]], skipped: dict[str, str]) -> list[dict[str, Any]]:
    """Each target judged on both measures (see the module docstring), one entry per measure."""

    def find(tokens: int, backend: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["tokens_per_rank"] == tokens and r["backend"] == backend), None)

    targets = []
    for key, measure in MEASURES:
        for tokens in args.tokens:
            name = f"torch normal within {TARGET_NORMAL_VS_DEEPEP}x of DeepEP normal at {tokens} tokens/rank, {measure}"
            ours, ref = find(tokens, "torch_normal"), find(tokens, "deepep_normal")
            if ours is None or ref is None:
                passed, detail = None, f"not measured: {skipped.get('deepep_normal', 'no DeepEP row')}"
            else:
                ratio = ours[key] / ref[key]
                wrong = [r["backend"] for r in (ours, ref) if r["check"] != "ok"]
                passed = ratio <= TARGET_NORMAL_VS_DEEPEP and not wrong
                detail = f"{ratio:.2f}x ({ours[key]:.1f} vs {ref[key]:.1f} us)"
                detail += f"; wrong results: {', '.join(wrong)}" if wrong else ""
            targets.append({"name": name, "passed": passed, "detail": detail})

        name = f"low_latency dispatch+combine at {TARGET_LL_TOKENS} tokens/rank < {TARGET_LL_US:.0f} us, {measure}"
        eager, graph = find(TARGET_LL_TOKENS, "torch_low_latency"), find(TARGET_LL_TOKENS, "torch_low_latency_graph")
        if eager is None:
            passed, detail = None, f"not measured: {TARGET_LL_TOKENS} is not in --tokens"
        else:
            # Decode replays its forward in a CUDA graph, so the graph time is the one the target is about.
            judged = graph if graph is not None else eager
            passed = judged[key] < TARGET_LL_US and judged["check"] == "ok"
            parts = [f"eager {eager[key]:.1f} us ({eager['check']})"]
            if graph is not None:
                parts.insert(0, f"graph {graph[key]:.1f} us ({graph['check']})")
            else:
                parts.append(f"no graph: {skipped.get('torch_low_latency_graph', '?')}")
            detail = "; ".join(parts)
        targets.append({"name": name, "passed": passed, "detail": detail})
    return targets


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _report(
    args: argparse.Namespace,
    gathered: list[list[dict[str, Any]]],
    skipped: dict[str, str],
    device: torch.device,
    command: str,
) -> None:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    raw_name = f"raw_all_to_all ({'nccl' if device.type == 'cuda' else 'gloo'})"
    rows = _rows(args, gathered)
    for tokens in args.tokens:
        print(
            f"\n== {tokens} tokens/rank, hidden {args.hidden}, top-{args.topk} of {args.experts} experts, "
            f"EP={args.ep}, bf16, {card}; median of {args.iters} single calls and of {args.layer_reps} x "
            f"{args.layers} back-to-back layers, slowest rank =="
        )
        print(f"{'backend':<30}{'dispatch us':>12}{'combine us':>12}{'total us':>11}{'/DeepEP':>9}{'/raw':>7}"
              f"{'per layer us':>14}{'/DeepEP':>9}{'/raw':>7}  check")  # fmt: skip
        for r in (r for r in rows if r["tokens_per_rank"] == tokens):
            name = raw_name if r["backend"] == "raw_all_to_all" else r["backend"]
            print(
                f"{name:<30}{r['dispatch_us']:>12.1f}{r['combine_us']:>12.1f}{r['total_us']:>11.1f}"
                f"{_fmt(r['vs_deepep'], '.2f'):>9}{_fmt(r['vs_raw'], '.2f'):>7}{r['layer_us']:>14.1f}"
                f"{_fmt(r['layer_vs_deepep'], '.2f'):>9}{_fmt(r['layer_vs_raw'], '.2f'):>7}  {r['check']}"
                + (f" (max rel err {r['max_rel_err']:.1e})" if r["max_rel_err"] is not None else "")
            )
    for backend, reason in skipped.items():
        print(f"skipped {backend}: {reason}")
    targets = _targets(args, rows, skipped)
    print()
    for t in targets:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["passed"]]
        print(f"TARGET {t['name']}: {verdict} ({t['detail']})")
    if args.out:
        result = {
            "card": card,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "versions": _versions(device),
            "dist_backend": "nccl" if device.type == "cuda" else "gloo",
            "config": {k: v for k, v in vars(args).items() if k != "out"} | {"dtype": "bfloat16"},
            "rows": rows,
            "skipped": skipped,
            "targets": targets,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--ep", type=int, default=None, help="ranks; default: every visible GPU (2 on CPU)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 1024, 4096], help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--layers", type=int, default=16, help="back-to-back dispatch + combine pairs per sample")
    parser.add_argument("--layer-reps", type=int, default=10, help="samples of the back-to-back measure")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations first (the first one is checked)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.ep is None:
        args.ep = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.device == "cuda" and args.ep > torch.cuda.device_count():
        parser.error(f"--ep {args.ep} needs {args.ep} GPUs, {torch.cuda.device_count()} visible")
    if args.ep < 2:
        parser.error("--ep must be >= 2 (dispatch between ranks is what is measured)")
    if args.experts % args.ep or args.topk > args.experts:
        parser.error("--ep must divide --experts, and --topk must not exceed it")
    if args.layers < 1 or args.layer_reps < 1:
        parser.error("--layers and --layer-reps must be >= 1")
    if args.warmup < 1 or args.iters < 1:
        parser.error("--warmup and --iters must be >= 1 (warm-up iterations are the correctness check)")
    command = shlex.join([os.path.basename(sys.executable), *sys.argv])
    mp.spawn(_worker, args=(args, _free_port(), command), nprocs=args.ep, join=True)


if __name__ == "__main__":
    main()
