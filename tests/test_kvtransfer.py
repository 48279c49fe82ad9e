"""KV transfer layer: page coalescing, message schemas, bootstrap server, and the Mooncake backend between a real
prefill process and a decode (this) process over loopback TCP.

The byte-level oracle is a per-page torch copy written here; fresh random buffers and page lists every run.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import logging
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
from kvtransfer.pages import (
    merge_regions,
    page_runs,
    staged_ptrs,
    staging_pays,
    staging_pieces,
    transfer_regions,
)

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
                  [b.numel() for b in bufs], host_memory=True)


def _prefill_main(cfg: dict[str, Any], cmds: Any, out: Any) -> None:
    """A prefill rank: serves bootstrap, creates senders on command, sends when decode has registered."""
    from kvtransfer.mooncake import MooncakeKVManager, MooncakeKVSender

    # The child's own account of every room (refusals, expiries, failed sends) reaches a failing test's output.
    logging.basicConfig(format="prefill child %(asctime)s %(name)s: %(message)s")
    logging.getLogger("kvtransfer").setLevel(logging.DEBUG)
    bufs = make_buffers(cfg["seed"], cfg["layers"], cfg["item_lens"], cfg["pages"], cfg["page_size"], True)
    mgr = MooncakeKVManager(kv_args(bufs, cfg["layers"], cfg["item_lens"], cfg["page_size"]), "prefill", HOST,
                            (HOST, 0), serve_bootstrap=True, bootstrap_timeout_s=cfg["bootstrap_timeout"],
                            transfer_timeout_s=10.0, max_pending_rooms=cfg.get("max_pending_rooms", 4096),
                            staging_bytes=cfg["staging_bytes"])
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
        # A gather buffer of a few pages: rooms of several scattered pages are gathered and sent in pieces.
        self.cfg: dict[str, Any] = dict(seed=random.randrange(2**31), layers=3, item_lens=(96, 40), pages=64,
                                        page_size=4, bootstrap_timeout=5.0, staging_bytes=1600) | overrides
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
                            transfer_timeout_s=overrides.get("transfer_timeout", 10.0),
                            staging_bytes=overrides.get("staging_bytes", 2**20))
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


@pytest.fixture(scope="module")
def prefill16() -> Iterator[PrefillPeer]:
    """A second prefill process, with 16-token pages."""
    peer = PrefillPeer(page_size=16)
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

    # Merged, the regions still copy the same bytes, one region per chain of regions each continuing the last.
    merged = merge_regions(srcs, dsts, lens)
    got[:] = 0
    for s, d, n in zip(*merged, strict=True):
        got[d: d + n] = src_mem[s: s + n]
    np.testing.assert_array_equal(got, expected)
    chains = sum(1 for i in range(len(srcs))
                 if i == 0 or srcs[i - 1] + lens[i - 1] != srcs[i] or dsts[i - 1] + lens[i - 1] != dsts[i])
    assert len(merged[0]) == chains


@pytest.mark.parametrize("seed", range(10))
def test_staging_pieces_hold_every_page_once_back_to_back_within_capacity(seed: int) -> None:
    rng = random.Random(seed * 31 + random.randrange(1000))
    page_bytes = [rng.choice([8, 24, 40]) for _ in range(rng.randint(1, 6))]
    num_pages, capacity = rng.randint(0, 30), rng.randint(40, 400)
    seen = []
    for piece in staging_pieces(num_pages, page_bytes, capacity):
        assert piece, "an empty piece"
        end = 0
        for b, lo, hi, offset in piece:
            assert offset == end and lo < hi
            end += (hi - lo) * page_bytes[b]
            seen += [(b, p) for p in range(lo, hi)]
        assert end <= capacity
    assert seen == [(b, p) for b in range(len(page_bytes)) for p in range(num_pages)]  # in staged_ptrs order
    assert staged_ptrs(1000, page_bytes, num_pages) == [1000 + num_pages * sum(page_bytes[:b])
                                                        for b in range(len(page_bytes))]


def test_staging_pays_for_scattered_pages_only() -> None:
    page_bytes = [2048, 2048]
    assert not staging_pays(list(range(40)), page_bytes)  # one run: nothing to save
    assert not staging_pays([], page_bytes)
    assert staging_pays(random.sample(range(1000), 40), page_bytes)
    big = list(range(0, 4096)) + list(range(5000, 9096))  # two long runs: two regions saved, 32 MiB to copy
    assert not staging_pays(big, page_bytes)


def test_staging_pool_lends_disjoint_areas_and_holds_failed_ones_back() -> None:
    from kvtransfer.staging import StagingPool

    rng, size = random.Random(), 1000
    pool = StagingPool(size, hold_s=0.2)
    lent: dict[int, int] = {}
    for _ in range(400):
        if lent and rng.random() < 0.5:
            off = rng.choice(list(lent))
            del lent[off]
            pool.free(off)
        else:
            n = rng.randint(1, 200)
            off = pool.alloc(n)
            if off is None:  # only when no free gap that large exists (the oracle: the lent areas' gaps)
                edges = sorted(lent.items())
                gaps = [b - (a + la) for (a, la), (b, _) in zip([(0, 0), *edges], [*edges, (size, 0)], strict=True)]
                assert max(gaps) < n
            else:
                lent[off] = n
        areas = sorted(lent.items())
        assert all(a + n <= b for (a, n), (b, _) in zip(areas, areas[1:], strict=False)), areas
        assert all(0 <= a and a + n <= size for a, n in areas)
        assert pool.free_bytes() == size - sum(lent.values())
    for off in lent:
        pool.free(off)
    assert pool.alloc(size) == 0  # freed neighbours merged back into one area
    pool.free(0)
    held = pool.alloc(600)
    assert held is not None
    pool.hold(held)  # a failed room's area: not lent again while a prefill may still write into it
    assert pool.alloc(600) is None and pool.free_bytes() == size - 600
    time.sleep(0.3)  # past hold_s: back in the pool
    assert pool.alloc(size) == 0


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
def test_many_concurrent_rooms_land_byte_exact_in_decode_pages(page_size: int, request: pytest.FixtureRequest) -> None:
    peer: PrefillPeer = request.getfixturevalue("prefill" if page_size == 4 else "prefill16")
    assert peer.cfg["page_size"] == page_size
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


@pytest.mark.parametrize("decode_pool", ["none", "small", "large"])
def test_shuffled_pages_arrive_bit_exact_through_the_staging_buffers(decode_pool: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Both managers in this process, so the test sees every region the prefill writes. Rooms with pages shuffled
    on either side or both arrive bit-exact (oracle: the prefill's pages copied page by page); scattered prefill
    pages are sent from the gather buffer (in pieces when the room is larger than it), scattered decode pages land
    in the staging pool while it has room and otherwise in the pages themselves."""
    from kvtransfer.mooncake import MooncakeKVManager, MooncakeKVReceiver, MooncakeKVSender

    layers, item_lens, ps, pages = 2, (96, 40), 4, 64
    page_bytes = [il * ps for il in item_lens] * layers
    room_bytes = sum(page_bytes)  # per prompt page
    gather_bytes = 5 * max(page_bytes)  # rooms of more than 2 pages go in pieces
    pool_bytes = {"none": 0, "small": 16 * room_bytes, "large": 64 * room_bytes}[decode_pool]
    src = make_buffers(random.randrange(2**31), layers, item_lens, pages, ps, True)
    dst = make_buffers(random.randrange(2**31), layers, item_lens, 2 * pages, ps, True)
    pre = MooncakeKVManager(kv_args(src, layers, item_lens, ps), "prefill", HOST, (HOST, 0), serve_bootstrap=True,
                            staging_bytes=gather_bytes)
    dec = MooncakeKVManager(kv_args(dst, layers, item_lens, ps), "decode", HOST, staging_bytes=pool_bytes)
    writes: list[tuple[list[int], list[int], list[int]]] = []
    real_write = pre.engine.write

    def recording_write(session_id: str, s: list[int], d: list[int], n: list[int], timeout_s: float) -> None:
        writes.append((list(s), list(d), list(n)))
        real_write(session_id, s, d, n, timeout_s)

    monkeypatch.setattr(pre.engine, "write", recording_write)
    assert pre.staging is not None and pre.staging.gather_buf is not None and pre.bootstrap is not None
    gather = (pre.staging.gather_buf.ctypes.data, gather_bytes)
    pool = (dec.staging.memory.ctypes.data, pool_bytes) if dec.staging is not None else (0, 0)
    rng = random.Random()
    shuffled, in_order = (lambda n, pool: rng.sample(range(pool), n)), (lambda n, pool: list(range(3, 3 + n)))
    cases = [(shuffled, shuffled, 12), (in_order, shuffled, 12), (shuffled, in_order, 12), (in_order, in_order, 12),
             (shuffled, shuffled, 40)]  # the last is larger than the small pool
    try:
        for src_of, dst_of, n in cases:
            src_pages, dst_pages = src_of(n, pages), dst_of(n, 2 * pages)
            before, room, num_tokens = [b.clone() for b in dst], rng.getrandbits(63), (n - 1) * ps + 1
            sender, receiver = MooncakeKVSender(pre, room), MooncakeKVReceiver(dec, HOST, pre.bootstrap[1], room)
            receiver.init(dst_pages, num_tokens)
            staged_dst = receiver.staging_offset is not None
            assert staged_dst == (dst_of is shuffled and n * room_bytes <= pool_bytes), (decode_pool, n)
            wait_for(lambda s=sender: s.poll() != KVPoll.Bootstrapping, 10, "registration")
            writes.clear()
            sender.send(src_pages, num_tokens, FirstToken(7, num_tokens))
            wait_for(lambda r=receiver: r.poll() in DONE, 20, "the transfer")
            assert receiver.poll() == KVPoll.Success, receiver.failure_reason
            assert receiver.result() == FirstToken(7, num_tokens)

            expected = copied_pages(before, src, page_bytes, 1, [(src_pages, dst_pages)])
            for b, (got, want) in enumerate(zip(dst, expected, strict=True)):
                assert torch.equal(got, want), f"buffer {b} differs from the per-page oracle"
            srcs, dsts, lens = (sum((w[i] for w in writes), []) for i in range(3))
            assert sum(lens) == n * room_bytes
            inside = [lambda a, n, base=base, size=size: base <= a and a + n <= base + size
                      for base, size in (gather, pool)]
            gathered = src_of is shuffled
            assert all(inside[0](a, k) == gathered for a, k in zip(srcs, lens, strict=True))
            assert all(inside[1](a, k) == staged_dst for a, k in zip(dsts, lens, strict=True))
            if gathered and staged_dst:  # contiguous on both sides: one region per piece of the gather buffer
                assert len(lens) == len(staging_pieces(n, page_bytes, gather_bytes))
            elif not gathered and not staged_dst:  # the pages themselves, one region per run and buffer at most
                assert len(lens) <= len(page_runs(src_pages, dst_pages)[0]) * len(page_bytes)
        if dec.staging is not None:
            assert dec.staging.pool is not None and dec.staging.pool.free_bytes() == pool_bytes  # all given back
    finally:
        pre.close()
        dec.close()


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


