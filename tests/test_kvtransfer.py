"""KV transfer layer: page coalescing, message schemas, bootstrap server, and the Mooncake backend between a real
prefill process and a decode (this) process over loopback TCP.

The byte-level oracle is a per-page torch copy written here; fresh random buffers and page lists every run.
"""

from __future__ import annotations

import faulthandler
import json
import multiprocessing as mp
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from kvtransfer.base import FirstToken, KVArgs, KVPoll, KVTransferError
from kvtransfer.bootstrap import BootstrapClient, BootstrapServer
from kvtransfer.messages import (
    AbortRoom,
    RankInfo,
    RegisterRoom,
    TransferStatus,
    decode_message,
    encode_message,
    layout_mismatch,
    rank_info_from_json,
    rank_info_to_json,
)
from kvtransfer.pages import page_runs, transfer_regions

pytest.importorskip("mooncake.engine", reason="needs mooncake-transfer-engine")

HOST = "127.0.0.1"
DONE = (KVPoll.Success, KVPoll.Failed)


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    # Every wait below has its own deadline; this is the backstop that turns a hang into a traceback.
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# ---- KV buffers both processes build the same way ------------------------------------------------------------


def make_buffers(seed: int, num_layers: int, item_lens: tuple[int, int], num_pages: int, page_size: int,
                 fill: bool) -> list[torch.Tensor]:
    """Layer-major uint8 buffers [num_pages * page_size * item_len], two per layer (K-like and V-like sizes)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (num_pages * page_size * il,), dtype=torch.uint8, generator=gen) if fill
            else torch.zeros(num_pages * page_size * il, dtype=torch.uint8)
            for _ in range(num_layers) for il in item_lens]


def kv_args(bufs: list[torch.Tensor], num_layers: int, item_lens: tuple[int, int], page_size: int) -> KVArgs:
    fingerprint = {"architecture": "TestMoE", "num_layers": num_layers, "dtype": "uint8"}
    return KVArgs(0, [b.data_ptr() for b in bufs], list(item_lens) * num_layers, page_size, fingerprint,
                  [b.numel() for b in bufs])


def _prefill_main(cfg: dict[str, Any], cmds: Any, out: Any) -> None:
    """A prefill rank: serves bootstrap, creates senders on command, sends when decode has registered."""
    from kvtransfer.mooncake import MooncakeKVManager, MooncakeKVSender

    bufs = make_buffers(cfg["seed"], cfg["layers"], cfg["item_lens"], cfg["pages"], cfg["page_size"], True)
    mgr = MooncakeKVManager(kv_args(bufs, cfg["layers"], cfg["item_lens"], cfg["page_size"]), "prefill", HOST,
                            (HOST, 0), serve_bootstrap=True, bootstrap_timeout_s=cfg["bootstrap_timeout"],
                            transfer_timeout_s=10.0, max_pending_rooms=cfg.get("max_pending_rooms", 4096))
    assert mgr.bootstrap is not None
    out.put(("ready", mgr.bootstrap[1]))
    senders: dict[int, MooncakeKVSender] = {}
    to_send: dict[int, tuple[list[int], int, int]] = {}
    while True:
        try:
            cmd = cmds.get(timeout=0.002)
        except queue.Empty:
            cmd = None
        if cmd is not None:
            if cmd[0] == "stop":
                break
            room = cmd[1]
            if room not in senders and cmd[0] in ("create", "send"):
                senders[room] = MooncakeKVSender(mgr, room)
                out.put(("created", room, int(senders[room].poll())))
            if cmd[0] == "send":
                to_send[room] = cmd[2]
            elif cmd[0] == "state":
                out.put(("state", room, int(senders[room].poll())))
            elif cmd[0] == "abort":
                senders.pop(room).abort()
                out.put(("aborted", room))
        for room, sender in list(senders.items()):
            state = sender.poll()
            if state == KVPoll.WaitingForInput and room in to_send:
                pages, num_tokens, token = to_send.pop(room)
                sender.send(pages, num_tokens, FirstToken(token, num_tokens))
            elif state in DONE:
                out.put(("done", room, int(state), sender.failure_reason))
                del senders[room]
    mgr.close()


class PrefillPeer:
    """Handle on a spawned prefill process."""

    def __init__(self, **overrides: Any) -> None:
        self.cfg: dict[str, Any] = dict(seed=random.randrange(2**31), layers=3, item_lens=(96, 40), pages=64,
                                        page_size=4, bootstrap_timeout=5.0) | overrides
        ctx = mp.get_context("spawn")
        self.cmds, self.out = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_prefill_main, args=(self.cfg, self.cmds, self.out), daemon=True)
        self.proc.start()
        self.port = self.expect("ready", timeout=60)[1]
        self.bufs = make_buffers(self.cfg["seed"], self.cfg["layers"], self.cfg["item_lens"], self.cfg["pages"],
                                 self.cfg["page_size"], True)  # the same bytes the child holds

    def expect(self, kind: str, timeout: float = 20.0) -> tuple:
        msg = self.out.get(timeout=timeout)
        assert msg[0] == kind, f"expected {kind}, prefill said {msg}"
        return msg

    def close(self) -> None:
        if self.proc.is_alive():
            self.cmds.put(("stop",))
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def decode_manager(peer: PrefillPeer, **overrides: Any) -> tuple[Any, list[torch.Tensor]]:
    """A decode manager in this process with peer's layout (or overrides) over fresh random buffers."""
    from kvtransfer.mooncake import MooncakeKVManager

    c = peer.cfg | {k: v for k, v in overrides.items() if k in peer.cfg}
    bufs = make_buffers(random.randrange(2**31), c["layers"], c["item_lens"], c["pages"], c["page_size"], True)
    mgr = MooncakeKVManager(kv_args(bufs, c["layers"], c["item_lens"], c["page_size"]), "decode", HOST,
                            bootstrap_timeout_s=overrides.get("bootstrap_timeout", 10.0),
                            transfer_timeout_s=overrides.get("transfer_timeout", 10.0))
    return mgr, bufs


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def prefill() -> Iterator[PrefillPeer]:
    peer = PrefillPeer()
    yield peer
    peer.close()


