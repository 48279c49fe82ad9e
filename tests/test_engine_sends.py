"""What the front writes to the engine: every message one turn of the front's event loop queues for a leader goes out
as one pipe write, so a batch request's prompts reach the engine together and its first forward takes them all."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import random
import time
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pd.dist.launch import LeaderLink
from pd.engine.client import EngineClient
from pd.engine.io import AbortRequest, FlushCacheRequest, GenerateRequest, SamplingParams, unpack_messages
from pd.server_args import ServerArgs


def _client_on_pipe() -> tuple[EngineClient, Any]:
    """An EngineClient wired to one leader link whose far end the test reads (the engine's side of the pipe)."""
    engine_end, front_end = Pipe(duplex=False)  # engine_end receives what the front sends
    out_recv, out_send = Pipe(duplex=False)
    client = EngineClient(ServerArgs(model_path="/models/none", device="cpu"), spec=None)  # type: ignore[arg-type]
    client._leaders = [LeaderLink(inbox=front_end, outbox=out_recv)]
    client._loop = asyncio.get_running_loop()
    return client, engine_end


def _writes(conn: Any) -> list[list[Any]]:
    """Each pipe write waiting on the engine's end, as the messages the engine reads from it."""
    writes = []
    while conn.poll(0):
        writes.append(list(unpack_messages(conn.recv_bytes())))
    return writes


def _request(rng: random.Random, i: int) -> GenerateRequest:
    ids = [rng.randrange(1 << 17) for _ in range(rng.randint(1, 300))]
    return GenerateRequest(rid=f"r{i}-{rng.getrandbits(32):x}", input_ids=ids,
                           sampling=SamplingParams(max_new_tokens=rng.randint(1, 50), temperature=rng.random()))


async def _first_output(client: EngineClient, req: GenerateRequest) -> None:
    """Submits `req` and waits for an output that never comes (the test plays the engine and sends none)."""
    async for _ in client.generate(req):
        return


def test_requests_queued_in_one_loop_turn_go_out_as_one_write_in_order() -> None:
    """Against the requests themselves: n generate calls started together reach the engine as one write holding the
    n requests, equal field for field and in the order they were made; a request started later is a write of its
    own; an abort queued in the same turn as other messages keeps its place among them."""
    rng = random.Random()

    async def scenario() -> None:
        client, engine_end = _client_on_pipe()
        for _ in range(5):
            reqs = [_request(rng, i) for i in range(rng.randint(1, 12))]
            tasks = [asyncio.ensure_future(_first_output(client, r)) for r in reqs]
            await asyncio.sleep(0.01)
            assert _writes(engine_end) == [reqs]
            lone = _request(rng, 99)
            tasks.append(asyncio.ensure_future(_first_output(client, lone)))
            await asyncio.sleep(0.01)
            assert _writes(engine_end) == [[lone]]
            # cancelling the waiting requests aborts them (their generators' cleanup) and a flush joins the turn
            victims = rng.sample(range(len(reqs)), rng.randint(1, len(reqs)))
            for i in victims:
                tasks[i].cancel()
            await client.flush_cache()
            await asyncio.sleep(0.01)
            (write,) = _writes(engine_end)
            assert write[0] == FlushCacheRequest()
            assert sorted(m.rid for m in write[1:]) == sorted(reqs[i].rid for i in victims)
            assert all(isinstance(m, AbortRequest) for m in write[1:])
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            _writes(engine_end)

    asyncio.run(scenario())


def test_with_a_burst_wait_a_long_loop_turn_writes_as_it_goes() -> None:
    """With --prefill-wait-ms the engine gathers a burst only while writes keep coming (engine_process.BURST_GAP_S
    apart at most): a loop turn that runs many requests' handlers back to back (concurrent requests whose bodies
    all arrived) must not hold them all to its end. Each request queued once the last write is _flush_after old goes
    out at once, in order; requests queued closer together than that still share a write (a batch request's
    prompts); nothing is written twice. Without the flag the whole turn is one write (the test above)."""
    from types import SimpleNamespace

    from pd.engine.engine_process import BURST_GAP_S

    rng = random.Random()

    async def scenario() -> None:
        client, engine_end = _client_on_pipe()
        assert client._flush_after is None  # no burst wait: one write per turn
        spec = SimpleNamespace(scheduler=SimpleNamespace(prefill_wait_s=0.01))
        client._flush_after = EngineClient(ServerArgs(model_path="/m", device="cpu"), spec=spec)._flush_after  # type: ignore[arg-type]
        assert client._flush_after is not None and 0 < client._flush_after < BURST_GAP_S
        handlers = [_request(rng, i) for i in range(rng.randint(3, 8))]
        written: list[list[Any]] = []
        for req in handlers:  # one loop turn: each handler busy past _flush_after before it queues its request
            until = time.monotonic() + 1.5 * client._flush_after
            while time.monotonic() < until:
                pass
            client._send(0, req)
            written += _writes(engine_end)
        assert written == [[req] for req in handlers]  # every one went out as it was queued, none at the turn's end
        for attempt in range(5):  # a host busy elsewhere may stall this loop past _flush_after: then try again
            batch = [_request(rng, 20 + 20 * attempt + i) for i in range(rng.randint(2, 12))]
            until = time.monotonic() + 1.5 * client._flush_after
            while time.monotonic() < until:
                pass
            queued = []
            for req in batch:  # a batch request's prompts, queued together: the first at once, the rest with the turn
                queued.append(time.monotonic())
                client._send(0, req)
            got = _writes(engine_end)
            await asyncio.sleep(0.01)
            got += _writes(engine_end)
            if max(b - a for a, b in itertools.pairwise(queued)) < client._flush_after / 2:
                break
        assert got == [[batch[0]], batch[1:]]

    asyncio.run(scenario())


def test_a_prompt_given_as_an_array_reaches_the_engine_as_the_same_array() -> None:
    """The front's parsed input_ids (int64 arrays) cross the pipe as their bytes and arrive as int64 arrays of the same
    ids, beside prompts sent as lists (which stay lists), each request otherwise equal field for field."""
    rng = random.Random()

    async def scenario() -> None:
        client, engine_end = _client_on_pipe()
        reqs = [_request(rng, i) for i in range(8)]
        arrays = [dataclasses.replace(r, input_ids=np.array(r.input_ids + [2**63 - 1, 0], dtype=np.int64))
                  if i % 2 else r for i, r in enumerate(reqs)]  # fmt: skip
        tasks = [asyncio.ensure_future(_first_output(client, r)) for r in arrays]
        await asyncio.sleep(0.01)
        (write,) = _writes(engine_end)
        assert len(write) == len(arrays)
        for sent, got in zip(arrays, write, strict=True):
            assert type(got.input_ids) is type(sent.input_ids)
            if isinstance(sent.input_ids, np.ndarray):
                assert got.input_ids.dtype == np.int64 and got.input_ids.tolist() == sent.input_ids.tolist()
            else:
                assert got.input_ids == sent.input_ids
            assert dataclasses.replace(got, input_ids=[]) == dataclasses.replace(sent, input_ids=[])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


def test_a_message_that_cannot_be_packed_fails_its_own_request_alone() -> None:
    """A request msgpack cannot carry (an id past 64 bits) raises in its own generate; the requests queued with it
    still go out, in one write (with the harmless abort the failed request's cleanup sends)."""
    rng = random.Random()

    async def scenario() -> None:
        client, engine_end = _client_on_pipe()
        good = [_request(rng, i) for i in range(3)]
        bad = GenerateRequest(rid="bad", input_ids=[1 << 70], sampling=SamplingParams(max_new_tokens=1))
        tasks = [asyncio.ensure_future(_first_output(client, r)) for r in (good[0], bad, *good[1:])]
        await asyncio.sleep(0.01)
        (write,) = _writes(engine_end)
        assert [m for m in write if isinstance(m, GenerateRequest)] == good
        assert [m for m in write if not isinstance(m, GenerateRequest)] == [AbortRequest("bad")]
        with pytest.raises(OverflowError):
            await tasks[1]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())