def test_incompatible_layouts_fail_at_handshake_naming_both_values(prefill16: PrefillPeer) -> None:
    peer = prefill16
    assert (peer.cfg["page_size"], peer.cfg["layers"]) == (16, 3)
    cases = [({"page_size": 4}, "page_size prefill=16 decode=4"), ({"layers": 2}, "num_layers prefill=3 decode=2")]
    for overrides, expected in cases:
        mgr, _ = decode_manager(peer, bootstrap_timeout=60.0, transfer_timeout=60.0, **overrides)
        try:
            r = receiver(mgr, peer, random.getrandbits(63))
            r.init([1], 1)
            wait_for(lambda r=r: r.poll() in DONE, 30, "the handshake verdict")
            # the layout comparison's verdict, not a timeout's (that would name the timeout instead)
            assert r.poll() == KVPoll.Failed and expected in (r.failure_reason or ""), r.failure_reason
        finally:
            mgr.close()


def test_prefill_killed_before_send_fails_the_receiver_before_its_timeout() -> None:
    peer = PrefillPeer()
    mgr, _ = decode_manager(peer, transfer_timeout=60.0)
    try:
        r = receiver(mgr, peer, random.getrandbits(63))
        r.init([1, 2], 5)
        wait_for(lambda: r.poll() == KVPoll.Transferring, 10, "registration")
        peer.proc.kill()
        wait_for(lambda: r.poll() in DONE, 30, "the receiver to notice")
        # the dropped connection's verdict, not the transfer timeout's ("prefill did not send room ...")
        assert r.poll() == KVPoll.Failed and "did the prefill process die" in (r.failure_reason or ""), r.failure_reason
        # A new request for the dead instance fails at once too (its cached route was dropped).
        r2 = receiver(mgr, peer, random.getrandbits(63))
        r2.init([3], 2)
        wait_for(lambda: r2.poll() in DONE, 30, "the second receiver")
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
    mgr, dbufs = decode_manager(prefill, transfer_timeout=60.0)
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
        prefill.cmds.put(("abort", room_b))  # prefill gives up: decode hears from it, not from its own timeout
        prefill.expect("aborted")
        wait_for(lambda: rb.poll() in DONE, 30, "the prefill's abort")
        assert rb.poll() == KVPoll.Failed and f"prefill aborted room {room_b}" in (rb.failure_reason or ""), \
            rb.failure_reason
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


