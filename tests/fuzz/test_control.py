"""Fuzzing the control plane between instances: the prefill's bootstrap server (HTTP) and the KV-transfer control
listeners (length-prefixed msgpack frames over TCP).

- A bootstrap server (in a process of its own) with a two-rank route registered: every fuzzed request is answered within
  the client's deadline, below 500, errors as {"error": message}, and a PUT that is refused leaves the registered
  ranks as they were. Each finding also stands as its own test below the fuzz test.
- A control listener in this process: valid messages sent between fuzzed frames (random bytes, random msgpack,
  messages with a missing or mistyped field or an unknown type) on one connection all reach the handler, in order,
  and nothing else does; truncated and oversized frames cost only their own connection.
- The live deployment: fuzzed frames to the prefill's and the decode's listeners and fuzzed requests to the
  prefill's bootstrap server kill no process, and probes keep their tokens throughout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import socket
import struct
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kvtransfer.control import MAX_FRAME_BYTES, ControlServer
from kvtransfer.messages import AbortRoom, RankInfo, RegisterRoom, TransferStatus, decode_message, encode_message
from tests.fuzz.bodies import DEEP, TEXT_EDGES, json_values, keys, odd_paths
from tests.fuzz.deployment import FUZZ, Watch, assert_alive
from tests.pd_cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
IO_DEADLINE_S = 5.0  # a bootstrap answer, or a control message reaching its handler
HEADER = struct.Struct("!I")  # the control channel's frame header: payload length, big-endian
CONTROL_TYPES = (RegisterRoom, TransferStatus, AbortRoom)


# ---------------------------------------------------------------- values by schema
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_value(tp: Any) -> st.SearchStrategy[Any]:
    """Values msgpack carries that have the schema type `tp` (kvtransfer.messages' field annotations)."""
    if tp is bool:
        return st.booleans()
    if tp is int:  # rooms, ranks, pointers, sizes, counts, hashes: all non-negative where they are real
        return st.sampled_from([0, 1, 2**31, 2**63 - 1]) | st.integers(0, 2**63 - 1)
    if tp is str:
        return st.sampled_from([t for t in TEXT_EDGES if "\ud800" not in t and "\udfff" not in t]) | st.text(
            st.characters(codec="utf-8"), max_size=12
        )
    if typing.get_origin(tp) is list:
        return st.lists(valid_value(typing.get_args(tp)[0]), max_size=6)
    if typing.get_origin(tp) is dict:
        return st.dictionaries(st.text(max_size=6), valid_value(int) | st.text(max_size=6) | st.booleans(), max_size=3)
    if dataclasses.is_dataclass(tp):  # a nested record (RegisterRoom.peers' KVTarget), as the wire carries it
        hints = _hints(tp)
        return st.fixed_dictionaries({f.name: valid_value(hints[f.name]) for f in dataclasses.fields(tp)})
    raise AssertionError(f"no strategy for schema type {tp}")


def wrong_value(tp: Any) -> st.SearchStrategy[Any]:
    """Values of another type than `tp`, as the schema reads it (a bool is not an int, bytes are not a str)."""
    if tp is bool:
        return st.sampled_from([0, 1, "true", None, 1.0])
    if tp is int:
        return st.sampled_from(["1", 1.5, None, [1], True, b"\x01", {"a": 1}])
    if tp is str:
        return st.sampled_from([1, None, ["a"], b"127.0.0.1:1", 1.5, True])
    if typing.get_origin(tp) is list:
        return st.sampled_from(["1,2", [1.5], ["a"], [True], {"a": 1}, None, [[1]]])
    return st.sampled_from([[], "x", 1, None, [["a", 1]]])


@st.composite
def message_fields(draw: st.DrawFn, cls: type) -> dict[str, Any]:
    """Every field of control message `cls` with a valid value, plus its type tag."""
    hints = _hints(cls)
    fields = {f.name: draw(valid_value(hints[f.name])) for f in dataclasses.fields(cls)}
    return {"type": cls.TYPE, **fields}


def valid_messages() -> st.SearchStrategy[Any]:
    """Control messages as the dataclasses build them (whatever their field values mean to a receiver)."""
    return st.sampled_from(CONTROL_TYPES).flatmap(
        lambda cls: message_fields(cls).map(lambda d: decode_message(msgpack.packb(d, use_bin_type=True)))
    )


@st.composite
def invalid_payload(draw: st.DrawFn) -> bytes:
    """A frame payload that is not a valid control message, by construction."""
    how = draw(st.sampled_from(["bytes", "msgpack", "mistyped", "missing", "unknown_type", "not_a_map", "trailing"]))
    if how == "bytes":
        raw = draw(st.binary(max_size=64))
        try:
            obj = msgpack.unpackb(raw, raw=False)
        except Exception:
            return raw
        # Random bytes that happen to decode to a tagged map would be judged by the schema itself: keep them out.
        return raw if not (isinstance(obj, dict) and "type" in obj) else b"\xc1"
    if how == "msgpack":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict) or "type" not in v))
        try:
            return msgpack.packb(value, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            return b"\xc1"  # never used by msgpack
    cls = draw(st.sampled_from(CONTROL_TYPES))
    fields = draw(message_fields(cls))
    if how == "not_a_map":
        return msgpack.packb(list(fields.values()), use_bin_type=True)
    if how == "trailing":
        return msgpack.packb(fields, use_bin_type=True) + b"\x00"
    if how == "unknown_type":
        known = {c.TYPE for c in CONTROL_TYPES}
        odd = st.sampled_from([None, 1, "", "REGISTER", "register ", "rank_info"]) | st.text(max_size=8)
        fields["type"] = draw(odd.filter(lambda t: t not in known))
        return msgpack.packb(fields, use_bin_type=True)
    hints = _hints(cls)
    name = draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]))
    if how == "missing":
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        del fields[draw(st.sampled_from(required))]
    else:
        fields[name] = draw(wrong_value(hints[name]))
    return msgpack.packb(fields, use_bin_type=True)


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


