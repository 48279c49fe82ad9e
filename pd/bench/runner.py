"""Running a benchmark: health check, warm-up, paced sending, then the report and plots.

Pacing: with a finite request rate, the gaps between arrivals are gamma-distributed with shape `burstiness` and
mean 1 / rate (seeded; shape 1 is a Poisson process, as in vLLM's benchmark_serving), scheduled against one start
time so that slow event-loop turns do not accumulate drift. With a concurrency limit, a request that has arrived
waits for a free slot before it is sent (its TTFT counts from the send, as in SGLang's bench_serving); the limit
and the rate combine. For the multi-turn dataset the arrivals are conversations': a conversation's first turn is
released at its arrival, each later turn once the answer to the previous one is complete.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from pd.bench.args import BenchArgs
from pd.bench.client import BenchClient, BenchError, RequestOutput, check_health, fetch_vocab_size, server_profile
from pd.bench.conversations import Send, converse, multi_turn_conversations
from pd.bench.corpus import CorpusUnavailableError, corpus_name
from pd.bench.datasets import BenchRequest, make_requests
from pd.bench.report import build_report, format_table, write_json

# One arrival's work: sends one request, or the turns of one conversation, through `send`.
Job = Callable[[Send], Awaitable[list[RequestOutput]]]


@dataclass
class RunResult:
    """outputs: one per request, in input order (a conversation's turns in turn order). duration_s: first send
    to last completion. arrival_s: float64 [arrivals], when each request (or conversation) was released, seconds
    after the start, before any concurrency wait. start_time: perf_counter at the start."""

    outputs: list[RequestOutput]
    duration_s: float
    arrival_s: np.ndarray
    start_time: float


def arrival_offsets(num_requests: int, request_rate: float, seed: int, burstiness: float = 1.0) -> np.ndarray:
    """Scheduled arrival times, float64 [num_requests] in seconds from the start; the first is 0.

    A finite rate gives gamma gaps of shape `burstiness` and mean 1 / request_rate (so a coefficient of variation
    of 1 / sqrt(burstiness)) from a generator seeded by `seed` (its own stream, independent of the dataset's);
    math.inf gives all zeros.
    """
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    # numpy draws a shape-1 gamma exactly as its exponential, so a seed's Poisson schedule is the one earlier
    # versions of this benchmark drew: runs stay comparable.
    scale = 1.0 / (request_rate * burstiness)
    gaps = np.random.default_rng([seed, 1]).gamma(burstiness, scale, size=max(num_requests - 1, 0))
    return np.concatenate(([0.0], np.cumsum(gaps)))


async def _one(req: BenchRequest, send: Send) -> list[RequestOutput]:
    return [await send(req)]


async def run_jobs(
    client: BenchClient,
    jobs: list[Job],
    num_requests: int,
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    progress: bool = False,
    burstiness: float = 1.0,
) -> RunResult:
    """Release `jobs` on the arrival schedule, with at most `max_concurrency` requests in flight; wait for all.
    num_requests: how many requests the jobs send together (the progress bar's total)."""
    offsets = arrival_offsets(len(jobs), request_rate, seed, burstiness)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency is not None else None
    bar = tqdm(total=num_requests, disable=not progress, unit="req", file=sys.stderr)
    arrivals = np.zeros(len(jobs))

    async def send(req: BenchRequest) -> RequestOutput:
        if slots is None:
            out = await client.send(req)
        else:
            async with slots:
                out = await client.send(req)
        bar.update(1)
        return out

    start = time.perf_counter()
    tasks = []
    for i, (job, offset) in enumerate(zip(jobs, offsets, strict=True)):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        arrivals[i] = time.perf_counter() - start
        tasks.append(asyncio.create_task(job(send)))
    try:
        outputs = [out for outs in await asyncio.gather(*tasks) for out in outs]
    finally:
        for t in tasks:
            t.cancel()  # only matters if gather was interrupted; a finished task ignores it
        bar.close()
    return RunResult(outputs=outputs, duration_s=time.perf_counter() - start, arrival_s=arrivals, start_time=start)


async def run_requests(
    client: BenchClient,
    requests: list[BenchRequest],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    progress: bool = False,
    burstiness: float = 1.0,
) -> RunResult:
    """Send `requests` paced by `request_rate` with at most `max_concurrency` in flight; wait for all."""
    jobs: list[Job] = [functools.partial(_one, req) for req in requests]
    return await run_jobs(client, jobs, len(requests), request_rate, max_concurrency, seed, progress, burstiness)


async def warm_up(client: BenchClient, requests: list[BenchRequest], count: int, max_concurrency: int | None) -> None:
    """Send `count` untimed requests (the dataset's first ones, cycled); raises BenchError if any fails, since a
    server that fails its warm-up (wrong API key, wrong backend, bad vocab size) would fail the whole run."""
    if count == 0:
        return
    reqs = [requests[i % len(requests)] for i in range(count)]
    result = await run_requests(client, reqs, max_concurrency=max_concurrency)
    failed = [o for o in result.outputs if not o.success]
    if failed:
        raise BenchError(f"{len(failed)} of {count} warm-up requests failed; the first: {failed[0].error}")


def _dataset(args: BenchArgs, vocab_size: int | None) -> tuple[list[Job], int, list[BenchRequest]]:
    """(jobs, requests they send, warm-up requests) of args.dataset."""
    if args.dataset == "multi-turn":
        conversations = multi_turn_conversations(
            args.num_prompts, args.num_turns, args.input_len_range, args.output_len_range, args.seed
        )
        jobs: list[Job] = [functools.partial(converse, c) for c in conversations]
        return jobs, len(conversations) * args.num_turns, [c.opening() for c in conversations]
    requests = make_requests(
        args.dataset, args.num_prompts, args.input_len_range, args.output_len_range, args.seed, vocab_size
    )
    return [functools.partial(_one, req) for req in requests], len(requests), requests


async def run_benchmark(args: BenchArgs) -> tuple[dict[str, Any], RunResult]:
    """The whole benchmark; returns the report (see report.build_report) and the run's raw outputs. Raises
    BenchError if it cannot run."""
    await check_health(args.base_url, args.api_key)
    vocab_size = args.vocab_size
    if args.dataset == "random-ids" and vocab_size is None:
        vocab_size = await fetch_vocab_size(args.base_url, args.api_key)
        if vocab_size is None:
            raise BenchError("the server does not report vocab_size (GET /model_info); pass --vocab-size, "
                             "or use --dataset random-text")  # fmt: skip
    try:
        jobs, num_requests, warmup_requests = _dataset(args, vocab_size)
    except CorpusUnavailableError as e:
        raise BenchError(str(e)) from None
    async with BenchClient(
        args.base_url,
        args.backend,
        args.api_key,
        args.model,
        args.timeout_s,
        max_connections=args.max_concurrency,
        stream=not args.disable_stream,
        ignore_eos=not args.disable_ignore_eos,
    ) as client:
        await warm_up(client, warmup_requests, args.warmup_requests, args.max_concurrency)
        if args.profile:  # the timed run only: not the warm-up (its compiles and first-request costs)
            body = {"output_dir": args.profile_output_dir} if args.profile_output_dir else {}
            await server_profile(args.base_url, args.api_key, "start", body)
        try:
            result = await run_jobs(
                client, jobs, num_requests, args.request_rate, args.max_concurrency, args.seed,
                progress=not args.disable_progress, burstiness=args.burstiness,
            )  # fmt: skip
        finally:
            traces = await server_profile(args.base_url, args.api_key, "stop") if args.profile else []
    resolved: dict[str, Any] = {"vocab_size": vocab_size}
    if args.dataset in ("python-docs", "multi-turn"):
        resolved["corpus"] = corpus_name()
    report = build_report(
        args.to_config(**resolved), result.outputs, result.duration_s, result.start_time,
        args.report_percentiles, args.goodput,
    )  # fmt: skip
    if args.profile:
        report["profile_traces"] = traces
    return report, result


def main(args: BenchArgs) -> int:
    """Run, print the table, write the JSON and plots. Exit status: 0 if any request succeeded, 1 otherwise."""
    if args.plot_dir is not None:
        from pd.bench.plots import PlotsUnavailableError, require_matplotlib

        try:
            require_matplotlib()  # before the run, which may take hours, not after it
        except PlotsUnavailableError as e:
            print(f"pd bench: error: {e}", file=sys.stderr)
            return 1
    try:
        report, result = asyncio.run(run_benchmark(args))
    except BenchError as e:
        print(f"pd bench: error: {e}", file=sys.stderr)
        return 1
    print(format_table(report))
    for path in report.get("profile_traces", ()):
        print(f"profile trace: {path}")
    if args.output_json is not None:
        write_json(report, args.output_json)
    if args.plot_dir is not None:
        from pd.bench.plots import write_plots

        os.makedirs(args.plot_dir, exist_ok=True)
        write_json(report, os.path.join(args.plot_dir, "report.json"))
        for path in write_plots(result.outputs, result.start_time, result.duration_s, args.plot_dir):
            print(f"wrote {path}")
    return 0 if report["metrics"]["completed"] > 0 else 1