def test_decode_copies_pages_out_of_its_staging_area_only_when_the_status_says_they_went_there(
        prefill: PrefillPeer) -> None:
    """A prefill without staging writes into the pages even when decode lent an area (staged=False): decode must
    not copy the area over them. A status claiming an area decode never lent fails the room."""
    mgr, dbufs = decode_manager(prefill, transfer_timeout=30.0)
    try:
        assert mgr.staging is not None and mgr.staging.pool is not None
        ps, pool_bytes = prefill.cfg["page_size"], mgr.staging.pool.free_bytes()
        lent, unlent = receiver(mgr, prefill, random.getrandbits(63)), receiver(mgr, prefill, random.getrandbits(63))
        lent.init([9, 2, 30], 3 * ps)
        unlent.init([40, 41], 2 * ps)  # one run: nothing to stage
        assert lent.staging_offset is not None and unlent.staging_offset is None
        wait_for(lambda: lent.poll() == unlent.poll() == KVPoll.Transferring, 10, "registrations")
        mgr.staging.pool.view(lent.staging_offset)[:] = 0xAB
        before = [b.clone() for b in dbufs]
        mgr._on_status(TransferStatus(lent.room, True, "", 5, 3 * ps, 0, staged=False))
        assert lent.poll() == KVPoll.Success and all(torch.equal(g, w) for g, w in zip(dbufs, before, strict=True))
        assert mgr.staging.pool.free_bytes() == pool_bytes  # the area is back in the pool
        mgr._on_status(TransferStatus(unlent.room, True, "", 5, 2 * ps, 0, staged=True))
        assert unlent.poll() == KVPoll.Failed
        assert "staging area this decode did not lend" in (unlent.failure_reason or ""), unlent.failure_reason
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
            t0 = time.monotonic()
            register(room)
            print("REG", room, time.monotonic() - t0, time.time(), flush=True)
        wait_for(lambda: got, 30, "the refusal past the bound")
        assert [m.room for m in got] == [bound] and "registrations for rooms" in got[0].reason
        # Every kept registration arrived before the refusal was seen: all have expired keep_s after that.
        time.sleep(keep_s + 0.5)
        register(bound + 1)
        peer.cmds.put(("create", bound + 1))  # the late registration is not refused, and reaches its sender
        peer.expect("created")  # (before or after the registration: the two travel different ways)
        wait_for(lambda: sender_state(peer, bound + 1) == KVPoll.WaitingForInput, 10, "the late registration")
        peer.cmds.put(("create", 0))  # an expired one does not
        assert peer.expect("created")[2] == KVPoll.Bootstrapping
        assert len(got) == 1
    finally:
        sink.close()
        mgr.close()
        peer.close()


