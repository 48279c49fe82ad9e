"""The control plane between instances is authenticated when a key is configured, and every socket binds the
configured host (Mooncake's transfer engine excepted, which the instance announces).

Per route: the bootstrap server's GET and PUT /route answer 401 without the key (or with another) and work with
it; each KV control message (RegisterRoom, TransferStatus, AbortRoom) is delivered when signed with the key and
costs the sender its connection otherwise. End to end: a prefill and a decode instance started with --api-key
answer a PD request with HF transformers' greedy tokens, the prefill's bootstrap server refuses /route without
the key, and no listening socket of their processes is wider than 127.0.0.1 except the ports each instance's log
names as such."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import re
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import torch

from kvtransfer.base import KVTransferError
from kvtransfer.bootstrap import BootstrapClient, BootstrapServer
from kvtransfer.control import ControlPool, ControlServer
from kvtransfer.messages import AbortRoom, ControlMessage, RankInfo, RegisterRoom, TransferStatus, rank_info_to_json
from tests.pd_cluster import Proc, serve_argv, start_proc, stop_procs, wait_healthy
from tests.server_process import free_port
from tests.tiny_checkpoints import load_hf, make_checkpoint

HOST = "127.0.0.1"
KEY = "sk-cluster-secret"


def _rank_info() -> RankInfo:
    return RankInfo(0, 1, f"{HOST}:1", f"{HOST}:2", [4096], [64], 16, {"num_layers": 1})


@pytest.fixture
def keyed_bootstrap() -> Iterator[str]:
    server = BootstrapServer(HOST, 0, secret=KEY).start()
    try:
        yield f"http://{HOST}:{server.port}"
    finally:
        server.close()


# ---------------------------------------------------------------- bootstrap routes
@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_bootstrap_route_answers_401_without_the_key_and_works_with_it(keyed_bootstrap: str, method: str) -> None:
    url = f"{keyed_bootstrap}/route"
    body = json.dumps(rank_info_to_json(_rank_info())) if method == "PUT" else None
    for headers in ({}, {"Authorization": "Bearer sk-other"}, {"Authorization": KEY}):
        r = httpx.request(method, url, content=body, headers=headers)
        assert r.status_code == 401 and "--api-key" in r.json()["error"], (headers, r.text)
    if method == "GET":  # something to read: the one rank of a TP-1 instance
        httpx.put(url, content=json.dumps(rank_info_to_json(_rank_info())), headers={"Authorization": f"Bearer {KEY}"})
    r = httpx.request(method, url, content=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    if method == "GET":
        assert r.json()["ranks"] == [rank_info_to_json(_rank_info())]


def test_bootstrap_health_stays_open_and_a_keyless_server_needs_no_key(keyed_bootstrap: str) -> None:
    assert httpx.get(f"{keyed_bootstrap}/health").status_code == 200
    server = BootstrapServer(HOST, 0).start()
    try:
        body = json.dumps(rank_info_to_json(_rank_info()))
        assert httpx.put(f"http://{HOST}:{server.port}/route", content=body).status_code == 200
        assert httpx.get(f"http://{HOST}:{server.port}/route").status_code == 200
    finally:
        server.close()


def test_bootstrap_client_sends_the_key_and_says_what_to_fix_without_it(keyed_bootstrap: str) -> None:
    port = int(keyed_bootstrap.rsplit(":", 1)[1])
    BootstrapClient(timeout_s=5, secret=KEY).put_route(HOST, port, _rank_info())
    assert BootstrapClient(timeout_s=5, secret=KEY).get_route(HOST, port).ranks == {(0, 0): _rank_info()}
    for secret in (None, "sk-other"):
        with pytest.raises(KVTransferError, match="401.*same --api-key"):
            BootstrapClient(timeout_s=5, secret=secret).get_route(HOST, port)
        with pytest.raises(KVTransferError, match="401.*same --api-key"):
            BootstrapClient(timeout_s=5, secret=secret).put_route(HOST, port, _rank_info())


# ---------------------------------------------------------------- KV control messages
def _messages() -> list[ControlMessage]:
    room = random.getrandbits(63)
    return [
        RegisterRoom(room, 0, f"{HOST}:1", f"{HOST}:2", [4096, 8192], [64, 64], 16, [3, 1, 4], 40, {"num_layers": 1}),
        TransferStatus(room, True, "", 17, 40, random.getrandbits(64)),
        AbortRoom(room, "decode aborted"),
    ]


@pytest.mark.parametrize("kind", [type(m).__name__ for m in _messages()])
def test_control_message_is_delivered_only_when_signed_with_the_key(kind: str) -> None:
    msg = next(m for m in _messages() if type(m).__name__ == kind)
    got: queue.Queue[ControlMessage] = queue.Queue()
    server = ControlServer(HOST, 0, got.put, secret=KEY)
    try:
        for secret in (None, "sk-other"):
            lost: queue.Queue[str] = queue.Queue()
            pool = ControlPool(5.0, on_peer_lost=lost.put, secret=secret)
            try:
                pool.send(server.address, msg)
                assert lost.get(timeout=10) == server.address  # the listener hung up on it
                assert got.empty()
            finally:
                pool.close()
        pool = ControlPool(5.0, secret=KEY)
        try:
            pool.send(server.address, msg)
            assert got.get(timeout=10) == msg
        finally:
            pool.close()
    finally:
        server.close()


def test_a_raw_unsigned_frame_is_not_handled_and_closes_the_connection() -> None:
    from kvtransfer.messages import encode_message

    got: list[ControlMessage] = []
    server = ControlServer(HOST, 0, got.append, secret=KEY)
    try:
        host, port = server.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            body = encode_message(_messages()[2])
            s.sendall(struct.pack("!I", len(body)) + body)
            assert s.recv(1) == b""  # closed by the listener
        assert got == []
    finally:
        server.close()


# ---------------------------------------------------------------- a keyed PD deployment
def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets process `pid` listens on, from /proc (address as /proc prints it)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    address, port = fields[1].rsplit(":", 1)
                    out.add((address, int(port, 16)))
    return out


def _process_tree(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                children += _process_tree(int(entry))
    return [pid, *children]


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


@dataclass
class KeyedPair:
    """A prefill (two TP ranks: the follower's PartDone is signed too) and a decode instance started with --api-key
    (no load balancer: the test plays its part)."""

    prefill: Proc
    decode: Proc
    bootstrap_port: int
    model_path: str


@pytest.fixture(scope="module")
def keyed_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedPair]:
    path = make_checkpoint("llama", str(tmp_path_factory.mktemp("keyed") / "llama"))
    ports, bootstrap_port = (free_port(), free_port()), free_port()
    prefill_args = ("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bootstrap_port),
                    "--tp", "2")
    procs = [
        start_proc(f"{mode}-keyed", serve_argv(path, port, *args, "--api-key", KEY), f"http://{HOST}:{port}")
        for mode, port, args in zip(
            ("prefill", "decode"), ports, (prefill_args, ("--disaggregation-mode", "decode")), strict=True
        )
    ]
    try:
        wait_healthy(procs)
        yield KeyedPair(procs[0], procs[1], bootstrap_port, path)
    finally:
        stop_procs(procs)


def test_keyed_pd_request_equals_hf_greedy(keyed_pair: KeyedPair) -> None:
    ids = [random.randrange(256) for _ in range(random.randint(5, 40))]
    # What a PD load balancer sends both halves (pd.lb.request): the same body plus the prefill's bootstrap fields.
    bootstrap = {"bootstrap_host": HOST, "bootstrap_port": keyed_pair.bootstrap_port,
                 "bootstrap_room": random.getrandbits(63)}  # fmt: skip
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0.0}, **bootstrap}

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
            urls = (keyed_pair.prefill.url, keyed_pair.decode.url)
            return await asyncio.gather(*(client.post(f"{u}/generate", json=body) for u in urls))

    prefill, decode = asyncio.run(both())
    logs = keyed_pair.prefill.log()[-2000:] + keyed_pair.decode.log()[-2000:]
    assert prefill.status_code == 200 and decode.status_code == 200, prefill.text + decode.text + logs
    want = load_hf(keyed_pair.model_path).generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert decode.json()["output_ids"] == want[0, len(ids) :].tolist()


def test_keyed_prefill_bootstrap_refuses_route_without_the_key(keyed_pair: KeyedPair) -> None:
    url = f"http://{HOST}:{keyed_pair.bootstrap_port}/route"
    assert httpx.get(url).status_code == 401
    body = json.dumps(rank_info_to_json(_rank_info()))
    assert httpx.put(url, content=body).status_code == 401  # a stranger cannot redirect the route either
    r = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["tp_size"] == 1, r.text


def test_every_listener_binds_the_host_but_the_announced_transfer_engine_ports(keyed_pair: KeyedPair) -> None:
    for proc in (keyed_pair.prefill, keyed_pair.decode):
        wide = {(a, p) for pid in _process_tree(proc.popen.pid) for a, p in _listening(pid) if a not in LOOPBACK}
        announced = re.findall(r"listens on every address, not only 127\.0\.0\.1: ports ([\d, ]+)", proc.log())
        ranks = 2 if proc is keyed_pair.prefill else 1  # one transfer engine per rank
        assert len(announced) == ranks, proc.log()[-3000:]
        announced_ports = {int(p) for line in announced for p in line.split(", ")}
        assert {p for _, p in wide} == announced_ports, (proc.name, wide, announced_ports)
        # and only addresses of every interface, no third address
        assert {a for a, _ in wide} <= {"00000000", "00000000000000000000000000000000"}, wide
