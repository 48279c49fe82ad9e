"""Several HTTP front processes (--tokenizer-worker-num): the engine routes each request's outputs to the front that
sent it, goes on past a front that reads nothing (starting, or hung with requests in flight), and `pd serve` with
three fronts answers like transformers and stops whole when one front dies."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import re
import secrets
import signal
import threading
import time
from typing import Any

import httpx
import msgpack
import torch

from pd.engine.engine_process import EngineLoop
from pd.engine.io import AbortRequest, EngineStats, GenerateRequest, SamplingParams, TokenOutput, to_dict
from tests.server_process import free_port, healthy_process, listeners, process_alive
from tests.test_rank_lifetime import _descendants
from tests.tiny_checkpoints import load_hf, make_checkpoint


class CountingScheduler:
    """Stands in for the scheduler: every step gives each running request one token (its running count)."""

    def __init__(self) -> None:
        self.step_s = 0.002
        self.running: dict[str, list[Any]] = {}  # rid -> [max_new_tokens, tokens so far]
        self.aborted: list[str] = []
        self.lock = threading.Lock()

    @property
    def has_work(self) -> bool:
        return bool(self.running)

    needs_compute = has_work

    def add(self, req: GenerateRequest) -> TokenOutput | None:
        with self.lock:
            self.running[req.rid] = [req.sampling.max_new_tokens, 0]
        return None

    def abort(self, rid: str) -> TokenOutput | None:
        with self.lock:
            entry = self.running.pop(rid, None)
            if entry is None:
                return None
            self.aborted.append(rid)
        return TokenOutput(rid, [], 1, entry[1], "abort")

    def flush_cache(self) -> int:
        return 0

    def stats(self) -> EngineStats:
        return EngineStats(0, len(self.running), 64, 64, 16, 0, 0)

    untidy = False  # nothing is left for after the outputs

    def tidy(self) -> bool:  # nothing is left for after the outputs
        return False

    def step(self, tidy: bool = True) -> list[TokenOutput]:
        time.sleep(self.step_s)
        outputs = []
        with self.lock:
            for rid, entry in list(self.running.items()):
                entry[1] += 1
                done = entry[1] >= entry[0]
                if done:
                    del self.running[rid]
                outputs.append(TokenOutput(rid, [entry[1]], 1, entry[1], "length" if done else None))
        return outputs


def _request(rid: str, new_tokens: int) -> bytes:
    req = GenerateRequest(rid=rid, input_ids=[1], sampling=SamplingParams(max_new_tokens=new_tokens))
    return msgpack.packb(to_dict(req), use_bin_type=True)


def _outputs(conn: Any, until_rids: set[str], timeout: float = 10.0) -> dict[str, list[list[Any]]]:
    """Rows each rid got on `conn` until every rid in until_rids finished."""
    got: dict[str, list[list[Any]]] = {}
    deadline = time.monotonic() + timeout
    while not until_rids <= {rid for rid, rows in got.items() if rows[-1][4] is not None}:
        assert conn.poll(max(0.0, deadline - time.monotonic())), f"outputs so far: {got}"
        msg = msgpack.unpackb(conn.recv_bytes(), raw=False)
        assert "stats" in msg
        for row in msg["outputs"]:
            got.setdefault(row[0], []).append(row)
    return got


def test_engine_loop_routes_each_request_to_its_front_and_survives_a_front_closing() -> None:
    ctx = mp.get_context("spawn")
    pipes = [(ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)) for _ in range(2)]
    inboxes = [inbox_r for (inbox_r, _), _ in pipes]
    outboxes = [outbox_w for _, (_, outbox_w) in pipes]
    to_engine = [inbox_w for (_, inbox_w), _ in pipes]
    from_engine = [outbox_r for _, (outbox_r, _) in pipes]
    sched = CountingScheduler()
    loop = threading.Thread(target=EngineLoop(sched, inboxes, outboxes).run, daemon=True)  # type: ignore[arg-type]
    loop.start()

    to_engine[0].send_bytes(_request("a", 5))
    to_engine[1].send_bytes(_request("b", 3))
    got0, got1 = _outputs(from_engine[0], {"a"}), _outputs(from_engine[1], {"b"})
    assert set(got0) == {"a"} and set(got1) == {"b"}, "each front gets its own requests' outputs only"
    assert [r[1] for r in got0["a"]] == [[1], [2], [3], [4], [5]] and got0["a"][-1][4] == "length"
    assert [r[1] for r in got1["b"]] == [[1], [2], [3]]

    # A rid in flight from one front is refused to another (each front only knows its own).
    to_engine[0].send_bytes(_request("c", 1000))
    assert _wait_for(lambda: "c" in sched.running)
    to_engine[1].send_bytes(_request("c", 2))
    refused = _outputs(from_engine[1], {"c"})["c"]
    assert refused[-1][4] == "error" and "already in flight" in refused[-1][6], refused
    assert "c" in sched.running, "the first front's request is untouched"

    # Front 1 goes away (its process dies: both its pipe ends close) with a request in flight: the request is
    # aborted, whichever end the engine finds closed first; front 0's request goes on.
    to_engine[1].send_bytes(_request("d", 1000))
    assert _wait_for(lambda: "d" in sched.running)
    from_engine[1].close()
    to_engine[1].close()
    assert _wait_for(lambda: "d" in sched.aborted) and "c" in sched.running
    to_engine[0].send_bytes(msgpack.packb(to_dict(AbortRequest("c")), use_bin_type=True))
    assert _outputs(from_engine[0], {"c"})["c"][-1][4] == "abort"

    # The first front closing ends the loop.
    to_engine[0].close()
    loop.join(10)
    assert not loop.is_alive()


def test_a_front_that_does_not_read_does_not_stall_the_engine() -> None:
    """A front still starting (or stuck) reads nothing: the stats the engine sends it after every step would fill
    its pipe within a few hundred steps and block the engine for everyone."""
    ctx = mp.get_context("spawn")
    (in0_r, in0_w), (in1_r, _in1_w) = ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)
    (out0_r, out0_w), (_out1_r, out1_w) = ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)
    sched = CountingScheduler()
    sched.step_s = 0.0
    loop = threading.Thread(target=EngineLoop(sched, [in0_r, in1_r], [out0_w, out1_w]).run,  # type: ignore[arg-type]
                            daemon=True)  # fmt: skip
    loop.start()
    in0_w.send_bytes(_request("long", 3000))
    rows = _outputs(out0_r, {"long"}, timeout=60)["long"]
    assert [r[1][0] for r in rows] == list(range(1, 3001)) and rows[-1][4] == "length"
    in0_w.close()
    loop.join(10)
    assert not loop.is_alive()


def test_a_front_that_stops_reading_with_requests_in_flight_is_given_up_and_the_others_go_on() -> None:
    """A front process that hangs (alive, reading nothing) while its request streams: its pipe fills and the write
    blocks, but only its sender thread's; once its outputs have waited front_stall_s the engine aborts its request
    (freeing what it held), and the other front's request runs to its end meanwhile."""
    ctx = mp.get_context("spawn")
    (in0_r, in0_w), (in1_r, in1_w) = ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)
    (out0_r, out0_w), (_out1_r, out1_w) = ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)
    sched = CountingScheduler()
    sched.step_s = 0.0005
    engine = EngineLoop(sched, [in0_r, in1_r], [out0_w, out1_w])  # type: ignore[arg-type]
    engine.front_stall_s = 1.0
    loop = threading.Thread(target=engine.run, daemon=True)
    loop.start()
    in1_w.send_bytes(_request("stuck", 10**9))  # its rows fill front 1's pipe within a few thousand steps
    assert _wait_for(lambda: "stuck" in sched.running)
    in0_w.send_bytes(_request("long", 6000))  # ~3 s of steps: front 1's stall passes 1 s meanwhile
    rows = _outputs(out0_r, {"long"}, timeout=60)["long"]
    assert [r[1][0] for r in rows] == list(range(1, 6001)) and rows[-1][4] == "length"
    assert "stuck" in sched.aborted and "stuck" not in sched.running
    assert engine.open_fronts == [0]
    in0_w.close()
    loop.join(10)
    assert not loop.is_alive()


