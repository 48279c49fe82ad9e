"""`pd lb` against stub prefill/decode workers that record what they receive and answer like SGLang workers.

The oracle for "the client gets decode's answer" is the stub's own record of the bytes it sent; for the wire
format it is the real `sglang-router` (0.3.2, `python -m sglang_router.launch_router --pd-disaggregation`) run
against the same stubs with the same command line. Stubs and the balancer run in threads of this process
(uvicorn), except where a worker must die for real (a subprocess running this file as a script).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

REPO = Path(__file__).resolve().parents[1]
GENERATE_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
BOOTSTRAP_FIELDS = {"bootstrap_host", "bootstrap_port", "bootstrap_room"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- stub workers
@dataclass
class StubState:
    """What a stub received and sent, and how it behaves (tests change the knobs between requests)."""

    role: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    answers: list[bytes] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    status: int = 200  # != 200: reject every request with this status
    delay: float = 0.0  # before answering (before the first token of a stream)
    n_tokens: int = 3
    interval: float = 0.0  # between streamed tokens
    hang: bool = False  # never finish; wait for the client to leave
    release: threading.Event | None = None  # stream: after the first token, send nothing more until this is set
    die_mid_event: int = -1  # stream (a stub in its own process): after this many events, half an event, then exit


def make_stub(state: StubState) -> FastAPI:
    """An SGLang-like worker: prefill answers a small JSON (consumed by the balancer), decode answers tokens."""
    app = FastAPI()
    rng = random.Random()

    async def wait(request: Request, rid: str) -> bool:
        end = time.monotonic() + state.delay
        while state.hang or time.monotonic() < end:
            if await request.is_disconnected():
                state.disconnects.append(rid)
                return False
            await asyncio.sleep(0.02)
        return True

    def event(payload: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(payload)}\n\n".encode()

    async def stream(rid: str) -> AsyncIterator[bytes]:
        sent: list[bytes] = []
        try:
            await asyncio.sleep(state.delay)
            for i in range(state.n_tokens if state.role == "decode" else 1):
                sent.append(event({"text": f"{state.role}{i}", "token": rng.randrange(1000), "meta_info": {"id": rid}}))
                if i == state.die_mid_event:
                    yield sent[-1][: len(sent[-1]) // 2]
                    await asyncio.sleep(0.3)  # the half goes out
                    os._exit(1)
                yield sent[-1]
                while state.release is not None and not state.release.is_set():
                    await asyncio.sleep(0.01)
                await asyncio.sleep(state.interval)
            while state.hang:
                await asyncio.sleep(0.02)
            sent.append(b"data: [DONE]\n\n")
            yield sent[-1]
        except asyncio.CancelledError:
            state.disconnects.append(rid)
            raise
        finally:
            state.answers.append(b"".join(sent))

    async def generate(request: Request) -> Response:
        body = await request.json()
        state.bodies.append(body)
        state.headers.append(dict(request.headers))
        rid = str(body.get("rid"))
        if state.status != 200:
            content = json.dumps({"error": {"message": f"{state.role} says no {uuid.uuid4().hex}"}}).encode()
            state.answers.append(content)
            return Response(content, state.status, media_type="application/json")
        if body.get("stream"):
            return StreamingResponse(stream(rid), media_type="text/event-stream")
        if not await wait(request, rid):
            return Response(status_code=499)
        ids = [rng.randrange(1000) for _ in range(state.n_tokens if state.role == "decode" else 0)]
        content = json.dumps({"text": state.role, "output_ids": ids, "meta_info": {"id": rid}}).encode()
        state.answers.append(content)
        return Response(content, media_type="application/json")

    for route in GENERATE_ROUTES:
        app.add_api_route(route, generate, methods=["POST"])

    @app.post("/abort_request")
    async def abort(request: Request) -> Response:
        state.aborts.append((await request.json())["rid"])
        return Response()

    @app.post("/stop_profile")
    async def stop_profile(request: Request) -> Response:  # what pd serve answers: where its traces went
        return Response(f"Stop profiling. This will take some time.\n/traces/{state.role}-{id(state)}.gz\n")

    @app.get("/health")
    async def health() -> Response:
        return Response()

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": f"{state.role}-model", "object": "model"}]})

    @app.get("/server_info")
    @app.get("/model_info")
    async def info() -> JSONResponse:  # what sglang-router asks at start
        return JSONResponse({"model_path": "stub-model", "disaggregation_mode": state.role})

    return app


class ServerThread:
    """A uvicorn server in a daemon thread; `stop()` and `start()` again reuse the port."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.app, self.port = app, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="error", access_log=False, timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), f"server on {self.port} did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class Stub:
    state: StubState
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url


