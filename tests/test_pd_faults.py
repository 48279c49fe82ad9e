"""Fault injection on a real PD deployment: prefill and decode `pd serve` instances behind `pd lb`, each a
subprocess, KV moving over Mooncake/TCP. Instances are killed mid-request, transfers never come, clients go away,
requests are aborted, rooms reused, bootstrap ports wrong, peers incompatible. After every fault the client gets
an answer or a clear error in bounded time, no KV page stays taken on any instance (decode frees the pages of a
transfer that may still land after its quarantine), and the survivors answer with transformers' greedy tokens.

The 2 prefill x 2 decode cluster is shared by this module's tests in file order; the last two kill instances
(each kills what it needs, so it also runs alone on a fresh cluster). Prefills that must die or must not fit are
extra instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

from decode.scheduler import QUARANTINE_S
from tests.pd_cluster import Cluster, Proc, kv_pages_free, pd_cluster, serve_argv, start_proc, wait_healthy
from tests.server_process import HTTP, free_port
from tests.tiny_checkpoints import load_hf, make_checkpoint

CHUNK, PAGE = 32, 4
TRANSFER_TIMEOUT = BOOTSTRAP_TIMEOUT = 5.0
INSTANCE_ARGS = ("--chunked-prefill-size", str(CHUNK), "--page-size", str(PAGE),
                 "--disaggregation-transfer-timeout", str(TRANSFER_TIMEOUT),
                 "--disaggregation-bootstrap-timeout", str(BOOTSTRAP_TIMEOUT))
# A fault may end a transfer timeout after it happened; decode then keeps the pages for QUARANTINE_S.
PAGES_DEADLINE_S = QUARANTINE_S + TRANSFER_TIMEOUT + 15
LONG_PROMPT = 3000  # tokens: ~90 prefill chunks, long enough to catch prefill in the middle of it
LONG_OUTPUT = 32  # tokens of the requests that faults cut short


# ---- processes ----
def _descendants(pid: int) -> list[int]:
    """Every process below pid, from /proc (the engine process of a `pd serve` is its child)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_instance(proc: Proc) -> None:
    """SIGKILL an instance's HTTP front and engine process together: a crash, not a shutdown."""
    for pid in [*_descendants(proc.popen.pid), proc.popen.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.popen.wait(10)


def alive(procs: list[Proc]) -> list[Proc]:
    return [p for p in procs if p.popen.poll() is None]


def pages(procs: list[Proc]) -> dict[str, int]:
    return {p.url: kv_pages_free(p.url) for p in procs}


def wait_pages(start: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (now := {u: kv_pages_free(u) for u in start}) != start:
        assert time.monotonic() < deadline, f"KV pages not returned after {timeout:.0f} s: free {now}, at start {start}"
        time.sleep(0.1)


def wait_log(procs: list[Proc], pattern: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(re.search(pattern, p.log()) for p in procs):
        assert time.monotonic() < deadline, f"no log line matching {pattern!r} in {[p.name for p in procs]}"
        time.sleep(0.2)


def num_running(proc: Proc) -> int:
    return int(HTTP.get(f"{proc.url}/get_server_info", timeout=10).json()["num_running"])


@contextlib.contextmanager
def started(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Processes started with start_proc (together, so they load at once), healthy; stopped and removed after."""
    try:
        wait_healthy(procs)
        yield procs
    finally:
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.terminate()
        for proc in procs:
            try:
                proc.popen.wait(20)
            except subprocess.TimeoutExpired:
                kill_instance(proc)
            os.unlink(proc.log_path)


def prefill_proc(name: str, model_path: str, bootstrap_port: int, *args: str) -> Proc:
    """A prefill instance behind no balancer (yet)."""
    port = free_port()
    return start_proc(name, serve_argv(model_path, port, "--disaggregation-mode", "prefill",
                                       "--disaggregation-bootstrap-port", str(bootstrap_port), *args),
                      f"http://127.0.0.1:{port}")


# ---- requests ----
def body(ids: list[int], n: int, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0.0}, "stream": stream, **extra}


def direct(ids: list[int], n: int, bootstrap_port: int, room: int | None = None, **extra: Any) -> dict[str, Any]:
    """A request as the balancer would send it to one instance, bootstrap fields included."""
    room = random.getrandbits(63) if room is None else room
    return body(ids, n, bootstrap_host="127.0.0.1", bootstrap_port=bootstrap_port, bootstrap_room=room, **extra)


@dataclass
class Answer:
    status: int
    ids: list[int] | None  # output_ids of a complete answer
    error: str | None  # an error status's body, an SSE error event, or a broken stream
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


async def generate(client: httpx.AsyncClient, url: str, b: dict[str, Any]) -> Answer:
    t0 = time.monotonic()
    if not b["stream"]:
        r = await client.post(url + "/generate", json=b)
        ok = r.status_code == 200
        return Answer(r.status_code, r.json()["output_ids"] if ok else None, None if ok else r.text,
                      time.monotonic() - t0)
    ids, error, done = None, None, False
    async with client.stream("POST", url + "/generate", json=b) as r:
        if r.status_code != 200:
            return Answer(r.status_code, None, (await r.aread()).decode(), time.monotonic() - t0)
        try:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = json.dumps(event["error"])
                    else:
                        ids = event["output_ids"]  # cumulative
        except httpx.HTTPError as e:
            error = f"stream broken: {type(e).__name__}: {e}"
    if error is None and not done:
        error = "stream closed without data: [DONE]"
    return Answer(200, ids if error is None else None, error, time.monotonic() - t0)


def run_many(url: str, bodies: list[dict[str, Any]]) -> list[Answer]:
    async def go() -> list[Answer]:
        async with httpx.AsyncClient(timeout=60) as client:
            return list(await asyncio.gather(*(generate(client, url, b) for b in bodies)))

    return asyncio.run(go())


def prompts(gen: torch.Generator, lengths: list[int]) -> list[list[int]]:
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


# ---- fixtures ----
@pytest.fixture(scope="module", autouse=True)
def one_thread_per_engine() -> Iterator[None]:
    """Six instances share this host's cores: one compute thread each, or their OpenMP threads starve each other."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def seed() -> int:
    return random.SystemRandom().randrange(2**31)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, seed: int) -> str:
    return make_checkpoint("qwen3_moe", str(tmp_path_factory.mktemp("pd_faults") / "qwen3_moe"), seed=seed)


class Oracle:
    """transformers' greedy continuation of a prompt, first n tokens (one run per prompt, extended as needed)."""

    def __init__(self, path: str) -> None:
        self.hf = load_hf(path)
        self.cache: dict[tuple[int, ...], list[int]] = {}

    def __call__(self, ids: list[int], n: int) -> list[int]:
        if len(self.cache.get(tuple(ids), ())) < n:
            with torch.no_grad():
                out = self.hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=n, do_sample=False)
            self.cache[tuple(ids)] = out[0, len(ids):].tolist()
        return self.cache[tuple(ids)][:n]


@pytest.fixture(scope="module")
def oracle(model: str) -> Oracle:
    return Oracle(model)


@pytest.fixture(scope="module")
def cluster(model: str) -> Iterator[Cluster]:
    with pd_cluster(model, 2, 2, instance_args=INSTANCE_ARGS) as c:
        yield c


def check_answers(answers: list[Answer], expected: list[list[int]], seed: int) -> None:
    for a, want in zip(answers, expected, strict=True):
        assert a.ok, f"seed {seed}: {a}"
        assert a.ids == want, f"seed {seed}"


# ---- (b) a decode request whose KV never comes ----
def test_decode_request_whose_prefill_never_sends_or_dies_ends_with_an_error_in_time_and_frees_its_pages(
    cluster: Cluster, model: str, seed: int
) -> None:
    """Straight to a decode instance: (1) with the bootstrap of a live prefill that never gets the request: an
    error at the transfer timeout; (2) with a prefill (behind no balancer) that gets a long prompt and dies in
    the middle of it, before any transfer: an error at once (its control connection drops)."""
    decode = cluster.decode[0]
    start = pages(cluster.prefill + cluster.decode)
    short, long_ = prompts(torch.Generator().manual_seed(seed), [40, LONG_PROMPT])
    rooms = [random.getrandbits(63) for _ in range(2)]
    never = [direct(short, 8, cluster.bootstrap_ports[0], room, stream=stream)
             for room, stream in zip(rooms, (False, True), strict=True)]
    bport = free_port()
    with started([prefill_proc("prefill-doomed", model, bport, *INSTANCE_ARGS)]) as (doomed,):
        dies = direct(long_, 8, bport)

        async def go() -> tuple[list[Answer], Answer, float]:
            async with httpx.AsyncClient(timeout=60) as client:
                waiting = asyncio.gather(*(generate(client, decode.url, b) for b in never))
                to_decode = asyncio.create_task(generate(client, decode.url, dies))
                to_prefill = asyncio.create_task(generate(client, doomed.url, dies))
                deadline = time.monotonic() + 10
                while not num_running(doomed):  # in the middle of the prompt: nothing sent yet
                    assert time.monotonic() < deadline, "prefill never started the long prompt"
                    await asyncio.sleep(0.02)
                kill_instance(doomed)
                killed = time.monotonic()
                died = await to_decode
                after_kill = time.monotonic() - killed
                with contextlib.suppress(httpx.HTTPError):
                    await to_prefill
                return list(await waiting), died, after_kill

        answers, died, after_kill = asyncio.run(go())
    for a, room in zip(answers, rooms, strict=True):
        assert not a.ok and a.error is not None, a
        assert "KV transfer" in a.error and str(room) in a.error, a.error
        assert TRANSFER_TIMEOUT - 0.5 < a.seconds < TRANSFER_TIMEOUT + 4, a
    assert not died.ok and died.error is not None and "prefill" in died.error, died
    assert after_kill < 3.0, died  # not the transfer timeout
    wait_pages(start, PAGES_DEADLINE_S)


# ---- (d) client disconnects ----
def test_client_disconnect_aborts_both_sides_frees_every_page_and_new_requests_succeed(
    cluster: Cluster, seed: int, oracle: Oracle
) -> None:
    start = pages(cluster.prefill + cluster.decode)
    gen = torch.Generator().manual_seed(seed + 1)
    short, long_ = prompts(gen, [40, LONG_PROMPT])
    rid_mid, rid_early = f"disconnect-mid-{seed}", f"disconnect-early-{seed}"

    async def go() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            # Mid-stream: decode is generating when the client goes.
            async with client.stream("POST", cluster.url + "/generate",
                                     json=body(short, 3000, stream=True, rid=rid_mid)) as r:
                assert r.status_code == 200
                events = 0
                async for line in r.aiter_lines():
                    events += line.startswith("data: ")
                    if events == 3:
                        break
        # Before the first token: the client goes while prefill is still running the long prompt.
        host, port = cluster.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        data = json.dumps(body(long_, 8, stream=True, rid=rid_early)).encode()
        writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        await writer.drain()
        deadline = time.monotonic() + 10
        while not any(num_running(p) for p in cluster.prefill):
            assert time.monotonic() < deadline, "prefill never started the long prompt"
            await asyncio.sleep(0.02)
        writer.close()
        # While its body is still being sent (as the balancer does when its own client leaves): an instance
        # answers that quietly, not as an internal error.
        for inst in cluster.prefill + cluster.decode:
            host, port = inst.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data[: len(data) // 2]))
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()

    asyncio.run(go())
    for inst in cluster.prefill + cluster.decode:
        log = inst.log()
        assert "Traceback" not in log, f"{inst.name}:\n{log[log.find('Traceback') - 300:][:6000]}"
    wait_log(cluster.decode, rf"finished rid={rid_mid} .*finish=abort")
    wait_log(cluster.prefill, rf"finished rid={rid_mid} ")
    # Whichever hears first (the balancer's abort, or its peer's through the KV layer) ends it unfinished.
    wait_log(cluster.prefill, rf"finished rid={rid_early} .*finish=(abort|error)")
    wait_log(cluster.decode, rf"finished rid={rid_early} .*finish=(abort|error)")
    wait_pages(start, PAGES_DEADLINE_S)
    answers = run_many(cluster.url, [body(short, 16), body(short, 16, stream=True)])
    check_answers(answers, [oracle(short, 16)] * 2, seed)


# ---- (e) many requests, some of them faulty ----
FAULT_WEIGHTS = {"ok": 72, "disconnect": 5, "disconnect_early": 4, "abort": 5, "bad_port": 3, "wrong_prefill": 3,
                 "reused_room": 3, "prefill_only": 3, "invalid": 2}


def test_mixed_faults_under_load_leak_no_page_and_leave_correct_answers(
    cluster: Cluster, seed: int, oracle: Oracle
) -> None:
    """224 requests, 32 at a time, about a quarter of them faulty (FAULT_WEIGHTS). Every plain request gets
    transformers' tokens, every faulty one an answer in bounded time (never wrong tokens); afterwards every
    instance's free KV pages are back at their start value and new requests are answered correctly."""
    _mixed_faults(cluster, seed, oracle, 224)


def test_mixed_faults_with_dp_attention_on_both_sides_leak_no_page(model: str, seed: int, oracle: Oracle) -> None:
    """The same with two DP-attention groups per instance: each group has its own pool, scheduler and transfer
    endpoints, and a fault in one group's room must free that group's pages (the counts are summed per instance).
    Two prefills (a request can go to the wrong one) and one decode, whose groups both prefills' groups feed."""
    dp = ("--tp", "2", "--dp-size", "2", "--enable-dp-attention")
    with pd_cluster(model, 2, 1, instance_args=INSTANCE_ARGS, prefill_args=dp, decode_args=dp) as dp_cluster:
        _mixed_faults(dp_cluster, seed + 7, oracle, 48)


def _mixed_faults(cluster: Cluster, seed: int, oracle: Oracle, num_requests: int) -> None:
    rng = random.Random(seed)
    pool = prompts(torch.Generator().manual_seed(seed + 2), [5, 17, 31, 33, 47, 64, 80, 95])
    for ids in pool:
        oracle(ids, LONG_OUTPUT)
    prefills, decodes = cluster.prefill, cluster.decode
    start = pages(prefills + decodes)
    closed_port = free_port()
    jobs = [(kind, rng.choice(pool), rng.choice([1, 2, 8, 16]), rng.random() < 0.5, rng.uniform(0.0, 0.5))
            for kind in rng.choices(list(FAULT_WEIGHTS), list(FAULT_WEIGHTS.values()), k=num_requests)]
    assert sum(kind != "ok" for kind, *_ in jobs) >= len(jobs) // 10
    failures: list[str] = []

    async def job(client: httpx.AsyncClient, i: int, kind: str, ids: list[int], n: int, stream: bool,
                  delay: float) -> None:
        lb, p, d = cluster.url, rng.choice(prefills), rng.choice(decodes)
        pport = cluster.bootstrap_ports[prefills.index(p)]
        if kind == "ok":
            a = await generate(client, lb, body(ids, n, stream))
            if not a.ok or a.ids != oracle(ids, n):
                failures.append(f"{i} ok: {a}, expected {oracle(ids, n)}")
        elif kind == "disconnect":  # after the first event
            async with client.stream("POST", lb + "/generate", json=body(ids, LONG_OUTPUT, True)) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break
        elif kind == "disconnect_early":  # anywhere before the answer
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(generate(client, lb, body(ids, LONG_OUTPUT, stream)), delay)
        elif kind == "abort":
            rid = f"abort-{seed}-{i}"
            task = asyncio.create_task(generate(client, lb, body(ids, LONG_OUTPUT, stream, rid=rid)))
            await asyncio.sleep(delay)
            for inst in prefills + decodes:
                await client.post(inst.url + "/abort_request", json={"rid": rid})
            a = await task
            if a.ok and a.ids != oracle(ids, LONG_OUTPUT)[: len(a.ids or [])]:
                failures.append(f"{i} abort: wrong tokens {a}")
        elif kind in ("bad_port", "wrong_prefill"):  # straight to decode; its prefill is not there or never hears
            other = cluster.bootstrap_ports[1 - prefills.index(p)]
            a = await generate(client, d.url, direct(ids, n, closed_port if kind == "bad_port" else other,
                                                     stream=stream))
            if a.ok or a.seconds > TRANSFER_TIMEOUT + 4:
                failures.append(f"{i} {kind}: {a}")
        elif kind == "reused_room":  # a real pair plus a second decode request on the same room
            room = random.getrandbits(63)
            pair = [generate(client, url, direct(ids, n, pport, room, stream=stream))
                    for url in (p.url, d.url, rng.choice(decodes).url)]
            for a in await asyncio.gather(*pair):  # prefill answers its first token; a decode fed KV, all n
                if a.ok and a.ids != oracle(ids, n)[: len(a.ids or [])]:
                    failures.append(f"{i} reused_room: wrong tokens {a}")
        elif kind == "prefill_only":  # no decode ever registers
            a = await generate(client, p.url, direct(ids, n, pport, stream=stream))
            if a.ok or a.seconds > BOOTSTRAP_TIMEOUT + 4:
                failures.append(f"{i} prefill_only: {a}")
        elif kind == "invalid":
            a = await generate(client, lb, body(ids, 0, stream))
            if a.status != 400:
                failures.append(f"{i} invalid: {a}")

    async def go() -> None:
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) as client:

            async def bounded(i: int) -> None:
                async with sem:
                    try:
                        await asyncio.wait_for(job(client, i, *jobs[i]), 45)
                    except Exception as e:  # a hang or a transport failure is a finding, not a crash of the run
                        failures.append(f"{i} {jobs[i][0]}: {type(e).__name__}: {e}")

            await asyncio.gather(*(bounded(i) for i in range(len(jobs))))

    asyncio.run(go())
    assert not failures, f"seed {seed}:\n" + "\n".join(failures[:20])
    wait_pages(start, PAGES_DEADLINE_S)
    fresh = pool[:4]
    check_answers(run_many(cluster.url, [body(ids, 16, i % 2 == 1) for i, ids in enumerate(fresh)]),
                  [oracle(ids, 16) for ids in fresh], seed)
    for p in prefills + decodes:  # no fault may surface as an unhandled exception
        log = p.log()
        assert "Traceback" not in log, f"{p.name}:\n{log[log.find('Traceback') - 300:][:6000]}"


# ---- (f) peers that cannot exchange KV ----
def test_incompatible_page_size_or_model_fails_fast_naming_the_mismatch(
    cluster: Cluster, model: str, tmp_path: Any, seed: int
) -> None:
    """A second balancer puts one of the cluster's decode instances (page size 4) behind two prefills it cannot
    take KV from: one with page size 8, one of another architecture (round robin: requests alternate)."""
    other = make_checkpoint("deepseek_v3", str(tmp_path / "deepseek_v3"), seed=seed + 6)
    slow = ("--chunked-prefill-size", str(CHUNK), "--disaggregation-bootstrap-timeout", "60")
    ports, lb_port = [free_port(), free_port()], free_port()
    procs = [prefill_proc("prefill-page8", model, ports[0], *slow, "--page-size", "8"),
             prefill_proc("prefill-other", other, ports[1], *slow, "--page-size", str(PAGE))]
    with started(procs):
        argv = [sys.executable, "-m", "pd", "lb", "--port", str(lb_port), "--policy", "round_robin",
                "--prefill", procs[0].url, str(ports[0]), "--prefill", procs[1].url, str(ports[1]),
                "--decode", cluster.decode[0].url]
        with started([start_proc("lb-mismatch", argv, f"http://127.0.0.1:{lb_port}")]) as (lb,):
            (ids,) = prompts(torch.Generator().manual_seed(seed), [20])
            answers = [run_many(lb.url, [body(ids, 8, stream)])[0] for stream in (False, False, True, True)]
    for a in answers:
        assert not a.ok and a.error is not None and a.seconds < TRANSFER_TIMEOUT, a
    page_errors = [a for a in answers if re.search(r"page_size\D+8\D+4", a.error or "")]
    model_errors = [a for a in answers if "DeepseekV3ForCausalLM" in (a.error or "")
                    and "Qwen3MoeForCausalLM" in (a.error or "")]
    assert len(page_errors) == 2 and len(model_errors) == 2, answers


# ---- instances dying: these tests kill, so they come last ----
def lb_retries(cluster: Cluster) -> float:
    text = httpx.get(cluster.url + "/metrics", timeout=10).text
    return float(re.search(r"^pd_lb:retries_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def test_requests_succeed_with_transformers_tokens_while_a_prefill_and_a_decode_are_dead(
    cluster: Cluster, seed: int, oracle: Oracle
) -> None:
    gen = torch.Generator().manual_seed(seed + 4)

    def round_of_requests() -> None:
        ps = prompts(gen, torch.randint(3, 3 * CHUNK, (10,), generator=gen).tolist())
        answers = run_many(cluster.url, [body(ids, 12, stream=i % 2 == 0) for i, ids in enumerate(ps)])
        check_answers(answers, [oracle(ids, 12) for ids in ps], seed)

    # Right after a death the balancer still believes the instance is up: a request whose other half already
    # reached a live instance must be retried on a healthy pair (and not collide with its first attempt there).
    for procs in (cluster.decode, cluster.prefill):
        if len(alive(procs)) == len(procs):
            retries = lb_retries(cluster)
            kill_instance(procs[1])
            round_of_requests()
            assert lb_retries(cluster) > retries, "no request met the dead instance"
    assert len(alive(cluster.prefill)) == 1 and len(alive(cluster.decode)) == 1
    time.sleep(3)  # and once the health checks have taken them out
    round_of_requests()
    workers = httpx.get(cluster.url + "/list_workers", timeout=10).json()
    health = {w["url"]: w["healthy"] for w in workers["prefill"] + workers["decode"]}
    assert health == {p.url: p.popen.poll() is None for p in cluster.prefill + cluster.decode}


def test_decode_killed_mid_stream_ends_the_client_stream_with_an_error_and_prefill_frees_its_pages(
    cluster: Cluster, seed: int
) -> None:
    start = pages(alive(cluster.prefill))
    (ids,) = prompts(torch.Generator().manual_seed(seed + 5), [40])

    async def go() -> tuple[str | None, float]:
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", cluster.url + "/generate", json=body(ids, 3000, stream=True)) as r:
                assert r.status_code == 200
                lines, events = r.aiter_lines(), 0
                async for line in lines:
                    events += line.startswith("data: ")
                    if events == 3:
                        break
                kill_instance(next(d for d in alive(cluster.decode) if num_running(d)))
                killed, error = time.monotonic(), None
                try:
                    async with asyncio.timeout(10):
                        async for line in lines:
                            if line.startswith("data: ") and line != "data: [DONE]":
                                event = json.loads(line[6:])
                                if "error" in event:
                                    error = json.dumps(event)
                                else:
                                    assert event["meta_info"]["finish_reason"] is None, event
                except httpx.HTTPError as e:
                    error = f"stream broken: {e!r}"
                return error, time.monotonic() - killed

    error, after_kill = asyncio.run(go())
    assert error is not None and after_kill < 10, (error, after_kill)
    wait_pages(start, PAGES_DEADLINE_S)