def _wait_for(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


async def _generate_all(url: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy output ids of each prompt, every other one streamed; one connection per request (the kernel spreads
    new connections over the front processes)."""
    params = {"max_new_tokens": new_tokens, "temperature": 0.0}

    async def one(i: int, ids: list[int]) -> list[int]:
        body = {"input_ids": ids, "sampling_params": params, "stream": i % 2 == 1}
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            if i % 2 == 0:
                r = await client.post(f"{url}/generate", json=body)
                assert r.status_code == 200, r.text
                return r.json()["output_ids"]
            last = None
            async with client.stream("POST", f"{url}/generate", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        last = line
            assert last is not None
            return json.loads(last[6:])["output_ids"]

    return list(await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)]))


def test_three_front_processes_answer_like_transformers_and_stop_together(tmp_path) -> None:
    seed = secrets.randbelow(2**31)
    path = make_checkpoint("qwen3_moe", str(tmp_path / "model"), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in torch.randint(2, 30, (18,))]
    port, log = free_port(), str(tmp_path / "serve.log")
    command = ["python", "-m", "pd", "serve", "--model-path", path, "--device", "cpu", "--dtype", "float32",
               "--port", str(port), "--tokenizer-worker-num", "3", "--log-level", "info"]  # fmt: skip
    with healthy_process(command, port, log_path=log) as (url, proc):
        # healthy only once all three listen: connections made before would all go to the first
        assert listeners(port) == 3, listeners(port)
        assert len(_front_pids(log)) == 2, "both other front processes started"
        outs = asyncio.run(_generate_all(url, prompts, 12))
        hf = load_hf(path)
        for ids, out in zip(prompts, outs, strict=True):
            with torch.no_grad():
                ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
            assert out == ref, f"seed {seed}, prompt {ids}"
        served_by = re.findall(r" (\S+) INFO pd.server.generation: finished rid", open(log).read())
        assert len(served_by) == len(prompts) and len(set(served_by)) >= 2, served_by
        # /metrics covers every front's requests, whichever process answers the scrape.
        for _ in range(6):
            text = httpx.get(f"{url}/metrics", headers={"Connection": "close"}).text
            assert _metric(text, "pd:generation_tokens_total") == 12 * len(prompts), text
            assert _metric(text, "pd:prompt_tokens_total") == sum(map(len, prompts))
            assert _metric(text, 'pd:num_requests_total{finish_reason="length"}') == len(prompts)
        # abort_all reaches the requests of every front, whichever front takes it.
        assert set(asyncio.run(_abort_all_midway(url, prompts[:8]))) == {"abort"}
        # One front dying takes the server down whole: no half-served port, no orphaned ranks or fronts.
        workers, family = _front_pids(log), _descendants(proc.pid)
        assert set(workers) <= set(family) and len(family) >= 4, family  # fronts, the fork server, the rank
        os.kill(workers[0], signal.SIGKILL)
        assert proc.wait(60) is not None
        text = open(log).read()
        assert f"(pid {workers[0]}) exited with code -9; stopping the server" in text, text[-2000:]
        gone = _wait_for(lambda: not any(process_alive(p) for p in family), timeout=30)
        assert gone, [p for p in family if process_alive(p)]


async def _abort_all_midway(url: str, prompts: list[list[int]]) -> list[str]:
    """Streams long greedy requests (one connection each), posts abort_all once each has a token; their finish
    reasons."""
    started = asyncio.Event()
    count = [0]

    async def one(ids: list[int]) -> str:
        body = {"input_ids": ids, "stream": True, "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
        last = None
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            async with client.stream("POST", f"{url}/generate", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        if last is None:
                            count[0] += 1
                            if count[0] == len(prompts):
                                started.set()
                        last = line
        assert last is not None
        return json.loads(last[6:])["meta_info"]["finish_reason"]["type"]

    tasks = [asyncio.ensure_future(one(p)) for p in prompts]
    await asyncio.wait_for(started.wait(), 60)
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.post(f"{url}/abort_request", json={"abort_all": True})).status_code == 200
    return list(await asyncio.wait_for(asyncio.gather(*tasks), 60))


def _metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, (name, values)
    return values[0]


def _front_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"pd-front\d INFO uvicorn.error: Started server process \[(\d+)\]",
                                       open(log).read())]  # fmt: skip
