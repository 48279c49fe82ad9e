"""Load-balancer overhead against stub instances: CPU time per request of the balancer process, throughput at a
fixed concurrency, and added latency over direct access, for `pd lb` and sglang-router in front of the same stubs.

The stubs are plain ASGI apps in their own processes (uvicorn with uvloop + httptools) that answer like SGLang
PD instances without a model: prefill answers a small JSON after --prefill-ms; decode streams --tokens SSE events
of native /generate's shape (cumulative output_ids and meta_info), one every --interval-ms, or answers the whole
JSON at the end. Both answer the probes sglang-router makes at start (/health, /server_info, /model_info).

Measured per balancer and per answer shape (stream, non-stream), in this order:
- CPU: --requests requests at --concurrency; user + system CPU time of the balancer process (all threads, from
  /proc) over the batch, divided by the number of requests. This does not depend on the machine's load, which is
  what a shared 2-core VM needs; wall time and requests/s are printed beside it but do depend on load.
- Added latency: --probe requests one at a time, each sent direct (the client adds the bootstrap fields and POSTs
  to both stubs, as bench_pd.py does), through pd lb and through sglang-router in turn; median of the per-request
  difference to direct, for E2E and, on streams, TTFT, the delivery delay of an event (each event carries the
  stub's send time) and the stub's own time from first to last event. E2E = TTFT + that stub time + the last
  event's delay, so the split shows how much of the E2E difference the balancer's relay adds and how much is the
  stub itself running slower (on 2 shared cores, every extra process woken per event delays the others).

Usage: python benchmarks/bench_lb.py [--requests 2000] [--concurrency 16] [--out results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import aiohttp

HOST = "127.0.0.1"
ROUTE = "/generate"


# ---------------------------------------------------------------- stub instances
def stub_app(role: str, tokens: int, interval_s: float, prefill_s: float) -> Any:
    """A raw ASGI app answering like an SGLang PD instance (see the module doc)."""
    info = json.dumps({"model_path": "stub-model", "disaggregation_mode": role}).encode()
    models = json.dumps({"object": "list", "data": [{"id": "stub-model", "object": "model"}]}).encode()

    async def reply(send: Any, status: int, body: bytes, ctype: bytes = b"application/json") -> None:
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]})
        await send({"type": "http.response.body", "body": body})

    def event(rid: str, i: int) -> dict[str, Any]:
        finish = {"type": "length", "length": tokens} if i + 1 == tokens else None
        meta = {"id": rid, "completion_tokens": i + 1, "finish_reason": finish, "sent_at": time.time()}
        return {"text": " tok" * (i + 1), "output_ids": list(range(1000, 1001 + i)), "meta_info": meta}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (msg := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if scope["method"] == "GET":
            body = {"/health": b"", "/v1/models": models}.get(path, info)
            await reply(send, 200, body)
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if path == "/abort_request":
            await reply(send, 200, b"{}")
            return
        req = json.loads(raw)
        rid = str(req.get("rid"))
        if role == "prefill":
            await asyncio.sleep(prefill_s)
            await reply(send, 200, json.dumps({"text": "", "meta_info": {"id": rid}}).encode())
            return
        if not req.get("stream"):
            await asyncio.sleep(tokens * interval_s)
            await reply(send, 200, json.dumps(event(rid, tokens - 1)).encode())
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(tokens):
            await asyncio.sleep(interval_s)
            chunk = b"data: " + json.dumps(event(rid, i)).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    return app


def run_stub(role: str, port: int, tokens: int, interval_s: float, prefill_s: float) -> None:
    import uvicorn

    uvicorn.run(stub_app(role, tokens, interval_s, prefill_s), host=HOST, port=port, log_level="warning",
                access_log=False)  # fmt: skip


# ---------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout:g} s")
        await asyncio.sleep(0.2)


# ---------------------------------------------------------------- client
def make_body(stream: bool, tokens: int) -> dict[str, Any]:
    return {"input_ids": [random.randrange(4096) for _ in range(128)], "stream": stream,
            "sampling_params": {"max_new_tokens": tokens, "temperature": 0.0, "ignore_eos": True}}  # fmt: skip


async def read_answer(r: aiohttp.ClientResponse, stream: bool, t0: float) -> dict[str, float]:
    """Read an answer to its end; seconds from `t0` (time.time() at send) to its end (e2e). For a stream, also to
    its first byte (ttft), the stub's own time from its first to its last event (stub_stream), the median delay
    from an event's send to its arrival (event_delay) and the same for the last event (last_delay); the stub
    stamps each event with its send time (same clock)."""
    if not stream:
        await r.read()
        return {"e2e": time.time() - t0}
    buf, ttft, sent, arrived = b"", 0.0, [], []
    async for chunk in r.content.iter_any():
        now = time.time()
        ttft = ttft or now - t0
        buf += chunk
        *events, buf = buf.split(b"\n\n")
        for e in events:
            if e.startswith(b"data: {"):
                sent.append(json.loads(e[6:])["meta_info"]["sent_at"])
                arrived.append(now)
    delays = [a - s for a, s in zip(arrived, sent, strict=True)]
    return {"e2e": time.time() - t0, "ttft": ttft, "stub_stream": sent[-1] - sent[0],
            "event_delay": statistics.median(delays), "last_delay": delays[-1]}  # fmt: skip


async def one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], stream: bool) -> dict[str, float]:
    """One request through a balancer, timed as by read_answer."""
    t0 = time.time()
    async with session.post(url + ROUTE, json=body) as r:
        assert r.status == 200, (r.status, url)
        return await read_answer(r, stream, t0)


async def one_direct(session: aiohttp.ClientSession, prefill: str, decode: str, body: dict[str, Any],
                     stream: bool) -> dict[str, float]:  # fmt: skip
    """The balancer's job done in the client: bootstrap fields in, POST to both, decode's answer timed."""
    t0 = time.time()
    body = {**body, "rid": uuid.uuid4().hex, "bootstrap_host": HOST, "bootstrap_port": 8998,
            "bootstrap_room": random.getrandbits(63)}  # fmt: skip
    data = json.dumps(body).encode()
    headers = {"content-type": "application/json"}

    async def pf() -> None:
        async with session.post(prefill + ROUTE, data=data, headers=headers) as r:
            await r.read()

    ptask = asyncio.create_task(pf())
    async with session.post(decode + ROUTE, data=data, headers=headers) as r:
        out = await read_answer(r, stream, t0)
    await ptask
    return out


async def cpu_batch(session: aiohttp.ClientSession, url: str, pid: int, n: int, conc: int, stream: bool,
                    tokens: int) -> dict[str, float]:  # fmt: skip
    bodies = [make_body(stream, tokens) for _ in range(n)]
    sem = asyncio.Semaphore(conc)

    async def go(b: dict[str, Any]) -> float:
        async with sem:
            return (await one(session, url, b, stream))["e2e"]

    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    lat = await asyncio.gather(*(go(b) for b in bodies))
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return {"cpu_ms_per_request": cpu * 1e3 / n, "wall_s": wall, "requests_per_s": n / wall,
            "p50_ms": statistics.median(lat) * 1e3}  # fmt: skip


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    ports = {k: free_port() for k in ("prefill", "decode", "pd-lb", "sglang")}
    url = {k: f"http://{HOST}:{p}" for k, p in ports.items()}
    stub = [sys.executable, os.path.abspath(__file__), "--stub"]
    knobs = ["--tokens", str(args.tokens), "--interval-ms", str(args.interval_ms), "--prefill-ms", str(args.prefill_ms)]
    pair = ["--prefill", url["prefill"], "8998", "--decode", url["decode"]]
    env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    argvs = {
        "prefill": [*stub, "prefill", str(ports["prefill"]), *knobs],
        "decode": [*stub, "decode", str(ports["decode"]), *knobs],
        "pd-lb": [sys.executable, "-m", "pd", "lb", "--port", str(ports["pd-lb"]), "--policy", "round_robin",
                  "--log-level", "warning", *pair, *args.lb_args],
        "sglang": [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--host", HOST,
                   "--port", str(ports["sglang"]), "--policy", "round_robin", "--log-level", "warn",
                   "--prometheus-port", str(free_port()), *pair],
    }  # fmt: skip
    lbs = [m for m in ("pd-lb", "sglang") if m in args.modes]
    procs = {k: subprocess.Popen(argvs[k], env=env, stdout=subprocess.DEVNULL) for k in ("prefill", "decode", *lbs)}
    results: dict[str, Any] = {}
    # below uvicorn's 5 s keep-alive, so a connection the server is closing is never reused
    conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)
    try:
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
            for k in ("prefill", "decode"):
                await wait_ready(session, url[k] + "/health")
            for k in lbs:
                await wait_ready(session, url[k] + ("/health" if k == "pd-lb" else "/readiness"))
            for stream in (True, False):
                shape = "stream" if stream else "non-stream"
                for k in lbs:  # warm up (connections, caches), then measure
                    await cpu_batch(session, url[k], procs[k].pid, 100, args.concurrency, stream, args.tokens)
                for rep in range(args.repeats):
                    for k in lbs if rep % 2 == 0 else lbs[::-1]:
                        r = await cpu_batch(session, url[k], procs[k].pid, args.requests, args.concurrency, stream,
                                            args.tokens)  # fmt: skip
                        results.setdefault(k, {}).setdefault(shape, []).append(r)
                        print(
                            f"{k:7s} {shape:10s} concurrency {args.concurrency}: {r['cpu_ms_per_request']:.2f} ms "
                            f"CPU/request, {r['requests_per_s']:.0f} req/s, p50 {r['p50_ms']:.1f} ms",
                            flush=True,
                        )
                if args.probe:
                    runs: dict[str, list[dict[str, float]]] = {k: [] for k in ("direct", *lbs)}
                    for _ in range(args.probe):
                        body = make_body(stream, args.tokens)
                        runs["direct"].append(await one_direct(session, url["prefill"], url["decode"], body, stream))
                        for k in lbs:
                            runs[k].append(await one(session, url[k], body, stream))
                    for k in lbs:
                        pairs = list(zip(runs[k], runs["direct"], strict=True))
                        added = {m: 1e3 * statistics.median(x[m] - d[m] for x, d in pairs) for m in pairs[0][0]}
                        results[k][f"{shape}_added_ms_vs_direct"] = added
                        print(f"{k:7s} {shape:10s} added vs direct (ms, median of {args.probe} paired): "
                              + ", ".join(f"{m} {v:+.2f}" for m, v in added.items()), flush=True)  # fmt: skip
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(20)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stub", nargs=2, metavar=("ROLE", "PORT"), help=argparse.SUPPRESS)
    p.add_argument("--requests", type=int, default=2000, help="requests per measured batch (default: 2000)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    p.add_argument("--repeats", type=int, default=2, help="measured batches per balancer and shape (default: 2)")
    p.add_argument("--probe", type=int, default=200, help="paired one-at-a-time requests per shape (default: 200)")
    p.add_argument("--tokens", type=int, default=32, help="decode SSE events per request (default: 32)")
    p.add_argument("--interval-ms", type=float, default=5.0, help="decode time per token (default: 5)")
    p.add_argument("--prefill-ms", type=float, default=2.0, help="prefill time (default: 2)")
    p.add_argument("--modes", nargs="+", default=["pd-lb", "sglang"], choices=["pd-lb", "sglang"])
    p.add_argument("--lb-args", nargs=argparse.REMAINDER, default=[], help="extra `pd lb` flags (last)")
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args()
    if args.stub:
        run_stub(args.stub[0], int(args.stub[1]), args.tokens, args.interval_ms / 1e3, args.prefill_ms / 1e3)
        return 0
    results = asyncio.run(bench(args))
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:],
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "load": os.getloadavg()}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