# ---------------------------------------------------------------- a control listener in this process
class Recorder:
    """A ControlServer whose handler records what it is given."""

    def __init__(self) -> None:
        self.got: list[Any] = []
        self.server = ControlServer("127.0.0.1", 0, self.got.append)
        host, port = self.server.address.rsplit(":", 1)
        self.addr = (host, int(port))

    def wait_for(self, msg: Any) -> None:
        deadline = time.monotonic() + IO_DEADLINE_S
        while msg not in self.got:
            assert time.monotonic() < deadline, f"{msg} did not reach the handler within {IO_DEADLINE_S:g} s"
            time.sleep(0.005)


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.server.close()


Chunk = tuple[str, Any]  # ("valid", message) | ("invalid", payload bytes)
chunks = st.lists(
    st.tuples(st.just("valid"), valid_messages()) | st.tuples(st.just("invalid"), invalid_payload()), max_size=10
)


@settings(FUZZ, max_examples=200)
@given(chunks, st.sampled_from(["none", "truncated", "oversized", "header_only"]))
def test_control_listener_hands_over_exactly_the_valid_messages_between_fuzzed_frames(
    recorder: Recorder, sent: list[Chunk], side_connection: str
) -> None:
    recorder.got.clear()
    end = AbortRoom(2**62, f"end of {len(sent)} chunks")
    with socket.create_connection(recorder.addr, timeout=IO_DEADLINE_S) as conn:
        for kind, item in sent:
            conn.sendall(frame(encode_message(item) if kind == "valid" else item))
            if side_connection != "none":  # another connection breaks off between two of this one's frames
                with socket.create_connection(recorder.addr, timeout=IO_DEADLINE_S) as side:
                    if side_connection == "truncated":
                        side.sendall(HEADER.pack(100) + b"\x81\xa4type")
                    elif side_connection == "header_only":
                        side.sendall(HEADER.pack(8)[:2])
                    else:  # the listener drops a connection that announces more than MAX_FRAME_BYTES
                        side.sendall(HEADER.pack(MAX_FRAME_BYTES + 1) + b"\x80")
                        try:
                            assert side.recv(1) == b"", "an oversized frame did not cost its connection"
                        except ConnectionResetError:
                            pass
        conn.sendall(frame(encode_message(end)))
        recorder.wait_for(end)
    assert recorder.got == [item for kind, item in sent if kind == "valid"] + [end]


# ---------------------------------------------------------------- a bootstrap server in this process
def rank_info(engine_rank: int, tp_size: int = 2) -> dict[str, Any]:
    return dataclasses.asdict(RankInfo(engine_rank, tp_size, f"127.0.0.1:{1000 + engine_rank}", "127.0.0.1:2000",
                                       [4096 * (engine_rank + 1)], [64], 4, {"model": "m", "layers": 2}))  # fmt: skip


