"""What a prompt burst's write to the engine costs the front: a default 64 KiB pipe against a widened one.

The front hands the engine its requests through a pipe (pd.dist.launch); the engine process reads it on a thread of
its own, which needs that process's GIL between reads. Here a child process plays the engine: a reader thread takes
each message and notes when it arrived, while the main thread is busy in Python for --busy-ms at a time (an engine
building batches and stepping: the GIL held, given up only at the interpreter's switch interval) or idle (waiting on
a lock, as an idle engine waits for work). This process writes bursts of --prompts prompts of --length random ids,
packed as the front packs them, and times each write (how long the front's event loop is held) and each burst's
delivery (write start to the reader having it whole; both processes read CLOCK_MONOTONIC).

Printed per pipe (default, widened to pd.dist.launch.PIPE_BYTES), engine state (busy, idle) and, for the widened
pipe, the child's GIL switch interval (Python's default 5 ms, and pd.dist.launch.SWITCH_INTERVAL_S, what an
instance's processes use): median and p90 of the write's time and of the delivery.

Usage: python benchmarks/bench_pipe_burst.py [--bursts 40] [--prompts 16] [--length 1024] [--busy-ms 20]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pd.dist.launch import SWITCH_INTERVAL_S, widen_pipe  # noqa: E402
from pd.engine.io import GenerateRequest, SamplingParams, pack_message  # noqa: E402


def engine(inbox: Connection, report: Connection, busy_s: float, switch_s: float) -> None:
    """The stand-in engine: a reader thread timestamps each message; the main thread spins in Python (busy_s > 0)
    or sleeps on a lock until told to stop. switch_s: the process's GIL switch interval (0: Python's default)."""
    if switch_s > 0:
        sys.setswitchinterval(switch_s)
    arrivals: list[float] = []
    done = threading.Event()

    def read() -> None:
        while True:
            data = inbox.recv_bytes()
            if data == b"stop":
                break
            arrivals.append(time.monotonic())
        done.set()

    threading.Thread(target=read, daemon=True).start()
    while not done.is_set():
        if busy_s > 0:
            end = time.monotonic() + busy_s
            while time.monotonic() < end:  # pure-Python work: holds the GIL
                pass
        else:
            done.wait(0.05)
    report.send(arrivals)


def run(pipe: str, busy_s: float, bursts: int, burst: bytes, switch_s: float = 0.0) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    inbox_r, inbox_w = ctx.Pipe(duplex=False)
    report_r, report_w = ctx.Pipe(duplex=False)
    if pipe == "widened":
        assert widen_pipe(inbox_w) >= len(burst), "this system cannot widen pipes enough"
    proc = ctx.Process(target=engine, args=(inbox_r, report_w, busy_s, switch_s), daemon=True)
    proc.start()
    time.sleep(1.0)  # the child up and its reader waiting
    starts, writes = [], []
    rng = np.random.default_rng(0)
    for _ in range(bursts):
        time.sleep(rng.uniform(0.01, 0.03))  # bursts at random phases of the engine's work
        start = time.monotonic()
        inbox_w.send_bytes(burst)
        writes.append(time.monotonic() - start)
        starts.append(start)
    time.sleep(0.1)
    inbox_w.send_bytes(b"stop")
    arrivals = report_r.recv()
    proc.join(timeout=10)
    delivery = [a - s for a, s in zip(arrivals, starts, strict=True)]

    def ms(values: list[float]) -> tuple[float, float]:
        q = statistics.quantiles(values, n=10)
        return 1e3 * statistics.median(values), 1e3 * q[-1]

    return {"pipe": pipe, "engine": "busy" if busy_s > 0 else "idle", "write_ms": ms(writes),
            "delivery_ms": ms(delivery)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bursts", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--busy-ms", type=float, default=20.0)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    burst = b"".join(pack_message(GenerateRequest(rid=f"r{i}", sampling=SamplingParams(),
                                                  input_ids=rng.integers(0, 150_000, args.length, dtype=np.int64)))
                     for i in range(args.prompts))  # fmt: skip
    print(f"burst of {args.prompts} x {args.length} ids: {len(burst) / 1024:.0f} KiB")
    cases = [("default", 0.0), ("widened", 0.0), ("widened", SWITCH_INTERVAL_S)]
    for busy in (args.busy_ms / 1e3, 0.0):
        for pipe, switch_s in cases:
            r = run(pipe, busy, args.bursts, burst, switch_s)
            switch = f"{1e3 * (switch_s or sys.getswitchinterval()):.0f} ms switch"
            print(f"{r['pipe']:>8} pipe, {switch}, engine {r['engine']}: write median {r['write_ms'][0]:6.2f} ms "
                  f"(p90 {r['write_ms'][1]:6.2f}), delivery median {r['delivery_ms'][0]:6.2f} ms (p90 "
                  f"{r['delivery_ms'][1]:6.2f})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
