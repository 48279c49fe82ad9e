"""A decode that holds a prefix of the prompt in its own prefix cache (RegisterRoom.cached_tokens): the prefill
writes only the pages after it, byte-exact, through the decode's pages or its staging pool, and the pages of the
prefix keep what they held. A registration claiming a prefix that is not whole pages below the prompt's length
fails the room naming the problem; the decode refuses to register one.

Both Mooncake managers run in this process over loopback TCP; the oracle is a per-page copy of only the pages
after the prefix (tests.test_kvtransfer.copied_pages). Fresh random buffers, page lists and prefixes every run.
"""

from __future__ import annotations

import random

import pytest
import torch

from kvtransfer.base import FirstToken, KVPoll
from kvtransfer.messages import RegisterRoom
from tests.test_kvtransfer import DONE, HOST, copied_pages, kv_args, make_buffers, wait_for

pytest.importorskip("mooncake.engine", reason="needs mooncake-transfer-engine")

LAYERS, ITEM_LENS, PS, PAGES = 2, (96, 40), 4, 64


@pytest.mark.parametrize("decode_pool", ["none", "large"])
def test_only_the_pages_after_the_decode_cached_prefix_are_written(decode_pool: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtransfer.mooncake import MooncakeKVManager, MooncakeKVReceiver, MooncakeKVSender

    page_bytes = [il * PS for il in ITEM_LENS] * LAYERS
    room_bytes = sum(page_bytes)
    src = make_buffers(random.randrange(2**31), LAYERS, ITEM_LENS, PAGES, PS, True)
    dst = make_buffers(random.randrange(2**31), LAYERS, ITEM_LENS, PAGES, PS, True)
    pool_bytes = {"none": 0, "large": 64 * room_bytes}[decode_pool]
    pre = MooncakeKVManager(kv_args(src, LAYERS, ITEM_LENS, PS), "prefill", HOST, (HOST, 0), serve_bootstrap=True,
                            staging_bytes=5 * max(page_bytes))
    dec = MooncakeKVManager(kv_args(dst, LAYERS, ITEM_LENS, PS), "decode", HOST, staging_bytes=pool_bytes)
    written: list[int] = []
    real_write = pre.engine.write

    def recording_write(session_id: str, s: list[int], d: list[int], n: list[int], timeout_s: float) -> None:
        written.extend(n)
        real_write(session_id, s, d, n, timeout_s)

    monkeypatch.setattr(pre.engine, "write", recording_write)
    assert pre.bootstrap is not None
    rng = random.Random()
    try:
        # (pages, cached pages): no prefix, a prefix of all but the last page, and random ones; scattered pages on
        # both sides, so the staging pool and the gather buffer are used where they are on
        cases = [(6, 0), (6, 5), (1, 0)] + [(n, rng.randrange(n)) for n in (rng.randint(2, 14) for _ in range(4))]
        for n, k in cases:
            src_pages, dst_pages = rng.sample(range(PAGES), n), rng.sample(range(PAGES), n)
            num_tokens, cached = (n - 1) * PS + rng.randint(1, PS), k * PS
            before, room = [b.clone() for b in dst], rng.getrandbits(63)
            sender, receiver = MooncakeKVSender(pre, room), MooncakeKVReceiver(dec, HOST, pre.bootstrap[1], room)
            receiver.init(dst_pages, num_tokens, cached)
            wait_for(lambda s=sender: s.poll() != KVPoll.Bootstrapping, 10, "registration")
            assert sender.poll() == KVPoll.WaitingForInput, sender.failure_reason
            assert sender.peer_cached_tokens == cached
            written.clear()
            sender.send(src_pages, num_tokens, FirstToken(5, num_tokens))
            wait_for(lambda r=receiver: r.poll() in DONE, 20, "the transfer")
            assert receiver.poll() == KVPoll.Success, receiver.failure_reason
            assert receiver.result() == FirstToken(5, num_tokens)
            expected = copied_pages(before, src, page_bytes, 1, [(src_pages[k:], dst_pages[k:])])
            for b, (got, want) in enumerate(zip(dst, expected, strict=True)):
                assert torch.equal(got, want), f"buffer {b} differs from the oracle ({n} pages, {k} cached)"
            assert sum(written) == (n - k) * room_bytes
        if dec.staging is not None:
            assert dec.staging.pool is not None and dec.staging.pool.free_bytes() == pool_bytes
    finally:
        pre.close()
        dec.close()


def test_a_cached_prefix_that_is_not_whole_pages_below_the_prompt_fails_the_room() -> None:
    from kvtransfer.mooncake import MooncakeKVManager, MooncakeKVReceiver, MooncakeKVSender

    src = make_buffers(random.randrange(2**31), LAYERS, ITEM_LENS, PAGES, PS, True)
    dst = make_buffers(random.randrange(2**31), LAYERS, ITEM_LENS, PAGES, PS, True)
    pre = MooncakeKVManager(kv_args(src, LAYERS, ITEM_LENS, PS), "prefill", HOST, (HOST, 0), serve_bootstrap=True)
    dec = MooncakeKVManager(kv_args(dst, LAYERS, ITEM_LENS, PS), "decode", HOST)
    assert pre.bootstrap is not None
    try:
        num_tokens = 3 * PS + 1  # 4 pages
        for cached in (PS + 1, 4 * PS, -PS):
            receiver = MooncakeKVReceiver(dec, HOST, pre.bootstrap[1], random.getrandbits(63))
            with pytest.raises(ValueError, match="multiple of the page size"):
                receiver.init([1, 2, 3, 4], num_tokens, cached)
            receiver.abort()
            # a peer that sends one anyway: the prefill fails the room before writing anything
            room = random.getrandbits(63)
            sender = MooncakeKVSender(pre, room)
            a = dec.args
            dec.control.send(pre.control_addr, RegisterRoom(
                room, a.engine_rank, dec.control_addr, dec.engine.session_id, list(a.kv_data_ptrs),
                list(a.kv_item_lens), PS, [1, 2, 3, 4], num_tokens, dict(a.fingerprint), cached_tokens=cached))
            wait_for(lambda s=sender: s.poll() != KVPoll.Bootstrapping, 10, "the registration's verdict")
            assert sender.poll() == KVPoll.Failed
            assert f"hold {cached} of {num_tokens} prompt tokens" in (sender.failure_reason or ""), \
                sender.failure_reason
    finally:
        pre.close()
        dec.close()