@contextlib.contextmanager
def bootstrap_server() -> Iterator[str]:
    """A bootstrap server in its own process (what the fuzz does to it must not touch this one's interpreter: a
    RecursionError in a handler thread upsets CPython 3.11's AST parser, which pytest then needs); yields its URL."""
    code = ("import sys, threading; from kvtransfer.bootstrap import BootstrapServer; "
            "s = BootstrapServer('127.0.0.1', 0).start(); print(s.port, flush=True); sys.stdin.read()")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=REPO)  # fmt: skip
    try:
        assert proc.stdout is not None
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def bootstrap() -> Iterator[str]:
    """A bootstrap server holding the full route of a two-rank prefill instance; yields its base URL."""
    with bootstrap_server() as url:
        for rank in (0, 1):
            assert httpx.put(url + "/route", json=rank_info(rank), timeout=IO_DEADLINE_S).status_code == 200
        yield url


RANK_FIELDS = [f.name for f in dataclasses.fields(RankInfo)]
# Sizes stay small: a size that disagrees with the registered ranks is refused, and one for a registered rank is
# the same size, so GET /route after each example never has to list a huge number of missing ranks.
SMALL_INTS = st.sampled_from([0, 1, 2, 3, -1, 4096, 2**31, 2**64]) | st.integers(-3, 5)


@st.composite
def bootstrap_requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """(method, path, body) for a bootstrap server: mostly PUT /route with a rank-info body that has 0-3 fields set
    to an edge value, a random JSON value or deleted, then encoded as is, truncated, or replaced."""
    method = draw(st.sampled_from(["PUT"] * 5 + ["GET", "POST", "DELETE", "HEAD", "PATCH", "OPTIONS"]))
    path = draw(st.sampled_from(["/route"] * 4 + ["/health", "/route?x=1", "/route/"]) | odd_paths)
    body: Any = rank_info(draw(st.sampled_from([0, 1])))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(RANK_FIELDS) | keys)
        action = draw(st.sampled_from(["small", "any", "delete"]))
        if action == "delete":
            body.pop(name, None)
        else:
            body[name] = draw(SMALL_INTS if action == "small" else json_values)
    how = draw(st.sampled_from(["as_is"] * 6 + ["truncated", "random", "empty", "list", "bad_utf8"]))
    text = json.dumps(body)
    raw = {"as_is": text.encode(), "truncated": text[: len(text) // 2].encode(), "random": draw(st.binary(max_size=40)),
           "empty": b"", "list": json.dumps([body]).encode(), "bad_utf8": b"\xff" + text.encode()}[how]  # fmt: skip
    return method, path, raw


def current_route(url: str) -> dict[str, Any]:
    r = httpx.get(url + "/route", timeout=IO_DEADLINE_S)
    assert r.status_code == 200, r.text
    return r.json()


def assert_bootstrap_answer(r: httpx.Response, method: str, where: str) -> None:
    assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:500]}"
    if r.status_code >= 400 and method != "HEAD":
        assert isinstance(r.json().get("error"), str) and r.json()["error"], f"{where}: {r.text[:500]}"


def test_bootstrap_server_answers_fuzzed_requests_below_500_and_refusals_change_no_rank(bootstrap: str) -> None:
    registered = current_route(bootstrap)
    client = httpx.Client(timeout=IO_DEADLINE_S)

    @settings(FUZZ, max_examples=100)
    @given(bootstrap_requests())
    @example(("PUT", "/route", b"[" * 100_000))  # answered nothing: RecursionError in the handler thread
    @example(("POST", "/route", json.dumps(rank_info(0)).encode()))  # answered 501
    def fuzz(req: tuple[str, str, bytes]) -> None:
        method, path, raw = req
        where = f"{method} {path} {raw[:300]!r}"
        try:
            r = client.request(method, bootstrap + path, content=raw)
        except httpx.HTTPError as e:
            raise AssertionError(f"{where}: no answer ({type(e).__name__}: {e})") from None
        assert_bootstrap_answer(r, method, where)
        if method == "PUT" and r.status_code == 200:  # a rank re-registered (as after a restart): put it back
            key = json.loads(raw)["engine_rank"]
            assert client.put(bootstrap + "/route", json=rank_info(key)).status_code == 200
        assert current_route(bootstrap) == registered, where

    with client:
        fuzz()