def test_a_closed_pipe_fails_the_requests_waiting_on_it() -> None:
    """The engine's end gone: the write fails, and the requests that were sent get an error output (as when the
    engine process dies) instead of waiting forever."""

    async def scenario() -> list[Any]:
        client, engine_end = _client_on_pipe()
        engine_end.close()
        reqs = [_request(random.Random(), i) for i in range(3)]

        async def first(req: GenerateRequest) -> Any:
            async for out in client.generate(req):
                return out

        return await asyncio.wait_for(asyncio.gather(*(first(r) for r in reqs)), 10)

    outs = asyncio.run(scenario())
    assert [o.finish_reason for o in outs] == ["error"] * 3
    assert all("sending to the engine" in o.error for o in outs), outs


@pytest.mark.slow
def test_a_batch_request_runs_as_one_prefill_forward_and_gives_hf_greedy(tmp_path: Path, capfd: Any) -> None:
    """A real engine (tiny Llama on the CPU) behind the HTTP front: a /generate batch of k prompts of random lengths
    is one prefill forward of k new requests (the engine's "prefill batch" line; before, the engine took the first
    prompt alone, then the rest), and each prompt's tokens are transformers' greedy tokens."""
    import torch
    from transformers import AutoTokenizer

    from tests.server_process import in_process_front
    from tests.tiny_checkpoints import load_hf, make_checkpoint

    path = make_checkpoint("llama", str(tmp_path / "llama"))
    tok = AutoTokenizer.from_pretrained(path)
    args = ServerArgs(model_path=path, device="cpu", log_level="info")
    rng = random.Random()
    k = rng.randint(3, 8)
    prompts = [[rng.randrange(1, 256) for _ in range(rng.randint(2, 40))] for _ in range(k)]
    with torch.no_grad():
        hf = load_hf(path)
        want = [hf.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False)[0, len(p):].tolist() for p in prompts]

    async def scenario() -> list[dict[str, Any]]:
        async with in_process_front(args, tok) as c:
            body = {"input_ids": prompts, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
            r = await c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            return r.json()

    capfd.readouterr()
    outs = asyncio.run(scenario())
    assert [o["output_ids"] for o in outs] == want
    log = capfd.readouterr().err
    lines = [line for line in log.splitlines() if "prefill batch:" in line]
    assert lines, log[-3000:]
    assert f"prefill batch: {sum(map(len, prompts))} prompt tokens of {k} requests ({k} new" in lines[0], lines


@pytest.mark.slow
def test_the_front_keeps_answering_while_the_engine_is_in_a_long_forward(tmp_path: Path) -> None:
    """A front that sends more than a pipe holds (a batch of long prompts, ~100 KB) while the engine is inside a
    3-second forward must not stall: /health answers within a second (it used to wait for the forward's end, the
    front's event loop blocked on the full pipe), and every request still completes."""
    import time

    from transformers import AutoTokenizer

    from tests.server_process import in_process_front
    from tests.slow_forward import SLOW_S, SLOW_TOKENS, slow_forward_scheduler
    from tests.tiny_checkpoints import make_checkpoint

    path = make_checkpoint("llama", str(tmp_path / "llama"))
    tok = AutoTokenizer.from_pretrained(path)
    args = ServerArgs(model_path=path, device="cpu", max_total_tokens=200_000)
    rng = random.Random()
    big = [[rng.randrange(256, 512) for _ in range(3000)] for _ in range(12)]  # 3 bytes an id on the wire: ~108 KB

    async def scenario() -> tuple[float, list[int]]:
        async with in_process_front(args, tok, slow_forward_scheduler) as c:
            one = {"sampling_params": {"max_new_tokens": 1}}
            slow = asyncio.ensure_future(c.post("/generate", json={"input_ids": [1] * SLOW_TOKENS, **one}))
            await asyncio.sleep(0.5)  # the engine is inside the long forward now
            start = time.perf_counter()
            batch = asyncio.ensure_future(c.post("/generate", json={"input_ids": big, **one}))
            await asyncio.sleep(0.2)  # (a blocked event loop overruns this)
            health = await c.get("/health")
            waited = time.perf_counter() - start - 0.2
            assert health.status_code == 200
            return waited, [(await slow).status_code, (await batch).status_code]

    waited, statuses = asyncio.run(scenario())
    assert statuses == [200, 200]
    assert waited < min(1.0, SLOW_S / 3), f"/health took {waited:.2f} s while the engine was in a {SLOW_S} s forward"


def test_the_engine_inbox_keeps_each_fronts_order_and_reports_closings() -> None:
    """FrontInbox against what was written: random writes from three fronts (each write read back whole, the
    fronts' own orders kept), then each front's closing as one final (front, None), and wait() times out on silence."""
    import time

    from pd.engine.engine_process import FrontInbox

    rng = random.Random()
    pipes = [Pipe(duplex=False) for _ in range(3)]
    inbox = FrontInbox([r for r, _ in pipes])
    sent: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    for _ in range(200):
        front = rng.randrange(3)
        data = rng.randbytes(rng.choice([1, 100, 70_000]))  # some past a pipe's 64 KiB
        pipes[front][1].send_bytes(data)
        sent[front].append(data)
    for _, w in pipes:
        w.close()
    got: dict[int, list[bytes | None]] = {0: [], 1: [], 2: []}
    deadline = time.monotonic() + 30
    while sum(len(v) for v in got.values()) < 203 and time.monotonic() < deadline:
        inbox.wait(1.0)
        for front, data in inbox.take():
            got[front].append(data)
    assert got == {f: [*sent[f], None] for f in range(3)}
    assert inbox.wait(0.05) is False and inbox.take() == []


@pytest.mark.skipif(not hasattr(__import__("fcntl"), "F_SETPIPE_SZ"), reason="pipes cannot be resized here (Linux)")
def test_a_widened_pipe_takes_a_whole_burst_without_its_reader() -> None:
    """A burst's messages (16 prompts of 1024 random ids, ~130 KiB) fit in a widened front-to-engine pipe: the write
    returns while nobody reads (a default pipe, 64 KiB, blocks), and the reader then gets the burst whole."""
    import threading

    from pd.dist.launch import PIPE_BYTES, widen_pipe
    from pd.engine.io import pack_message

    rng = np.random.default_rng()
    burst = b"".join(pack_message(GenerateRequest(
        rid=f"r{i}", input_ids=rng.integers(0, 150_000, 1024, dtype=np.int64), sampling=SamplingParams()))
        for i in range(16))  # fmt: skip
    assert 64 * 1024 < len(burst) < PIPE_BYTES
    reader, writer = Pipe(duplex=False)
    assert widen_pipe(writer) >= len(burst) + 64
    sent = threading.Thread(target=writer.send_bytes, args=(burst,), daemon=True)
    sent.start()
    sent.join(timeout=5.0)
    assert not sent.is_alive(), "the write waited for a reader"
    assert reader.recv_bytes() == burst
    assert [m.rid for m in unpack_messages(burst)] == [f"r{i}" for i in range(16)]

    narrow_reader, narrow_writer = Pipe(duplex=False)  # the default: the same write waits for its reader
    blocked = threading.Thread(target=narrow_writer.send_bytes, args=(burst,), daemon=True)
    blocked.start()
    blocked.join(timeout=0.5)
    assert blocked.is_alive()
    assert narrow_reader.recv_bytes() == burst
    blocked.join(timeout=5.0)


def test_widen_pipe_leaves_what_is_not_a_pipe() -> None:
    import socket
    from multiprocessing.connection import Connection

    from pd.dist.launch import widen_pipe

    a, b = socket.socketpair()
    try:
        assert widen_pipe(Connection(os.dup(a.fileno()))) == 0
    finally:
        a.close()
        b.close()


def _report_switch_interval(payload: Any, rank: int, init_method: Any, inbox: Any, outbox: Any) -> None:
    """A rank target: sends its process's GIL switch interval and its inbox pipe's size to the front."""
    import fcntl
    import sys

    size = fcntl.fcntl(inbox.fileno(), fcntl.F_GETPIPE_SZ) if hasattr(fcntl, "F_GETPIPE_SZ") else 0
    outbox.send((sys.getswitchinterval(), size))


def test_a_rank_process_runs_with_the_short_switch_interval_and_widened_pipes() -> None:
    """What spawn gives a leader rank: the GIL switch interval of pd.dist.launch (not Python's 5 ms default, which
    this process keeps) and front pipes of PIPE_BYTES (where the system allows that much)."""
    import sys

    from pd.dist.launch import PIPE_BYTES, SWITCH_INTERVAL_S, RankProcesses
    from pd.dist.topology import InstanceLayout

    ranks = RankProcesses.spawn(InstanceLayout(), _report_switch_interval, None)
    try:
        link = ranks.leaders[0]
        assert link.outbox.poll(60), "the rank did not answer"
        interval, size = link.outbox.recv()
    finally:
        ranks.stop(10.0)
    assert interval == pytest.approx(SWITCH_INTERVAL_S) and sys.getswitchinterval() != interval
    if hasattr(__import__("fcntl"), "F_GETPIPE_SZ"):
        with open("/proc/sys/fs/pipe-max-size") as f:
            assert size == min(PIPE_BYTES, int(f.read()))


def test_a_front_process_runs_its_loop_with_the_short_switch_interval() -> None:
    import sys

    from pd.dist.launch import SWITCH_INTERVAL_S
    from pd.server.app import _run

    seen: list[float] = []

    async def main() -> None:
        seen.append(sys.getswitchinterval())

    before = sys.getswitchinterval()
    try:
        _run(main())
    finally:
        sys.setswitchinterval(before)
    assert seen == [pytest.approx(SWITCH_INTERVAL_S)]