# ---- pages.py -------------------------------------------------------------------------------------------------


def _random_mapping(rng: random.Random, num_pages: int) -> tuple[list[int], list[int]]:
    """Page lists with runs of random length on both sides, so coalescing has something to find."""
    n = rng.randrange(0, num_pages // 2)
    src = sorted(rng.sample(range(num_pages), n)) if rng.random() < 0.5 else rng.sample(range(num_pages), n)
    dst = sorted(rng.sample(range(num_pages), n))
    return src, dst


@pytest.mark.parametrize("seed", range(20))
def test_coalesced_regions_copy_the_same_bytes_as_per_page_copies(seed: int) -> None:
    rng = random.Random(seed * 7919 + random.randrange(1000))
    num_pages, page_size, item_lens = 64, rng.choice([1, 4, 16]), [rng.choice([2, 6, 8]) for _ in range(4)]
    src_pages, dst_pages = _random_mapping(rng, num_pages)
    buf_bytes = [num_pages * page_size * il for il in item_lens]
    src_base = np.cumsum([0] + buf_bytes[:-1]).tolist()
    dst_base = (np.cumsum([0] + buf_bytes[:-1]) + 5).tolist()  # a different layout on the destination
    src_mem = np.random.default_rng(seed).integers(0, 256, sum(buf_bytes), dtype=np.uint8)

    expected = np.zeros(sum(buf_bytes) + 5, dtype=np.uint8)  # naive: one copy per page per buffer
    for b, il in enumerate(item_lens):
        pb = il * page_size
        for s, d in zip(src_pages, dst_pages, strict=True):
            expected[dst_base[b] + d * pb: dst_base[b] + (d + 1) * pb] = src_mem[src_base[b] + s * pb:
                                                                                 src_base[b] + (s + 1) * pb]
    got = np.zeros_like(expected)
    srcs, dsts, lens = transfer_regions(src_base, dst_base, item_lens, page_size, src_pages, dst_pages)
    for s, d, n in zip(srcs, dsts, lens, strict=True):
        got[d: d + n] = src_mem[s: s + n]
    np.testing.assert_array_equal(got, expected)

    # The number of regions is the number of maximal runs, counted here by a plain walk.
    runs = sum(1 for i in range(len(src_pages))
               if i == 0 or src_pages[i] != src_pages[i - 1] + 1 or dst_pages[i] != dst_pages[i - 1] + 1)
    assert len(srcs) == runs * len(item_lens)
    assert int(page_runs(src_pages, dst_pages)[2].sum()) == len(src_pages)


# ---- messages.py ----------------------------------------------------------------------------------------------


def test_messages_round_trip_and_invalid_ones_are_rejected() -> None:
    reg = RegisterRoom(2**63 - 1, 0, "h:1", "h:2", [2**47, 8], [64, 32], 16, [3, 1], 20, {"num_layers": 2})
    for msg in (reg, TransferStatus(5, True, "", 17, 20), AbortRoom(5, "gone")):
        assert decode_message(encode_message(msg)) == msg
    good = json.loads(json.dumps(rank_info_to_json(RankInfo(0, 1, "h:1", "h:2", [1], [2], 4, {}))))
    assert good["page_size"] == 4
    import msgpack

    bad = [b"\xc1garbage", msgpack.packb({"type": "nope", "room": 1}), msgpack.packb([1, 2]),
           msgpack.packb({"type": "abort", "room": 1}),  # missing reason
           msgpack.packb({"type": "abort", "room": "1", "reason": ""}),  # room of the wrong type
           msgpack.packb({"type": "status", "room": 1, "ok": 1, "reason": "", "first_token": 1,
                          "prompt_tokens": 1})]  # ok must be a bool
    for data in bad:
        with pytest.raises(KVTransferError):
            decode_message(data)


def test_layout_mismatch_names_both_values_and_ignores_tuple_vs_list() -> None:
    fp = {"architecture": "M", "kv_layout": ((2, 64), (2, 64))}
    assert layout_mismatch((16, [256, 256], fp), (16, [256, 256], json.loads(json.dumps(fp)))) is None
    assert layout_mismatch((16, [256, 256], fp), (16, [256, 128], fp)) == (
        "bytes per token of KV buffer 1 prefill=256 decode=128")
    assert layout_mismatch((16, [256], {**fp, "dtype": "bfloat16"}), (8, [256, 256], {**fp, "dtype": "float16"})) == (
        "dtype prefill='bfloat16' decode='float16'; page_size prefill=16 decode=8; "
        "number of KV buffers prefill=1 decode=2")


# ---- bootstrap.py ---------------------------------------------------------------------------------------------


def _info(rank: int, tp: int, dp_rank: int = 0, dp_size: int = 1) -> RankInfo:
    port = 1000 + 10 * dp_rank + rank
    return RankInfo(rank, tp, f"{HOST}:{port}", f"{HOST}:{port + 1000}", [4096 * rank], [64], 16, {"num_layers": 2},
                    dp_rank, dp_size)


def test_bootstrap_get_before_any_put_is_a_clear_error() -> None:
    server = BootstrapServer(HOST, 0).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{HOST}:{server.port}/route", timeout=5)
        assert e.value.code == 503
        assert "no prefill rank has registered" in json.loads(e.value.read())["error"]
        with pytest.raises(KVTransferError, match="no prefill rank has registered"):
            BootstrapClient(timeout_s=5).get_route(HOST, server.port, timeout_s=0.3)
        assert BootstrapClient().health(HOST, server.port)
    finally:
        server.close()
    with pytest.raises(KVTransferError, match="unreachable"):
        BootstrapClient(timeout_s=1).get_route(HOST, server.port)


@pytest.mark.parametrize(("tp", "dp"), [(4, 1), (2, 3)])
def test_bootstrap_concurrent_puts_and_gets_see_every_rank(tp: int, dp: int) -> None:
    server = BootstrapServer(HOST, 0).start()
    results: list[object] = []
    try:
        def put(rank: int, dp_rank: int) -> None:
            BootstrapClient(timeout_s=5).put_route(HOST, server.port, _info(rank, tp, dp_rank, dp))

        def get() -> None:
            try:  # each thread its own client: no cache shared between them
                results.append(BootstrapClient(timeout_s=10).get_route(HOST, server.port))
            except Exception as e:
                results.append(e)

        threads = [threading.Thread(target=get) for _ in range(8)] + [
            threading.Thread(target=put, args=(r, d)) for d in range(dp) for r in range(tp)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert len(results) == 8
        for route in results:
            assert not isinstance(route, Exception), route
            assert (route.tp_size, route.dp_size) == (tp, dp)
            assert route.ranks == {(d, r): _info(r, tp, d, dp) for d in range(dp) for r in range(tp)}
            for room in (0, 7, 2**63 - 1):  # the DP group the prefill front sends room to: room % dp
                assert route.rank_for(room, tp - 1) == _info(tp - 1, tp, room % dp, dp)
        with pytest.raises(KVTransferError, match=f"tp_size {tp + 1}, dp_size {dp} disagree"):
            BootstrapClient(timeout_s=5).put_route(HOST, server.port, _info(1, tp + 1, 0, dp))
        with pytest.raises(KVTransferError, match=f"tp_size {tp}, dp_size {dp + 1} disagree"):
            BootstrapClient(timeout_s=5).put_route(HOST, server.port, _info(0, tp, 0, dp + 1))
        with pytest.raises(KVTransferError, match=f"dp_rank {dp} is outside dp_size {dp}"):
            BootstrapClient(timeout_s=5).put_route(HOST, server.port, _info(0, tp, dp, dp))
        req = urllib.request.Request(f"http://{HOST}:{server.port}/route", data=b'{"engine_rank": 0}', method="PUT")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 400 and "missing field" in json.loads(e.value.read())["error"]
    finally:
        server.close()


def test_bootstrap_waits_for_every_dp_group_and_names_the_missing_ranks() -> None:
    server = BootstrapServer(HOST, 0).start()
    try:
        client = BootstrapClient(timeout_s=5)
        for rank in range(2):
            client.put_route(HOST, server.port, _info(rank, 2, 1, 2))  # DP group 1 only
        with pytest.raises(KVTransferError, match=r"prefill ranks \[\(0, 0\), \(0, 1\)\] \(DP group, rank\)"):
            client.get_route(HOST, server.port, timeout_s=0.3)
        # an announcement without the DP fields (a peer without DP attention) is group 0 of 1
        legacy = {k: v for k, v in rank_info_to_json(_info(0, 2)).items() if k not in ("dp_rank", "dp_size")}
        assert rank_info_from_json(legacy) == _info(0, 2)
    finally:
        server.close()


# ---- Mooncake backend: a prefill process and this (decode) process ------------------------------------------


def receiver(mgr: Any, peer: PrefillPeer, room: int) -> Any:
    from kvtransfer.mooncake import MooncakeKVReceiver

    return MooncakeKVReceiver(mgr, HOST, peer.port, room)


def sender_state(peer: PrefillPeer, room: int) -> KVPoll:
    peer.cmds.put(("state", room))
    return KVPoll(peer.expect("state")[2])


def copied_pages(before: list[torch.Tensor], src: list[torch.Tensor], item_lens: list[int], page_size: int,
                 moves: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """Oracle: `before` with every (src page -> dst page) of every move copied page by page."""
    out = [b.clone() for b in before]
    for b, il in enumerate(item_lens):
        pb = il * page_size
        for src_pages, dst_pages in moves:
            for s, d in zip(src_pages, dst_pages, strict=True):
                out[b][d * pb:(d + 1) * pb] = src[b][s * pb:(s + 1) * pb]
    return out


@pytest.mark.parametrize("page_size", [4, 16])
def test_many_concurrent_rooms_land_byte_exact_in_decode_pages(prefill: PrefillPeer, page_size: int) -> None:
    peer = prefill if page_size == prefill.cfg["page_size"] else PrefillPeer(page_size=page_size)
    mgr, dbufs = decode_manager(peer)
    try:
        before = [b.clone() for b in dbufs]
        rng, num_pages, ps = random.Random(), peer.cfg["pages"], page_size
        src_free, dst_free = rng.sample(range(num_pages), num_pages), rng.sample(range(num_pages), num_pages)
        rooms: dict[int, tuple[list[int], list[int], int, int]] = {}  # room -> (src, dst, num_tokens, token)
        while len(rooms) < 12:
            n = rng.randint(1, 5)
            src, dst = [src_free.pop() for _ in range(n)], [dst_free.pop() for _ in range(n)]
            if rng.random() < 0.3:  # some runs contiguous on both sides, so coalescing has work to do
                src, dst = sorted(src), sorted(dst)
            rooms[rng.getrandbits(63)] = (src, dst, (n - 1) * ps + rng.randint(1, ps), rng.randrange(50_000))
        early = list(rooms)[::2]  # these senders exist before decode registers; the rest after
        for room in early:
            peer.cmds.put(("create", room))
            assert peer.expect("created")[2] == KVPoll.Bootstrapping
        receivers = {room: receiver(mgr, peer, room) for room in rooms}
        for room, (_, dst, num_tokens, _) in rooms.items():
            receivers[room].init(dst, num_tokens)
        wait_for(lambda: all(r.poll() in (KVPoll.Transferring, KVPoll.Success) for r in receivers.values()), 20,
                 f"registrations: {[(r.poll().name, r.failure_reason) for r in receivers.values()]}")
        for room, (src, _, num_tokens, token) in rooms.items():
            peer.cmds.put(("send", room, (src, num_tokens, token)))
        wait_for(lambda: all(r.poll() in DONE for r in receivers.values()), 30, "transfers")

        prefill_done = {}
        while len(prefill_done) < len(rooms):
            msg = peer.out.get(timeout=20)
            if msg[0] == "done":
                prefill_done[msg[1]] = (KVPoll(msg[2]), msg[3])
        for room, (_, _, num_tokens, token) in rooms.items():
            r = receivers[room]
            assert r.poll() == KVPoll.Success, r.failure_reason
            assert r.result() == FirstToken(token, num_tokens)
            assert prefill_done[room] == (KVPoll.Success, None)
        expected = copied_pages(before, peer.bufs, mgr.args.kv_item_lens, ps,
                                [(src, dst) for src, dst, _, _ in rooms.values()])
        for b, (got, want) in enumerate(zip(dbufs, expected, strict=True)):
            assert torch.equal(got, want), f"buffer {b} differs from the per-page oracle"
    finally:
        mgr.close()
        if peer is not prefill:
            peer.close()


def test_registration_kept_for_a_sender_created_later_and_delivered_to_an_existing_one(prefill: PrefillPeer) -> None:
    mgr, dbufs = decode_manager(prefill)
    try:
        before, ps = [b.clone() for b in dbufs], prefill.cfg["page_size"]
        room_a, room_b = random.getrandbits(63), random.getrandbits(63)
        prefill.cmds.put(("create", room_a))
        assert prefill.expect("created")[2] == KVPoll.Bootstrapping
        ra, rb = receiver(mgr, prefill, room_a), receiver(mgr, prefill, room_b)
        rb.init([9, 2], ps + 1)
        wait_for(lambda: rb.poll() == KVPoll.Transferring, 10, f"room b's registration: {rb.failure_reason}")
        ra.init([5], 3)
        wait_for(lambda: ra.poll() == KVPoll.Transferring, 10, f"room a's registration: {ra.failure_reason}")
        # Both went down one connection, b first, and the prefill handles frames in order: once a's sender has
        # its registration, b's registration is waiting for a sender that does not exist yet.
        wait_for(lambda: sender_state(prefill, room_a) == KVPoll.WaitingForInput, 10, "room a's registration")
        prefill.cmds.put(("create", room_b))
        assert prefill.expect("created")[2] == KVPoll.WaitingForInput
        prefill.cmds.put(("send", room_a, ([40], 3, 11)))
        prefill.cmds.put(("send", room_b, ([41, 7], ps + 1, 12)))
        wait_for(lambda: ra.poll() in DONE and rb.poll() in DONE, 20, "transfers")
        assert (ra.poll(), rb.poll()) == (KVPoll.Success, KVPoll.Success), (ra.failure_reason, rb.failure_reason)
        assert (ra.result(), rb.result()) == (FirstToken(11, 3), FirstToken(12, ps + 1))
        assert {prefill.expect("done")[1], prefill.expect("done")[1]} == {room_a, room_b}
        expected = copied_pages(before, prefill.bufs, mgr.args.kv_item_lens, ps, [([40], [5]), ([41, 7], [9, 2])])
        assert all(torch.equal(g, w) for g, w in zip(dbufs, expected, strict=True))
    finally:
        mgr.close()


def test_incompatible_layouts_fail_at_handshake_naming_both_values() -> None:
    peer = PrefillPeer(page_size=16, layers=3)
    try:
        cases = [({"page_size": 4}, "page_size prefill=16 decode=4"), ({"layers": 2}, "num_layers prefill=3 decode=2")]
        for overrides, expected in cases:
            mgr, _ = decode_manager(peer, bootstrap_timeout=30.0, transfer_timeout=30.0, **overrides)
            try:
                t0 = time.monotonic()
                r = receiver(mgr, peer, random.getrandbits(63))
                r.init([1], 1)
                wait_for(lambda r=r: r.poll() in DONE, 5, "the handshake verdict")
                assert r.poll() == KVPoll.Failed and expected in (r.failure_reason or ""), r.failure_reason
                assert time.monotonic() - t0 < 5  # a verdict at handshake, not the 30 s timeouts
            finally:
                mgr.close()
    finally:
        peer.close()


def test_prefill_killed_before_send_fails_the_receiver_before_its_timeout() -> None:
    peer = PrefillPeer()
    mgr, _ = decode_manager(peer, transfer_timeout=8.0)
    try:
        r = receiver(mgr, peer, random.getrandbits(63))
        r.init([1, 2], 5)
        wait_for(lambda: r.poll() == KVPoll.Transferring, 10, "registration")
        t0 = time.monotonic()
        peer.proc.kill()
        wait_for(lambda: r.poll() in DONE, 8, "the receiver to notice")
        assert r.poll() == KVPoll.Failed and "did the prefill process die" in (r.failure_reason or "")
        assert time.monotonic() - t0 < 4
        # A new request for the dead instance fails at once too (its cached route was dropped).
        r2 = receiver(mgr, peer, random.getrandbits(63))
        r2.init([3], 2)
        wait_for(lambda: r2.poll() in DONE, 5, "the second receiver")
        assert r2.poll() == KVPoll.Failed and "unreachable" in (r2.failure_reason or ""), r2.failure_reason
    finally:
        mgr.close()
        peer.close()


def test_receiver_fails_after_its_timeout_when_prefill_never_sends(prefill: PrefillPeer) -> None:
    mgr, _ = decode_manager(prefill, transfer_timeout=1.5)
    try:
        room = random.getrandbits(63)
        r = receiver(mgr, prefill, room)
        t0 = time.monotonic()
        r.init([4], 1)
        wait_for(lambda: r.poll() in DONE, 10, "the transfer timeout")
        assert r.poll() == KVPoll.Failed and f"prefill did not send room {room} within 1.5s" == r.failure_reason
        assert time.monotonic() - t0 >= 1.5
    finally:
        mgr.close()


def test_sender_fails_after_bootstrap_timeout_when_decode_never_registers(prefill: PrefillPeer) -> None:
    room, t0 = random.getrandbits(63), time.monotonic()
    prefill.cmds.put(("create", room))
    assert prefill.expect("created")[2] == KVPoll.Bootstrapping
    _, done_room, state, reason = prefill.expect("done", timeout=15)
    assert (done_room, KVPoll(state)) == (room, KVPoll.Failed)
    assert f"decode never registered room {room} within 5.0s" == reason
    assert time.monotonic() - t0 >= 5.0


def test_abort_on_either_side_fails_the_peer_and_leaves_pages_untouched(prefill: PrefillPeer) -> None:
    mgr, dbufs = decode_manager(prefill, transfer_timeout=30.0)
    try:
        before = [b.clone() for b in dbufs]
        room_a, room_b = random.getrandbits(63), random.getrandbits(63)
        ra, rb = receiver(mgr, prefill, room_a), receiver(mgr, prefill, room_b)
        ra.init([6], 2)
        rb.init([8], 2)
        wait_for(lambda: ra.poll() == rb.poll() == KVPoll.Transferring, 10,
                 f"registrations: {ra.poll().name} {ra.failure_reason}, {rb.poll().name} {rb.failure_reason}")
        for room in (room_a, room_b):
            prefill.cmds.put(("create", room))
            prefill.expect("created")
        wait_for(lambda: sender_state(prefill, room_a) == sender_state(prefill, room_b) == KVPoll.WaitingForInput,
                 10, "registrations to reach the senders")
        ra.abort()  # decode gives up: the prefill sender must fail rather than write
        assert ra.poll() == KVPoll.Failed
        _, done_room, state, reason = prefill.expect("done")
        assert (done_room, KVPoll(state)) == (room_a, KVPoll.Failed) and "aborted" in reason
        t0 = time.monotonic()
        prefill.cmds.put(("abort", room_b))  # prefill gives up: decode hears at once, not after 30 s
        prefill.expect("aborted")
        wait_for(lambda: rb.poll() in DONE, 5, "the prefill's abort")
        assert rb.poll() == KVPoll.Failed and f"prefill aborted room {room_b}" in (rb.failure_reason or "")
        assert time.monotonic() - t0 < 5
        assert all(torch.equal(g, w) for g, w in zip(dbufs, before, strict=True))
    finally:
        mgr.close()


# ---- rooms are owned: one request's KV never answers another's prompt -----------------------------------------


def test_prompt_fingerprint_is_64_bit_and_tells_same_length_prompts_apart() -> None:
    from kvtransfer.base import prompt_fingerprint

    rng = random.Random()
    ids = [rng.randrange(200_000) for _ in range(rng.randint(1, 300))]
    other = list(ids)
    other[rng.randrange(len(ids))] += 1
    assert prompt_fingerprint(ids) == prompt_fingerprint(np.asarray(ids)) < 2**64
    assert prompt_fingerprint(ids) != prompt_fingerprint(other)
    status = TransferStatus(3, True, "", 7, len(ids), prompt_fingerprint(ids))
    assert decode_message(encode_message(status)) == status  # a full 64-bit value survives msgpack


def test_registration_for_another_prompt_is_refused_and_the_sender_waits_for_its_own(prefill: PrefillPeer) -> None:
    """The prefill's sender has prompt fingerprint 0: a decode with another prompt on its room is refused at once,
    without a page written, and the sender still serves the decode with the right prompt."""
    from kvtransfer.mooncake import MooncakeKVReceiver

    mgr, dbufs = decode_manager(prefill, transfer_timeout=30.0)
    try:
        before, room = [b.clone() for b in dbufs], random.getrandbits(63)
        prefill.cmds.put(("create", room))
        assert prefill.expect("created")[2] == KVPoll.Bootstrapping
        wrong = MooncakeKVReceiver(mgr, HOST, prefill.port, room, prompt_hash=0xDEADBEEF)
        wrong.init([3], 2)
        wait_for(lambda: wrong.poll() in DONE, 5, "the refusal")
        assert wrong.poll() == KVPoll.Failed and "claimed by two different prompts" in (wrong.failure_reason or "")
        assert sender_state(prefill, room) == KVPoll.Bootstrapping
        assert all(torch.equal(g, w) for g, w in zip(dbufs, before, strict=True))
        right = receiver(mgr, prefill, room)
        right.init([5], 2)
        prefill.cmds.put(("send", room, ([9], 2, 42)))
        wait_for(lambda: right.poll() in DONE, 10, "the transfer")
        assert right.poll() == KVPoll.Success and right.result() == FirstToken(42, 2), right.failure_reason
        assert prefill.expect("done")[1:3] == (room, KVPoll.Success)
    finally:
        mgr.close()


def test_status_for_another_prompt_fails_the_receiver_naming_both_fingerprints(prefill: PrefillPeer) -> None:
    """Decode's own check, whatever the prefill does: an ok status computed for another prompt is a failure."""
    mgr, _ = decode_manager(prefill, transfer_timeout=30.0)
    try:
        room = random.getrandbits(63)
        r = receiver(mgr, prefill, room)
        r.init([1], 3)
        wait_for(lambda: r.poll() == KVPoll.Transferring, 10, "registration")
        mgr._on_status(TransferStatus(room, True, "", 17, 3, 0xABC))
        assert r.poll() == KVPoll.Failed
        assert "KV of another prompt" in (r.failure_reason or "") and "0x0000000000000abc" in (r.failure_reason or "")
    finally:
        mgr.close()


def _collector() -> tuple[Any, list[Any]]:
    """A control listener standing in for a second decode rank: every message it gets lands in the list."""
    from kvtransfer.control import ControlServer

    got: list[Any] = []
    return ControlServer(HOST, 0, got.append), got


def test_second_registration_of_a_live_room_is_refused_and_the_first_is_served(prefill: PrefillPeer) -> None:
    mgr, _ = decode_manager(prefill, transfer_timeout=30.0)
    intruder, got = _collector()
    try:
        room = random.getrandbits(63)
        first = receiver(mgr, prefill, room)
        assert receiver(mgr, prefill, room).poll() == KVPoll.Failed  # a duplicate on this decode rank: refused here
        first.init([2], 4)
        wait_for(lambda: first.poll() == KVPoll.Transferring, 10, "registration")
        info = mgr.bootstrap_client.get_route(HOST, prefill.port).rank_for(room, 0)
        a = mgr.args
        mgr.control.send(info.control_addr, RegisterRoom(room, 0, intruder.address, mgr.engine.session_id,
                                                          list(a.kv_data_ptrs), list(a.kv_item_lens), a.page_size,
                                                          [7], 4, dict(a.fingerprint)))
        wait_for(lambda: got, 5, "the refusal of the second registration")
        assert isinstance(got[0], TransferStatus) and not got[0].ok and "already registered" in got[0].reason
        prefill.cmds.put(("send", room, ([11], 4, 5)))
        wait_for(lambda: first.poll() in DONE, 10, "the first request's transfer")
        assert first.poll() == KVPoll.Success and first.result() == FirstToken(5, 4), first.failure_reason
    finally:
        intruder.close()
        mgr.close()


def test_registrations_for_rooms_without_a_request_are_bounded_in_number_and_time() -> None:
    bound, keep_s = 8, 3.0
    peer = PrefillPeer(bootstrap_timeout=keep_s, max_pending_rooms=bound)
    mgr, _ = decode_manager(peer)
    sink, got = _collector()
    try:
        info = mgr.bootstrap_client.get_route(HOST, peer.port).rank_for(0, 0)
        a = mgr.args

        def register(room: int) -> None:
            mgr.control.send(info.control_addr, RegisterRoom(room, 0, sink.address, mgr.engine.session_id,
                                                              list(a.kv_data_ptrs), list(a.kv_item_lens),
                                                              a.page_size, [1], 1, dict(a.fingerprint)))

        for room in range(bound + 1):
            register(room)
        wait_for(lambda: got, 10, "the refusal past the bound")
        assert [m.room for m in got] == [bound] and "registrations for rooms" in got[0].reason
        # Every kept registration arrived before the refusal was seen: all have expired keep_s after that.
        time.sleep(keep_s + 0.5)
        register(bound + 1)
        peer.cmds.put(("create", bound + 1))  # the late registration is kept, and reaches its sender
        assert peer.expect("created")[2] == KVPoll.WaitingForInput
        peer.cmds.put(("create", 0))  # an expired one does not
        assert peer.expect("created")[2] == KVPoll.Bootstrapping
        assert len(got) == 1
    finally:
        sink.close()
        mgr.close()
        peer.close()