def _raw_put(url: str, head: bytes, body: bytes = b"") -> bytes:
    """The first bytes of the bootstrap server's answer to a hand-made PUT /route; b"" if it closed the connection
    without one. The connection stays open (nothing more is sent) while the answer is awaited."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=IO_DEADLINE_S) as conn:
        conn.sendall(b"PUT /route HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + head + b"\r\n" + body)
        try:
            return conn.recv(200)
        except TimeoutError:
            raise AssertionError(f"no answer within {IO_DEADLINE_S:g} s to a PUT with {head!r}") from None


def test_bootstrap_put_nested_past_the_recursion_limit_answers_400(bootstrap: str) -> None:
    """Finding: json.loads raises RecursionError, which the handler does not catch: the client got no answer at
    all and the prefill's log a traceback."""
    for depth in DEEP:
        r = httpx.put(bootstrap + "/route", content=b"[" * depth + b"]" * depth, timeout=IO_DEADLINE_S)
        assert r.status_code == 400 and "error" in r.json(), (depth, r.text)
    assert current_route(bootstrap)["tp_size"] == 2


@pytest.mark.parametrize("length", [b"-1", b"1099511627776"])
def test_bootstrap_put_with_a_content_length_it_cannot_take_answers_4xx_at_once(bootstrap: str, length: bytes) -> None:
    """Finding: -1 made the handler read until the client closed the connection (a hang as long as the client
    waits); 2**40 made it allocate the whole length first (MemoryError, no answer)."""
    answer = _raw_put(bootstrap, b"Content-Length: " + length + b"\r\n", b"{}")
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer


def test_bootstrap_put_claiming_a_huge_tp_size_is_refused() -> None:
    """Finding: a rank claiming tp_size 2**40 was stored, after which GET /route tried to list the 2**40 missing
    ranks in its error message (memory without bound). GET is not asked here: before the fix it would not return."""
    with bootstrap_server() as url:
        r = httpx.put(url + "/route", json=rank_info(0, tp_size=2**40), timeout=IO_DEADLINE_S)
        assert 400 <= r.status_code < 500 and "tp_size" in r.json()["error"], r.text


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH"])
def test_bootstrap_unsupported_methods_answer_405(bootstrap: str, method: str) -> None:
    """Finding: http.server answers a method without a do_<METHOD> handler with 501 and an HTML page."""
    r = httpx.request(method, bootstrap + "/route", json=rank_info(0), timeout=IO_DEADLINE_S)
    assert r.status_code == 405 and "error" in r.json(), r.text


# ---------------------------------------------------------------- the live deployment
def control_addr(cluster: Cluster, role: str) -> tuple[str, int]:
    """Rank 0's control listener of the `role` instance, from its start-up log line."""
    proc = (cluster.prefill if role == "prefill" else cluster.decode)[0]
    found = re.search(rf"KV {role} manager rank 0: control (\S+?):(\d+),", proc.log())
    assert found, f"no control address in the {role} log"
    return found[1], int(found[2])


@st.composite
def live_frames(draw: st.DrawFn) -> list[bytes]:
    """Frames for one connection to a live listener: fuzzed payloads and valid messages for random rooms (the
    balancer's rooms are uniformly random 63-bit numbers, so these never name a probe's room), possibly ending in
    a truncated or oversized frame."""
    items = draw(st.lists(valid_messages().map(encode_message) | invalid_payload(), max_size=6))
    out = [frame(p) for p in items]
    tail = draw(st.sampled_from(["", "", "truncated", "oversized"]))
    if tail == "truncated":
        out.append(HEADER.pack(64) + b"\x81")
    elif tail == "oversized":
        out.append(HEADER.pack(MAX_FRAME_BYTES + 1))
    return out


def test_live_control_plane_survives_fuzzed_frames_and_requests_and_probes_keep_their_tokens(
    fuzz_cluster: Cluster, watch: Watch
) -> None:
    listeners = [control_addr(fuzz_cluster, "prefill"), control_addr(fuzz_cluster, "decode")]
    bootstrap_url = f"http://127.0.0.1:{fuzz_cluster.bootstrap_ports[0]}"
    client = httpx.Client(timeout=IO_DEADLINE_S)

    @settings(FUZZ, max_examples=150)
    @given(st.sampled_from([0, 1]), live_frames(), json_values)
    def fuzz(which: int, frames: list[bytes], route_body: Any) -> None:
        with socket.create_connection(listeners[which], timeout=IO_DEADLINE_S) as conn:
            for f in frames:
                conn.sendall(f)
        # The live bootstrap server gets JSON that cannot be a rank (a full rank would replace the real one: without
        # a cluster key that is allowed, as after a restart).
        r = client.put(bootstrap_url + "/route", content=json.dumps(route_body).encode())
        assert_bootstrap_answer(r, "PUT", f"PUT /route {route_body!r}")
        assert_alive(fuzz_cluster)

    with client, watch:
        fuzz()
        time.sleep(0.5)  # the listeners' reader threads finish with the last frames before the cluster is judged