def start_stub(role: str) -> Stub:
    state = StubState(role)
    return Stub(state, ServerThread(make_stub(state)).start())


@contextlib.contextmanager
def subprocess_stub(role: str, **knobs: Any) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A stub in its own process (so it can be killed), knobs as in StubState."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, __file__, role, str(port), json.dumps(knobs)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _status(url + "/health") == 200, 30, f"stub {role} did not start")
        yield url, proc
    finally:
        proc.kill()
        proc.wait()


def _status(url: str, **kw: Any) -> int | None:
    try:
        return httpx.get(url, timeout=2, **kw).status_code
    except httpx.HTTPError:
        return None


def wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# ---------------------------------------------------------------- the balancer
@dataclass
class Cluster:
    lb: ServerThread
    prefill: list[Stub]
    decode: list[Stub]
    bootstrap_ports: list[int]
    auth: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.lb.url

    def health(self, url: str) -> bool:
        """The balancer's view of one worker."""
        listing = httpx.get(self.url + "/list_workers", headers=self.auth).json()
        return next(w["healthy"] for w in listing["prefill"] + listing["decode"] if w["url"] == url)


@contextlib.contextmanager
def cluster(n_prefill: int = 1, n_decode: int = 1, **lb_args: Any) -> Iterator[Cluster]:
    """Stubs + a balancer over them (health checks every 60 s unless given: tests drive failures themselves)."""
    from pd.lb.app import create_app
    from pd.lb.args import LBArgs, PrefillSpec

    prefill = [start_stub("prefill") for _ in range(n_prefill)]
    decode = [start_stub("decode") for _ in range(n_decode)]
    ports = [random.randrange(1024, 65536) for _ in prefill]
    lb_args.setdefault("health_check_interval", 60.0)
    args = LBArgs(
        prefill=tuple(PrefillSpec(s.url, p) for s, p in zip(prefill, ports, strict=True)),
        decode=tuple(s.url for s in decode),
        port=free_port(),
        **lb_args,
    )
    lb = ServerThread(create_app(args), args.port).start()
    auth = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        yield Cluster(lb, prefill, decode, ports, auth)
    finally:
        for s in [lb, *(x.server for x in prefill + decode)]:
            s.stop()


def sse_events(raw: bytes) -> list[str]:
    return [line[len("data: ") :] for line in raw.decode().split("\n") if line.startswith("data: ")]


def request_body(route: str, stream: bool) -> dict[str, Any]:
    """A fresh client body for `route`, with fields the balancer does not know (they must pass through)."""
    tag = uuid.uuid4().hex[:8]
    if route == "/v1/chat/completions":
        body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": f"hi {tag}"}], "max_tokens": 4}
    elif route == "/v1/completions":
        body = {"model": "m", "prompt": f"hi {tag}", "max_tokens": 4}
    else:
        body = {"text": f"hi {tag}", "sampling_params": {"max_new_tokens": 4, "temperature": 0.5}}
    body.update(stream=stream, custom_field={"nested": [1, 2, tag]})
    return body


