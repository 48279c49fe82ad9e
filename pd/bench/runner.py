"""Running a benchmark: health check, warm-up, paced sending, then the report.

Pacing: with a finite request rate, arrival times follow a Poisson process (exponential gaps of mean 1/rate,
seeded), scheduled against one start time so that slow event-loop turns do not accumulate drift. With a
concurrency limit, a request that has arrived waits for a free slot before it is sent (its TTFT counts from
the send, as in SGLang's bench_serving); the limit and the rate combine.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from pd.bench.args import BenchArgs
from pd.bench.client import BenchClient, BenchError, RequestOutput, check_health, fetch_vocab_size
from pd.bench.datasets import BenchRequest, make_requests
from pd.bench.report import build_report, format_table, write_json


@dataclass
class RunResult:
    """outputs: one per request, in input order. duration_s: first send to last completion.
    arrival_s: float64 [n], when each request was released (seconds after the start), before any
    concurrency wait."""

    outputs: list[RequestOutput]
    duration_s: float
    arrival_s: np.ndarray


def arrival_offsets(num_requests: int, request_rate: float, seed: int) -> np.ndarray:
    """Scheduled arrival times, float64 [num_requests] in seconds from the start; the first is 0.

    A finite rate gives exponential gaps of mean 1 / request_rate from a generator seeded by `seed` (its own
    stream, independent of the dataset's); math.inf gives all zeros.
    """
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng([seed, 1]).exponential(1.0 / request_rate, size=max(num_requests - 1, 0))
    return np.concatenate(([0.0], np.cumsum(gaps)))


async def run_requests(
    client: BenchClient,
    requests: list[BenchRequest],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> RunResult:
    """Send `requests` paced by `request_rate` with at most `max_concurrency` in flight; wait for all."""
    offsets = arrival_offsets(len(requests), request_rate, seed)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency is not None else None
    bar = tqdm(total=len(requests), disable=not progress, unit="req", file=sys.stderr)
    arrivals = np.zeros(len(requests))

    async def one(req: BenchRequest) -> RequestOutput:
        if slots is None:
            out = await client.send(req)
        else:
            async with slots:
                out = await client.send(req)
        bar.update(1)
        return out

    start = time.perf_counter()
    tasks = []
    for i, (req, offset) in enumerate(zip(requests, offsets, strict=True)):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        arrivals[i] = time.perf_counter() - start
        tasks.append(asyncio.create_task(one(req)))
    try:
        outputs = list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()  # only matters if gather was interrupted; a finished task ignores it
        bar.close()
    return RunResult(outputs=outputs, duration_s=time.perf_counter() - start, arrival_s=arrivals)


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


async def run_benchmark(args: BenchArgs) -> dict[str, Any]:
    """The whole benchmark; returns the report (see report.build_report). Raises BenchError if it cannot run."""
    await check_health(args.base_url, args.api_key)
    vocab_size = args.vocab_size
    if args.dataset == "random-ids" and vocab_size is None:
        vocab_size = await fetch_vocab_size(args.base_url, args.api_key)
        if vocab_size is None:
            raise BenchError("the server does not report vocab_size (GET /model_info); pass --vocab-size, "
                             "or use --dataset random-text")  # fmt: skip
    requests = make_requests(
        args.dataset, args.num_prompts, args.input_len_range, args.output_len_range, args.seed, vocab_size
    )
    async with BenchClient(
        args.base_url, args.backend, args.api_key, args.model, args.timeout_s, max_connections=args.max_concurrency
    ) as client:
        await warm_up(client, requests, args.warmup_requests, args.max_concurrency)
        result = await run_requests(
            client, requests, args.request_rate, args.max_concurrency, args.seed, progress=not args.disable_progress
        )
    return build_report(args.to_config(vocab_size=vocab_size), result.outputs, result.duration_s)


def main(args: BenchArgs) -> int:
    """Run, print the table, write the JSON. Exit status: 0 if any request succeeded, 1 otherwise."""
    try:
        report = asyncio.run(run_benchmark(args))
    except BenchError as e:
        print(f"pd bench: error: {e}", file=sys.stderr)
        return 1
    print(format_table(report))
    if args.output_json is not None:
        write_json(report, args.output_json)
    return 0 if report["metrics"]["completed"] > 0 else 1