def test_bench_kv_transfer_moves_every_layout_byte_exact_and_reports_each_ratio() -> None:
    """benchmarks/bench_kv_transfer.py at a tiny size: every layout's checked transfers (zeroed destination pages
    compared with the prefill's, byte for byte) pass, with and without staging."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kv_transfer.py"
    spec = importlib.util.spec_from_file_location("bench_kv_transfer", script)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for staging_bytes in (0, 2**20):
        kv = bench.bench_kv(1, 2, 8, num_tokens=61, page_size=4, repeats=2, staging_bytes=staging_bytes)
        assert kv["bytes"] == 2 * 64 * 2 * 8 * 4 and kv["staging_bytes"] == staging_bytes
        for layout in bench.LAYOUTS:
            assert kv[f"{layout}_vs_tcp"] == kv[f"mooncake_{layout}_MBps"] / kv["raw_tcp_MBps"] > 0
        assert "both shuffled" in bench.format_kv(kv)


@pytest.mark.parametrize("src_order", ["shuffled", "in_order"])
def test_every_decode_rank_receives_the_room_in_its_own_memory(src_order: str) -> None:
    """A decode leader registers its two followers' memory (KVTarget peers) with each room: the prefill writes the
    pages into all three ranks' buffers (oracle: the prefill's pages copied page by page into each), from its KV
    buffers or, for scattered pages, from its gather buffer in pieces; the leader alone hears the status."""
    from kvtransfer.mooncake import MooncakeKVManager, MooncakeKVReceiver, MooncakeKVSender, MooncakeKVTarget

    layers, item_lens, ps, pages = 2, (96, 40), 4, 32
    page_bytes = [il * ps for il in item_lens] * layers
    src = make_buffers(random.randrange(2**31), layers, item_lens, pages, ps, True)
    dsts = [make_buffers(random.randrange(2**31), layers, item_lens, pages, ps, True) for _ in range(3)]
    followers = [MooncakeKVTarget(dataclasses.replace(kv_args(d, layers, item_lens, ps), engine_rank=r), HOST)
                 for r, d in enumerate(dsts[1:], start=1)]
    pre = MooncakeKVManager(kv_args(src, layers, item_lens, ps), "prefill", HOST, (HOST, 0), serve_bootstrap=True,
                            staging_bytes=3 * max(page_bytes))
    dec = MooncakeKVManager(kv_args(dsts[0], layers, item_lens, ps), "decode", HOST,
                            peers=[f.target for f in followers])
    assert pre.bootstrap is not None
    rng = random.Random()
    try:
        for _ in range(3):
            n = rng.randint(1, 10)
            src_pages = rng.sample(range(pages), n) if src_order == "shuffled" else list(range(2, 2 + n))
            dst_pages = rng.sample(range(pages), n)
            before, room, num_tokens = [[b.clone() for b in d] for d in dsts], rng.getrandbits(63), n * ps - 1
            sender, receiver = MooncakeKVSender(pre, room), MooncakeKVReceiver(dec, HOST, pre.bootstrap[1], room)
            receiver.init(dst_pages, num_tokens)
            wait_for(lambda s=sender: s.poll() != KVPoll.Bootstrapping, 10, "registration")
            sender.send(src_pages, num_tokens, FirstToken(5, num_tokens))
            wait_for(lambda r=receiver: r.poll() in DONE, 20, "the transfer")
            assert receiver.poll() == KVPoll.Success, receiver.failure_reason
            wait_for(lambda s=sender: s.poll() in DONE, 10, "the sender")
            assert sender.poll() == KVPoll.Success, sender.failure_reason
            for rank, (got_bufs, was) in enumerate(zip(dsts, before, strict=True)):
                expected = copied_pages(was, src, page_bytes, 1, [(src_pages, dst_pages)])
                for b, (got, want) in enumerate(zip(got_bufs, expected, strict=True)):
                    assert torch.equal(got, want), f"decode rank {rank}, buffer {b} differs from the oracle"
    finally:
        pre.close()
        dec.close()
        for f in followers:
            f.close()


def test_a_decode_rank_that_cannot_be_written_fails_the_room_on_both_sides() -> None:
    """One follower's memory unreachable (its engine closed): the room fails for the leader, which owns the pages of
    every rank, and for the prefill, each naming the session that failed."""
    from kvtransfer.mooncake import MooncakeKVManager, MooncakeKVReceiver, MooncakeKVSender, MooncakeKVTarget

    layers, item_lens, ps, pages = 1, (64, 64), 4, 8
    src = make_buffers(random.randrange(2**31), layers, item_lens, pages, ps, True)
    dsts = [make_buffers(random.randrange(2**31), layers, item_lens, pages, ps, True) for _ in range(2)]
    follower = MooncakeKVTarget(dataclasses.replace(kv_args(dsts[1], layers, item_lens, ps), engine_rank=1), HOST)
    gone = follower.target
    follower.close()
    pre = MooncakeKVManager(kv_args(src, layers, item_lens, ps), "prefill", HOST, (HOST, 0), serve_bootstrap=True,
                            transfer_timeout_s=3.0)
    dec = MooncakeKVManager(kv_args(dsts[0], layers, item_lens, ps), "decode", HOST, transfer_timeout_s=20.0,
                            peers=[gone])
    assert pre.bootstrap is not None
    try:
        room = random.getrandbits(63)
        sender, receiver = MooncakeKVSender(pre, room), MooncakeKVReceiver(dec, HOST, pre.bootstrap[1], room)
        receiver.init([3, 1], 6)
        wait_for(lambda: sender.poll() != KVPoll.Bootstrapping, 10, "registration")
        sender.send([0, 5], 6, FirstToken(5, 6))
        wait_for(lambda: receiver.poll() in DONE and sender.poll() in DONE, 15, "both sides to finish")
        assert sender.poll() == KVPoll.Failed and gone.session_id in (sender.failure_reason or "")
        assert receiver.poll() == KVPoll.Failed and gone.session_id in (receiver.failure_reason or "")
    finally:
        pre.close()
        dec.close()