# ---------------------------------------------------------------- arguments and policies
def test_args_parse_prefill_ports_like_sglang_router() -> None:
    from pd.lb.args import DEFAULT_BOOTSTRAP_PORT, LBArgs

    args = LBArgs.from_cli(
        ["--pd-disaggregation", "--prefill", "http://a:1/", "9001", "--prefill", "http://b:2", "--prefill",
         "http://[::1]:3", "none", "--decode", "http://c:4", "--decode", "http://d:5", "--decode-policy", "random"]
    )  # fmt: skip
    assert [(p.url, p.bootstrap_port) for p in args.prefill] == [
        ("http://a:1", 9001), ("http://b:2", DEFAULT_BOOTSTRAP_PORT), ("http://[::1]:3", None)
    ]  # fmt: skip
    assert args.decode == ("http://c:4", "http://d:5")
    assert (args.prefill_policy, args.decode_policy) == ("power_of_two", "random")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prefill", "http://a:1", "9001", "7"], "takes URL [BOOTSTRAP_PORT]"),
        (["--prefill", "http://a:1", "port"], "bootstrap port 'port'"),
        (["--prefill", "http://a:1", "70000"], "bootstrap port 70000"),
        (["--decode", "a:1"], "not a worker URL"),
        (["--decode", "http://a:1/generate"], "has a path"),
        (["--decode", "http://a:1", "--prefill", "http://a:1"], "more than once"),
        (["--health-check-interval", "0"], "--health-check-interval must be > 0"),
        (["--health-failure-threshold", "0"], "--health-failure-threshold must be >= 1"),
        (["--request-timeout", "-1"], "--request-timeout must be > 0"),
        (["--policy", "cache_aware", "--cache-threshold", "2"], "--cache-threshold must be in [0, 1]"),
        (["--policy", "fastest"], "invalid choice"),
    ],
)
def test_bad_lb_flags_fail_with_a_clear_message(argv: list[str], message: str, capsys: Any) -> None:
    from launch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["lb", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_round_robin_cycles_per_side() -> None:
    from pd.lb.policies import make_policy

    rr = make_policy("round_robin")
    assert [rr.select([0, 0, 0]) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_power_of_two_picks_less_loaded_of_two_random_candidates() -> None:
    from pd.lb.policies import make_policy

    seed = random.randrange(2**32)
    loads = [random.randrange(5) for _ in range(6)]
    p2, oracle = make_policy("power_of_two", random.Random(seed)), random.Random(seed)
    for _ in range(300):
        a, b = oracle.sample(range(len(loads)), 2)
        assert loads[p2.select(loads)] == min(loads[a], loads[b])
    # the least loaded wins whenever it is drawn: 1 - C(3,2)/C(4,2) = 1/2 of the time out of 4
    p2 = make_policy("power_of_two")
    share = sum(p2.select([9, 0, 9, 9]) == 1 for _ in range(4000)) / 4000
    assert abs(share - 0.5) < 0.05
    assert all(p2.select([3, 0]) == 1 for _ in range(50))


def test_random_covers_all_candidates_evenly() -> None:
    from pd.lb.policies import make_policy

    rnd, n, draws = make_policy("random"), 5, 5000
    counts = [0] * n
    for _ in range(draws):
        counts[rnd.select([0] * n)] += 1
    assert all(abs(c / draws - 1 / n) < 0.03 for c in counts), counts


# ---------------------------------------------------------------- forwarding
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", GENERATE_ROUTES)
def test_both_workers_get_body_plus_bootstrap_and_client_gets_decode_answer(route: str, stream: bool) -> None:
    with cluster() as c:
        (p,), (d,) = c.prefill, c.decode
        body = request_body(route, stream)
        resp = httpx.post(c.url + route, json=body, timeout=10)
        assert resp.status_code == 200
        wait_until(lambda: len(p.state.answers) == 1, 5, "prefill did not answer")
        sent_p, sent_d = p.state.bodies[0], d.state.bodies[0]
        assert sent_p == sent_d
        rid = sent_d["rid"]
        assert isinstance(rid, str) and rid
        assert sent_d == {**body, "rid": rid, "bootstrap_host": "127.0.0.1", "bootstrap_port": c.bootstrap_ports[0],
                          "bootstrap_room": sent_d["bootstrap_room"]}  # fmt: skip
        room = sent_d["bootstrap_room"]
        assert isinstance(room, int) and 0 <= room < 2**63
        assert resp.content == d.state.answers[0]  # decode's bytes, untouched
        assert resp.headers["x-request-id"] == rid
        assert p.state.headers[0]["x-request-id"] == d.state.headers[0]["x-request-id"] == rid
        if stream:
            assert sse_events(resp.content)[-1] == "[DONE]"
        # a client rid is kept, and every request gets its own room
        body["rid"] = "client-rid"
        httpx.post(c.url + route, json=body, timeout=10)
        # the client gets decode's answer; the prefill request may still be on its way, as above
        wait_until(lambda: len(p.state.bodies) == 2, 5, "prefill did not get the second request")
        assert p.state.bodies[1]["rid"] == d.state.bodies[1]["rid"] == "client-rid"
        assert p.state.bodies[1]["bootstrap_room"] == d.state.bodies[1]["bootstrap_room"] != room


def test_batched_generate_gets_one_room_per_prompt() -> None:
    with cluster() as c:
        resp = httpx.post(c.url + "/generate", json={"text": ["a", "b", "c"]}, timeout=10)
        assert resp.status_code == 200
        wait_until(lambda: c.prefill[0].state.bodies, 5, "prefill got nothing")
        sent = c.decode[0].state.bodies[0]
        assert sent == c.prefill[0].state.bodies[0]
        assert sent["bootstrap_host"] == ["127.0.0.1"] * 3 and sent["bootstrap_port"] == [c.bootstrap_ports[0]] * 3
        assert len(set(sent["bootstrap_room"])) == 3 and all(0 <= r < 2**63 for r in sent["bootstrap_room"])
        assert len(sent["rid"]) == 3 and len(set(sent["rid"])) == 3


def test_stream_is_relayed_as_it_is_produced() -> None:
    with cluster() as c:
        d = c.decode[0].state
        d.n_tokens, d.release = 5, threading.Event()
        try:
            with httpx.stream("POST", c.url + "/generate", json={"text": "x", "stream": True}, timeout=10) as resp:
                chunks = resp.iter_raw()
                first = b""
                while b"\n\n" not in first:  # a balancer that waited for the whole stream would time out here
                    first += next(chunks)
                # decode sends its other tokens only once the client has its first one
                assert not d.answers and [json.loads(e)["text"] for e in sse_events(first)] == ["decode0"]
                d.release.set()
                rest = b"".join(chunks)
        finally:
            d.release.set()
        assert first + rest == d.answers[0] and sse_events(rest)[-1] == "[DONE]"


def test_v1_models_is_asked_of_a_decode_worker() -> None:
    with cluster() as c:
        assert httpx.get(c.url + "/v1/models").json()["data"][0]["id"] == "decode-model"


# ---------------------------------------------------------------- policies end to end
def test_round_robin_pairs_in_order_through_the_balancer() -> None:
    with cluster(2, 3, policy="round_robin") as c:
        for i in range(6):
            assert httpx.post(c.url + "/generate", json={"text": "x", "rid": f"r{i}"}, timeout=10).status_code == 200
        wait_until(lambda: sum(len(s.state.bodies) for s in c.prefill) == 6, 5, "prefill got too little")

        def where(stubs: list[Stub], rid: str) -> int:
            return next(k for k, s in enumerate(stubs) if any(b["rid"] == rid for b in s.state.bodies))

        assert [(where(c.prefill, f"r{i}"), where(c.decode, f"r{i}")) for i in range(6)] == [
            (i % 2, i % 3) for i in range(6)
        ]


def test_power_of_two_prefers_the_decode_with_fewer_outstanding_requests() -> None:
    with cluster(1, 2, policy="power_of_two") as c:
        for s in c.decode:
            s.state.hang = True
        with httpx.Client(timeout=10) as client, client.stream("POST", c.url + "/generate", json={"stream": True}):
            busy = next(s for s in c.decode if s.state.bodies)
            idle = next(s for s in c.decode if s is not busy)
            idle.state.hang = False
            for _ in range(8):
                assert httpx.post(c.url + "/generate", json={"text": "x"}, timeout=10).status_code == 200
            assert len(busy.state.bodies) == 1 and len(idle.state.bodies) == 8
            listing = httpx.get(c.url + "/list_workers").json()["decode"]
            assert {w["url"]: w["outstanding"] for w in listing} == {busy.url: 1, idle.url: 0}
            busy.state.hang = False


def test_random_policy_reaches_every_pair() -> None:
    with cluster(2, 2, policy="random") as c:
        for _ in range(40):
            httpx.post(c.url + "/generate", json={"text": "x"}, timeout=10)
        assert all(len(s.state.bodies) >= 5 for s in c.prefill + c.decode)


# ---------------------------------------------------------------- health and membership
def test_health_checks_take_a_dead_worker_out_and_put_it_back() -> None:
    with cluster(1, 2, policy="round_robin", health_check_interval=0.1, health_failure_threshold=2) as c:
        assert httpx.get(c.url + "/health").status_code == 200
        gone = c.decode[1]
        gone.server.stop()
        wait_until(lambda: not c.health(gone.url), 5, "dead decode still in rotation")
        for _ in range(4):
            assert httpx.post(c.url + "/generate", json={"text": "x"}, timeout=10).status_code == 200
        assert len(c.decode[0].state.bodies) == 4 and not gone.state.bodies
        gone.server.start()
        wait_until(lambda: c.health(gone.url), 5, "recovered decode not back in rotation")
        for _ in range(4):
            httpx.post(c.url + "/generate", json={"text": "x"}, timeout=10)
        assert len(gone.state.bodies) == 2
        c.prefill[0].server.stop()
        wait_until(lambda: httpx.get(c.url + "/health").status_code == 503, 5, "/health ignores a dead prefill")


def test_workers_are_added_and_removed_at_run_time() -> None:
    with cluster(1, 1, policy="round_robin") as c:
        new_d, new_p = start_stub("decode"), start_stub("prefill")
        try:
            r = httpx.post(c.url + "/add_worker", json={"url": new_d.url, "role": "decode"})
            assert r.status_code == 200 and r.json()["healthy"] is True
            params = {"url": new_p.url, "role": "prefill", "bootstrap_port": "4242"}
            r = httpx.post(c.url + "/add_worker", params=params)
            assert r.status_code == 200 and r.json()["bootstrap_port"] == 4242
            listing = httpx.get(c.url + "/list_workers").json()
            assert new_p.url in listing["urls"] and new_d.url in [w["url"] for w in listing["decode"]]
            for _ in range(4):
                httpx.post(c.url + "/generate", json={"text": "x"}, timeout=10)
            assert len(new_d.state.bodies) == 2 and len(c.decode[0].state.bodies) == 2
            wait_until(lambda: len(new_p.state.bodies) == 2, 5, "added prefill got no requests")
            # each request carries the bootstrap port of the prefill it went to
            assert {b["bootstrap_port"] for b in new_p.state.bodies} == {4242}
            assert {b["bootstrap_port"] for b in c.prefill[0].state.bodies} == {c.bootstrap_ports[0]}
            assert httpx.post(c.url + "/remove_worker", json={"url": c.decode[0].url}).status_code == 200
            for _ in range(3):
                httpx.post(c.url + "/generate", json={"text": "x"}, timeout=10)
            assert len(new_d.state.bodies) == 5 and len(c.decode[0].state.bodies) == 2
            # mistakes answer with a status and a message
            assert httpx.post(c.url + "/add_worker", json={"url": new_d.url, "role": "decode"}).status_code == 409
            assert httpx.post(c.url + "/remove_worker", params={"url": "http://nowhere:1"}).status_code == 404
            r = httpx.post(c.url + "/add_worker", json={"url": "http://x:1", "role": "both"})
            assert r.status_code == 400 and "role" in r.json()["error"]["message"]
        finally:
            new_d.server.stop()
            new_p.server.stop()


@pytest.mark.parametrize("dead_role", ["prefill", "decode"])
def test_refused_workers_are_taken_out_and_the_request_retried_on_a_healthy_pair(dead_role: str) -> None:
    with cluster(3, 3, policy="round_robin") as c:
        dead = (c.prefill if dead_role == "prefill" else c.decode)[1:]
        survivor_side = c.decode if dead_role == "prefill" else c.prefill
        for s in dead:  # die between two health checks: the balancer still believes they are up
            s.server.stop()
        for s in c.decode:  # as a real decode does, wait for prefill's KV (so prefill's failure is seen first)
            s.state.delay = 0.2
        for i in range(6):
            r = httpx.post(c.url + "/generate", json={"text": "x", "rid": f"r{i}"}, timeout=10)
            assert r.status_code == 200, r.text
        assert not any(c.health(s.url) for s in dead)
        assert "pd_lb:retries_total 2.0" in httpx.get(c.url + "/metrics").text
        # the half of each failed attempt that did get the request was told to drop it
        wait_until(lambda: sum(len(s.state.aborts) for s in survivor_side) == 2, 5, "no abort for failed attempts")


def test_no_healthy_pair_is_503_with_a_clear_message() -> None:
    with cluster(1, 1) as c:
        c.decode[0].server.stop()
        c.decode[0].state.status = 0
        r = httpx.post(c.url + "/generate", json={"text": "x"}, timeout=10)  # refused, retried, then none left
        assert r.status_code == 503 and "no healthy prefill/decode pair" in r.json()["error"]["message"]
        r = httpx.post(c.url + "/v1/chat/completions", json={"messages": []}, timeout=10)
        assert r.status_code == 503 and "0 of 1 decode" in r.json()["error"]["message"]
        assert httpx.get(c.url + "/health").status_code == 503


# ---------------------------------------------------------------- failures mid-request
def test_decode_dying_mid_event_sends_the_client_no_half_event() -> None:
    """Decode dies after half an event: the balancer forwards whole events only, so the client's stream is whole
    events, then the error event, then [DONE] (a half event glued to the error would not parse)."""
    from pd.lb.app import create_app
    from pd.lb.args import LBArgs, PrefillSpec

    p = start_stub("prefill")
    with subprocess_stub("decode", n_tokens=10, interval=0.02, die_mid_event=3) as (d_url, _):
        lb = ServerThread(create_app(LBArgs(prefill=(PrefillSpec(p.url),), decode=(d_url,), port=free_port())))
        lb.start()
        try:
            with httpx.stream("POST", lb.url + "/generate", json={"text": "x", "stream": True}, timeout=30) as resp:
                raw = resp.read()
            events = sse_events(raw)
            assert events[-1] == "[DONE]" and "failed mid-stream" in json.loads(events[-2])["error"]["message"]
            assert [json.loads(e)["text"] for e in events[:-2]] == ["decode0", "decode1", "decode2"], raw
        finally:
            lb.stop()
            p.server.stop()


def test_decode_dying_mid_stream_ends_the_client_stream_with_an_error_event() -> None:
    from pd.lb.app import create_app
    from pd.lb.args import LBArgs, PrefillSpec

    p = start_stub("prefill")
    with subprocess_stub("decode", n_tokens=1000, interval=0.05) as (d_url, d_proc):
        lb = ServerThread(create_app(LBArgs(prefill=(PrefillSpec(p.url),), decode=(d_url,), port=free_port())))
        lb.start()
        try:
            body = {"text": "x", "stream": True}
            with httpx.stream("POST", lb.url + "/generate", json=body, timeout=30) as resp:
                raw, killed_at = b"", None
                for chunk in resp.iter_raw():
                    raw += chunk
                    if killed_at is None and raw.count(b"data: ") >= 3:
                        d_proc.send_signal(signal.SIGKILL)
                        killed_at = time.monotonic()
            assert killed_at is not None and time.monotonic() - killed_at < 5
            events = sse_events(raw)
            assert events[-1] == "[DONE]"
            assert "failed mid-stream" in json.loads(events[-2])["error"]["message"]
            assert all("text" in json.loads(e) for e in events[:-2])  # every event before it is whole
        finally:
            lb.stop()
            p.server.stop()


def test_decode_dying_before_its_answer_is_a_502() -> None:
    from pd.lb.app import create_app
    from pd.lb.args import LBArgs, PrefillSpec

    p = start_stub("prefill")
    with subprocess_stub("decode", delay=30) as (d_url, d_proc):
        lb = ServerThread(create_app(LBArgs(prefill=(PrefillSpec(p.url),), decode=(d_url,), port=free_port())))
        lb.start()
        try:
            threading.Timer(0.5, d_proc.kill).start()
            t0 = time.monotonic()
            r = httpx.post(lb.url + "/generate", json={"text": "x"}, timeout=30)
            assert r.status_code == 502 and "decode worker" in r.json()["error"]["message"]
            assert time.monotonic() - t0 < 5
        finally:
            lb.stop()
            p.server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_closes_both_upstreams_and_aborts_both(stream: bool) -> None:
    with cluster() as c:
        (p,), (d,) = c.prefill, c.decode
        p.state.hang = d.state.hang = True
        body = {"text": "x", "rid": "leaver", "stream": stream}
        with httpx.Client(timeout=httpx.Timeout(10, read=0.5)) as client:
            if stream:  # read decode's first token, then leave
                with client.stream("POST", c.url + "/generate", json=body) as resp:
                    assert next(resp.iter_raw()).startswith(b"data: ")
            else:
                with pytest.raises(httpx.ReadTimeout):
                    client.post(c.url + "/generate", json=body)
        for s in (p, d):
            wait_until(lambda s=s: s.state.disconnects == ["leaver"], 5, f"{s.state.role} did not see the disconnect")
            wait_until(lambda s=s: s.state.aborts == ["leaver"], 5, f"{s.state.role} got no abort_request")
        wait_until(lambda: httpx.get(c.url + "/get_server_info").json()["decode"][0]["outstanding"] == 0, 5, "leak")


def test_clients_leaving_at_random_moments_leave_no_request_outstanding() -> None:
    """Clients cut off at random points (before the pair is picked, while the balancer connects upstream,
    mid-stream): the balancer's per-instance counts of requests in flight come back to zero."""
    with cluster(1, 2, policy="round_robin") as c:
        for s in c.decode:
            s.state.n_tokens, s.state.interval, s.state.delay = 8, 0.01, 0.02

        async def one(client: httpx.AsyncClient, i: int) -> None:
            body = {"text": "x", "stream": i % 2 == 0}
            with contextlib.suppress(asyncio.TimeoutError, httpx.HTTPError):
                await asyncio.wait_for(client.post(c.url + "/generate", json=body), random.uniform(0.001, 0.3))

        async def burst() -> None:
            limits = httpx.Limits(max_keepalive_connections=0)  # a new connection per request, closed when cut
            async with httpx.AsyncClient(timeout=10, limits=limits) as client:
                await asyncio.gather(*(one(client, i) for i in range(120)))

        asyncio.run(burst())

        def outstanding() -> list[int]:
            listing = httpx.get(c.url + "/list_workers").json()
            return [w["outstanding"] for w in listing["prefill"] + listing["decode"]]

        wait_until(lambda: outstanding() == [0, 0, 0], 10, "requests left outstanding")
        assert httpx.post(c.url + "/generate", json={"text": "x"}, timeout=10).status_code == 200


def test_prefill_error_before_decode_answers_is_the_client_answer() -> None:
    with cluster() as c:
        (p,), (d,) = c.prefill, c.decode
        p.state.status, d.state.delay = 400, 5.0
        t0 = time.monotonic()
        r = httpx.post(c.url + "/generate", json={"text": "x", "rid": "bad"}, timeout=10)
        assert r.status_code == 400 and r.content == p.state.answers[0]
        assert time.monotonic() - t0 < 2
        wait_until(lambda: d.state.disconnects == ["bad"], 5, "decode was left waiting")


@pytest.mark.parametrize("stream", [False, True])
def test_worker_validation_errors_are_passed_back_as_they_are(stream: bool) -> None:
    with cluster() as c:
        c.decode[0].state.status = 400
        r = httpx.post(c.url + "/v1/completions", json={"prompt": 5, "stream": stream}, timeout=10)
        assert r.status_code == 400 and r.content == c.decode[0].state.answers[0]


# ---------------------------------------------------------------- client mistakes and access
@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": ', "not valid JSON"),
        (b'["text"]', "must be a JSON object"),
        (b'{"text": "x", "stream": "yes"}', "'stream' must be true or false"),
        (b'{"text": "x", "rid": 5}', "'rid' must be a non-empty string"),
        (b'{"text": ["a", "b"], "rid": ["a"]}', "list of 2 non-empty strings"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_bad_input_is_400_and_reaches_no_worker(content: bytes, message: str) -> None:
    with cluster() as c:
        r = httpx.post(c.url + "/generate", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and message in r.json()["error"]["message"]
        assert not c.prefill[0].state.bodies and not c.decode[0].state.bodies


def test_api_key_is_enforced_and_forwarded() -> None:
    with cluster(api_key="sk-test") as c:
        body = {"text": "x"}
        assert httpx.post(c.url + "/generate", json=body).status_code == 401
        assert httpx.post(c.url + "/generate", json=body, headers={"authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(c.url + "/list_workers").status_code == 401
        assert httpx.post(c.url + "/add_worker", json={"url": "http://x:1", "role": "decode"}).status_code == 401
        assert httpx.get(c.url + "/health").status_code == 200 and httpx.get(c.url + "/metrics").status_code == 200
        r = httpx.post(c.url + "/generate", json=body, headers=c.auth, timeout=10)
        assert r.status_code == 200
        wait_until(lambda: c.prefill[0].state.headers, 5, "prefill got nothing")
        assert c.prefill[0].state.headers[0]["authorization"] == c.decode[0].state.headers[0]["authorization"]
        assert c.decode[0].state.headers[0]["authorization"] == "Bearer sk-test"


def test_metrics_and_server_info_report_the_balancer_state() -> None:
    with cluster(1, 2, policy="round_robin", decode_policy="random") as c:
        for _ in range(3):
            httpx.post(c.url + "/generate", json={"text": "x"}, timeout=10)
        httpx.post(c.url + "/generate", content=b"{")
        text = httpx.get(c.url + "/metrics").text
        assert 'pd_lb:requests_total{route="/generate",status="200"} 3.0' in text
        assert 'pd_lb:requests_total{route="/generate",status="400"} 1.0' in text
        assert 'pd_lb:request_latency_seconds_count{route="/generate"} 4.0' in text
        for s in c.prefill + c.decode:
            assert f'pd_lb:worker_healthy{{role="{s.state.role}",worker="{s.url}"}} 1.0' in text
            assert f'pd_lb:outstanding_requests{{role="{s.state.role}",worker="{s.url}"}} 0.0' in text
        info = httpx.get(c.url + "/get_server_info").json()
        assert (info["lb"]["prefill_policy"], info["lb"]["decode_policy"]) == ("round_robin", "random")
        assert [w["url"] for w in info["decode"]] == [s.url for s in c.decode]
        assert info["prefill"][0]["bootstrap_port"] == c.bootstrap_ports[0]


# ---------------------------------------------------------------- wire compatibility
# sglang-router 0.3.2 parses the body into its own request types and serialises them back, so beside the
# bootstrap fields it writes SGLang's optional fields out with their defaults, renames OpenAI's deprecated
# `max_tokens` and drops what its types lack (`rid` on chat). `pd lb` passes the client's body through and only
# adds `rid` (when missing) and the bootstrap fields, so these are the only differences; workers accept both.
ROUTER_RENAMED = {"/generate": {}, "/v1/chat/completions": {"max_tokens": "max_completion_tokens"}}
ROUTER_DROPPED = {"/generate": set(), "/v1/chat/completions": {"rid"}}
ROUTER_DEFAULT_FIELDS = {
    "/generate": {"model", "return_text_in_logprobs", "log_metrics", "return_hidden_states", "background",
                  "no_logs", "return_bytes", "return_entropy"},
    "/v1/chat/completions": {"logprobs", "no_stop_trim", "ignore_eos", "continue_final_message",
                             "skip_special_tokens", "separate_reasoning", "stream_reasoning", "return_hidden_states"},
}  # fmt: skip


def _collect(argv: list[str], port: int, ready_path: str, p: Stub, d: Stub) -> dict[str, tuple[dict, dict, dict]]:
    """Run a balancer command, send one request per route; (prefill body, decode body, decode headers) per route."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    url, out = f"http://127.0.0.1:{port}", {}
    try:
        wait_until(lambda: _status(url + ready_path) == 200, 60, f"{argv[:3]} did not become ready")
        for route, body in CLIENT_BODIES.items():
            for s in (p, d):
                s.state.bodies.clear()
                s.state.headers.clear()
            r = httpx.post(url + route, json=body, headers={"x-request-id": body["rid"]}, timeout=10)
            assert r.status_code == 200, r.text
            wait_until(lambda: p.state.bodies and d.state.bodies, 5, "a worker got nothing")
            out[route] = (p.state.bodies[0], d.state.bodies[0], d.state.headers[0])
    finally:
        proc.terminate()
        proc.wait(20)
    return out


CLIENT_BODIES: dict[str, dict[str, Any]] = {
    "/generate": {"text": "hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0.5}, "rid": "g-1",
                  "stream": False},
    "/v1/chat/completions": {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                             "temperature": 0.5, "rid": "c-1", "stream": False},
}  # fmt: skip


def test_sends_the_same_fields_as_sglang_router() -> None:
    pytest.importorskip("sglang_router")
    p, d = start_stub("prefill"), start_stub("decode")
    bport = random.randrange(1024, 65536)
    try:
        runs = {}
        for name, prog, ready in [
            ("sglang", [sys.executable, "-m", "sglang_router.launch_router"], "/readiness"),
            ("pd", [sys.executable, "-m", "pd", "lb"], "/health"),
        ]:
            port = free_port()
            argv = [*prog, "--pd-disaggregation", "--prefill", p.url, str(bport), "--decode", d.url,
                    "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin"]  # fmt: skip
            if name == "sglang":  # its Prometheus exporter binds 29000 unless told otherwise
                argv += ["--prometheus-port", str(free_port())]
            runs[name] = _collect(argv, port, ready, p, d)
    finally:
        p.server.stop()
        d.server.stop()
    for route, client in CLIENT_BODIES.items():
        (theirs_p, theirs, theirs_h), (ours_p, ours, ours_h) = runs["sglang"][route], runs["pd"][route]
        assert theirs_p == theirs and ours_p == ours  # both send one body to both halves
        for body in (theirs, ours):
            assert isinstance(body["bootstrap_room"], int) and 0 <= body["bootstrap_room"] < 2**63
            assert (body["bootstrap_host"], body["bootstrap_port"]) == ("127.0.0.1", bport)
        renamed, dropped = ROUTER_RENAMED[route], ROUTER_DROPPED[route]
        assert {k: ours[k] for k in client} == client
        assert {renamed.get(k, k): theirs[renamed.get(k, k)] for k in client if k not in dropped} == {
            renamed.get(k, k): v for k, v in client.items() if k not in dropped
        }
        assert set(ours) == set(client) | BOOTSTRAP_FIELDS
        assert set(theirs) - set(ours) == ROUTER_DEFAULT_FIELDS[route] | set(renamed.values())
        assert set(ours) - set(theirs) == dropped | set(renamed)
        assert ours_h["x-request-id"] == theirs_h["x-request-id"] == client["rid"]


if __name__ == "__main__":  # a stub worker in its own process: ROLE PORT KNOBS_JSON
    role, port, knobs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    uvicorn.run(make_stub(StubState(role, **knobs)), host="127.0.0.1", port=port, log_level="error")


def test_abort_and_flush_cache_go_to_every_instance_and_name_the_failing_ones() -> None:
    with cluster(n_prefill=1, n_decode=2) as c:
        r = httpx.post(c.url + "/abort_request", json={"rid": "r-fan"}, timeout=10)
        assert r.status_code == 200, r.text
        assert set(r.json()["workers"]) == {s.url for s in c.prefill + c.decode}
        assert all(s.state.aborts == ["r-fan"] for s in c.prefill + c.decode)
        # The stubs have no /flush_cache (as an older server): reported, not a failure.
        r = httpx.post(c.url + "/flush_cache", timeout=10)
        assert r.status_code == 200 and sorted(r.json()["unsupported"]) == sorted(s.url for s in c.prefill + c.decode)
        # Profiles: each instance's answer (where its traces went) is passed on; the stubs lack /start_profile.
        r = httpx.post(c.url + "/start_profile", json={"num_steps": 3}, timeout=10)
        assert r.status_code == 200 and len(r.json()["unsupported"]) == 3 and "answers" not in r.json()
        r = httpx.post(c.url + "/stop_profile", timeout=10)
        assert r.status_code == 200 and r.json()["answers"] == {
            s.url: f"Stop profiling. This will take some time.\n/traces/{s.state.role}-{id(s.state)}.gz"
            for s in c.prefill + c.decode}  # fmt: skip
        dead = c.decode[1]
        dead.server.stop()
        r = httpx.post(c.url + "/abort_request", json={"rid": "r-2"}, timeout=10)
        assert r.status_code == 502, r.text
        assert dead.url in r.json()["error"]["message"] and c.decode[0].url not in r.json()["error"]["message"]
        assert c.decode[0].state.aborts == ["r-fan", "r-2"]
