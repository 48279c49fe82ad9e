"""KV heads sharded over tensor-parallel ranks, and moved between instances of different TP sizes: the head rule
against what GQA's query grouping needs (each rank caches exactly the KV heads its query heads attend with), the copy
plan against brute force (every decode rank gets exactly its heads, each from a prefill rank that holds it), the byte
regions against a per-token, per-head tensor copy, and a mooncake transfer over loopback against the prefill's pages
sliced to each decode rank's heads."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kvtransfer.base import FirstToken, KVArgs, KVPoll
from kvtransfer.heads import HeadCopy, assign_targets, head_regions, plan_head_copies
from pd.dist.tp import TensorParallel, kv_head_range
from tests.test_kvtransfer import DONE, HOST, wait_for

SIZES = [1, 2, 4, 8]


def _valid(kv: int, tp: int) -> bool:
    return kv % tp == 0 or tp % kv == 0


@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("tp", SIZES)
def test_each_rank_holds_the_kv_heads_its_query_heads_use_and_only_those(kv_heads: int, tp: int) -> None:
    if not _valid(kv_heads, tp):
        with pytest.raises(ValueError, match="cannot be split"):
            kv_head_range(kv_heads, tp, 0)
        return
    q_heads = max(kv_heads, tp) * 2  # GQA: a multiple of both
    group = q_heads // kv_heads
    for rank in range(tp):
        first, count = kv_head_range(kv_heads, tp, rank)
        per_rank = q_heads // tp
        used = {q // group for q in range(rank * per_rank, (rank + 1) * per_rank)}
        assert set(range(first, first + count)) == used, (rank, first, count, used)
        assert count == max(kv_heads // tp, 1)  # 1/tp of the heads each, or one shared head


def test_with_sharding_off_every_rank_holds_all_heads_and_the_rule_still_checks_them() -> None:
    assert TensorParallel(rank=1, size=4, shard_kv_heads=False).kv_heads(8) == (0, 8)
    with pytest.raises(ValueError, match="cannot be split"):
        TensorParallel(rank=0, size=4, shard_kv_heads=False).kv_heads(6)


# ---- moving heads between instances of different TP sizes (kvtransfer.heads, the mooncake backend) -------------


def test_head_copy_plan_gives_every_decode_rank_exactly_its_heads_from_ranks_that_hold_them() -> None:
    cases = [(kv, p, d) for kv in (1, 2, 3, 4, 8, 16) for p in SIZES for d in SIZES if _valid(kv, p) and _valid(kv, d)]
    for kv, p_tp, d_tp in cases:
        src = [kv_head_range(kv, p_tp, r) for r in range(p_tp)]
        dst = [kv_head_range(kv, d_tp, r) for r in range(d_tp)]
        copies = plan_head_copies(src, dst)
        for d, (d_first, d_count) in enumerate(dst):
            got: list[int] = []  # the heads decode rank d receives, each checked for where it lands and comes from
            for c in copies:
                if c.dst_rank != d:
                    continue
                assert c.count >= 1
                for k in range(c.count):
                    head = src[c.src_rank][0] + c.src_offset + k
                    assert c.src_offset + k < src[c.src_rank][1], (kv, p_tp, d_tp, c)  # the source holds it
                    assert d_first + c.dst_offset + k == head, (kv, p_tp, d_tp, c)  # and it lands at its place
                    got.append(head)
            assert sorted(got) == list(range(d_first, d_first + d_count)), (kv, p_tp, d_tp, d, got)
        if p_tp == d_tp:  # same layout: rank to rank, whole ranges
            assert copies == [HeadCopy(r, r, 0, 0, src[r][1]) for r in range(p_tp)]


def test_assignment_gives_each_decode_rank_every_head_once_and_whole_pages_where_a_range_matches() -> None:
    """assign_targets (who writes which decode rank, TP prefill ranks each sending their own heads) against a
    brute-force expansion: every head of every decode rank written exactly once, by a rank that holds it, at its
    place; a decode rank whose exact range a prefill rank caches is written whole pages by such a rank."""
    cases = [(kv, p, d) for kv in (1, 2, 4, 8) for p in SIZES for d in SIZES if _valid(kv, p) and _valid(kv, d)]
    for kv, p_tp, d_tp in cases:
        src = [kv_head_range(kv, p_tp, r) for r in range(p_tp)]
        dst = [kv_head_range(kv, d_tp, r) for r in range(d_tp)]
        plan = assign_targets(src, dst)
        written: dict[int, list[int]] = {d: [] for d in range(d_tp)}
        for p, assignment in enumerate(plan):
            for d, copies in assignment:
                if copies is None:
                    assert src[p] == dst[d], (kv, p_tp, d_tp, p, d)
                    written[d] += list(range(dst[d][0], dst[d][0] + dst[d][1]))
                    continue
                assert src[p] != dst[d]  # else whole pages
                for c in copies:
                    assert (c.src_rank, c.dst_rank) == (p, d) and c.src_offset + c.count <= src[p][1]
                    heads = [src[p][0] + c.src_offset + k for k in range(c.count)]
                    assert heads == [dst[d][0] + c.dst_offset + k for k in range(c.count)]
                    written[d] += heads
        for d, (first, count) in enumerate(dst):
            assert sorted(written[d]) == list(range(first, first + count)), (kv, p_tp, d_tp, d, written[d])
            exact = [p for p in range(p_tp) if src[p] == dst[d]]
            assert not exact or any((d, None) in plan[p] for p in exact)
        if p_tp == d_tp:
            assert all(plan[r] == [(r, None)] or src[r] != dst[r] for r in range(p_tp))


def test_head_copy_plan_refuses_heads_no_prefill_rank_holds() -> None:
    with pytest.raises(ValueError, match="KV head 3"):
        plan_head_copies([(0, 2), (1, 2)], [(2, 2)])


@pytest.mark.parametrize("trial", range(6))
def test_head_regions_copy_the_same_bytes_as_a_per_token_head_slice_copy(trial: int) -> None:
    rng = random.Random()
    kv, p_tp, d_tp = rng.choice([(4, 1, 2), (4, 2, 1), (4, 2, 4), (2, 1, 4), (4, 4, 2), (8, 2, 2)])
    layers, page_size, dim, pages = 2, rng.choice([1, 4]), rng.choice([2, 3]), 12
    dims = [dim, dim + 1] * layers  # K-like and V-like buffers of different head sizes
    src_ranges = [kv_head_range(kv, p_tp, r) for r in range(p_tp)]
    dst_ranges = [kv_head_range(kv, d_tp, r) for r in range(d_tp)]
    p, d = rng.randrange(p_tp), rng.randrange(d_tp)
    # one flat byte arena per side; each buffer [pages * page_size, heads, dim] uint8 inside it
    src_bufs = [torch.randint(0, 256, (pages * page_size, src_ranges[p][1], dm), dtype=torch.uint8) for dm in dims]
    dst_bufs = [torch.randint(0, 256, (pages * page_size, dst_ranges[d][1], dm), dtype=torch.uint8) for dm in dims]
    src_arena, dst_arena = torch.cat([b.ravel() for b in src_bufs]), torch.cat([b.ravel() for b in dst_bufs])
    src_ptrs = np.cumsum([0] + [b.numel() for b in src_bufs[:-1]]).tolist()
    dst_ptrs = np.cumsum([0] + [b.numel() for b in dst_bufs[:-1]]).tolist()
    n = rng.randint(1, 5)
    src_pages, dst_pages = rng.sample(range(pages), n), rng.sample(range(pages), n)
    expected = [b.clone() for b in dst_bufs]
    for c in plan_head_copies(src_ranges, dst_ranges):
        if (c.src_rank, c.dst_rank) != (p, d):
            continue
        srcs, dsts, lens = head_regions(src_ptrs, [b[0].numel() for b in src_bufs], dst_ptrs,
                                        [b[0].numel() for b in dst_bufs], dims, page_size, src_pages, dst_pages, c)
        for s, t, k in zip(srcs, dsts, lens, strict=True):
            dst_arena[t:t + k] = src_arena[s:s + k]
        for b in range(len(dims)):  # the oracle: token by token, the heads as tensor slices
            for sp, dp in zip(src_pages, dst_pages, strict=True):
                for t in range(page_size):
                    expected[b][dp * page_size + t, c.dst_offset:c.dst_offset + c.count] = \
                        src_bufs[b][sp * page_size + t, c.src_offset:c.src_offset + c.count]
    got = torch.split(dst_arena, [b.numel() for b in dst_bufs])
    for b, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(g.view(e.shape), e), f"buffer {b}, kv {kv}, prefill tp {p_tp} rank {p} -> {d_tp} rank {d}"


KV, HEAD_DIMS, LAYERS, PAGE, PAGES = 4, (6, 5), 2, 4, 24  # bytes of one head in K-like and V-like buffers


def _rank(heads: tuple[int, int], rank: int) -> tuple[list[torch.Tensor], KVArgs]:
    """A rank's random KV buffers [PAGES * PAGE, count, dim] uint8 (layer-major) and what it exposes."""
    bufs = [torch.randint(0, 256, (PAGES * PAGE, heads[1], dim), dtype=torch.uint8) for _ in range(LAYERS)
            for dim in HEAD_DIMS]  # fmt: skip
    fingerprint = {"num_layers": LAYERS, "kv_layout": [[[KV, dim] for dim in HEAD_DIMS]] * LAYERS}
    return bufs, KVArgs(rank, [b.data_ptr() for b in bufs], [b[0].numel() for b in bufs], PAGE, fingerprint,
                        [b.numel() for b in bufs], host_memory=True, kv_heads=heads)


def test_a_decode_rank_whose_heads_the_prefill_rank_lacks_fails_the_room_on_both_sides() -> None:
    from kvtransfer.mooncake import MooncakeKVManager, MooncakeKVReceiver, MooncakeKVSender, MooncakeKVTarget

    _, src_args = _rank((0, 2), 0)  # rank 0 of a prefill of TP 2: heads 0 and 1
    (_, leader), (_, follower_args) = _rank((0, 2), 0), _rank((2, 2), 1)
    follower = MooncakeKVTarget(follower_args, HOST)
    pre = MooncakeKVManager(src_args, "prefill", HOST, (HOST, 0), serve_bootstrap=True)
    dec = MooncakeKVManager(leader, "decode", HOST, peers=[follower.target])
    assert pre.bootstrap is not None
    try:
        room = random.getrandbits(63)
        sender, receiver = MooncakeKVSender(pre, room), MooncakeKVReceiver(dec, HOST, pre.bootstrap[1], room)
        receiver.init([3, 1], 6)
        wait_for(lambda: receiver.poll() in DONE and sender.poll() in DONE, 15, "both sides to finish")
        assert sender.poll() == KVPoll.Failed and "KV head 2" in (sender.failure_reason or "")
        assert receiver.poll() == KVPoll.Failed and "KV head 2" in (receiver.failure_reason or "")
    finally:
        pre.close()
        dec.close()
        follower.close()


def _prefill_group(prefill_tp: int, transfer_timeout_s: float = 20.0, staging_bytes: int = 0,
                   io_timeout_s: float = 5.0):  # noqa: ANN202
    """A prefill attention group of prefill_tp ranks over one random KV (every rank its heads of the same pages):
    the whole KV [slots, KV, dim] per buffer, the leader's manager, and the followers' sources."""
    from kvtransfer.mooncake import MooncakeKVManager
    from kvtransfer.mooncake_source import MooncakeKVSource

    whole = [torch.randint(0, 256, (PAGES * PAGE, KV, dim), dtype=torch.uint8) for _ in range(LAYERS)
             for dim in HEAD_DIMS]  # fmt: skip
    ranks = []
    for r in range(prefill_tp):
        first, count = kv_head_range(KV, prefill_tp, r)
        bufs, args = _rank((first, count), r)
        for b, w in zip(bufs, whole, strict=True):
            b.copy_(w[:, first:first + count])
        ranks.append((bufs, args))
    sources = [MooncakeKVSource(args, HOST) for _, args in ranks[1:]]
    leader = MooncakeKVManager(ranks[0][1], "prefill", HOST, (HOST, 0), serve_bootstrap=True,
                               peers=[s.target for s in sources], transfer_timeout_s=transfer_timeout_s,
                               staging_bytes=staging_bytes, io_timeout_s=io_timeout_s)  # fmt: skip
    return whole, ranks, leader, sources


# A one-rank prefill (holding every head) into each decode TP size, with and without staging, then TP prefill groups.
PREFILL_TO_DECODE = [(1, d, staging) for staging in (0, 2**16) for d in (1, 2, 4)] + [
    (2, 1, 0), (4, 2, 0), (2, 2, 2**16), (2, 4, 2**16)]  # fmt: skip


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "staging_bytes"), PREFILL_TO_DECODE)
def test_every_prefill_rank_writes_its_heads_into_the_decode_ranks_that_cache_them(prefill_tp: int, decode_tp: int,
                                                                                   staging_bytes: int) -> None:
    """Prefill ranks each caching their share of the 4 KV heads (all of them for one rank) send a room to a decode
    group of another (or the same) TP size, whose leader registers its followers: the prefill leader writes its
    heads, hands each follower its share (as the prefill scheduler does over the step broadcast), and reports
    Success only after every share has landed. Every decode rank's pages equal the whole KV sliced to its heads,
    token by token; nothing else of its memory changes."""
    from kvtransfer.mooncake import MooncakeKVManager, MooncakeKVReceiver, MooncakeKVSender, MooncakeKVTarget

    whole, _, pre, sources = _prefill_group(prefill_tp, staging_bytes=staging_bytes)
    ranks = [_rank(kv_head_range(KV, decode_tp, r), r) for r in range(decode_tp)]
    targets = [MooncakeKVTarget(args, HOST) for _, args in ranks[1:]]
    dec = MooncakeKVManager(ranks[0][1], "decode", HOST, peers=[t.target for t in targets],
                            staging_bytes=staging_bytes)  # fmt: skip
    assert pre.bootstrap is not None
    rng = random.Random()
    try:
        n = rng.randint(2, 8)
        src_pages, dst_pages = rng.sample(range(PAGES), n), rng.sample(range(PAGES), n)
        before = [[b.clone() for b in bufs] for bufs, _ in ranks]
        room, num_tokens = rng.getrandbits(63), n * PAGE - 1
        sender, receiver = MooncakeKVSender(pre, room), MooncakeKVReceiver(dec, HOST, pre.bootstrap[1], room)
        receiver.init(dst_pages, num_tokens)
        wait_for(lambda: sender.poll() != KVPoll.Bootstrapping, 10, "registration")
        sender.send(src_pages, num_tokens, FirstToken(5, num_tokens))
        jobs = pre.take_part_jobs()
        # at most one share per follower, each for a follower of this group
        assert {rank for rank, _ in jobs} <= {s.args.engine_rank for s in sources}
        assert len({rank for rank, _ in jobs}) == len(jobs)
        assert pre.take_part_jobs() == []  # handed out once
        for rank, job in jobs:
            sources[rank - 1].submit(job)
        wait_for(lambda: receiver.poll() in DONE and sender.poll() in DONE, 20, "the transfer")
        assert receiver.poll() == KVPoll.Success, receiver.failure_reason
        assert sender.poll() == KVPoll.Success, sender.failure_reason
        for r, ((bufs, args), was) in enumerate(zip(ranks, before, strict=True)):
            first, count = args.kv_heads
            for b, (got, want) in enumerate(zip(bufs, was, strict=True)):
                for sp, dp in zip(src_pages, dst_pages, strict=True):
                    want[dp * PAGE:(dp + 1) * PAGE] = whole[b][sp * PAGE:(sp + 1) * PAGE, first:first + count]
                assert torch.equal(got, want), f"prefill tp {prefill_tp} -> decode rank {r} of {decode_tp}, buffer {b}"
    finally:
        pre.close()
        dec.close()
        for t in [*targets, *sources]:
            t.close()


@pytest.mark.parametrize("fault", ["unwritable", "never_handed_out"])
def test_a_follower_share_that_does_not_land_fails_the_room_on_both_sides(fault: str) -> None:
    """A follower's share that fails (its writes refused) or never comes (the follower never heard of the room)
    fails the room on the prefill leader and on decode, naming the cause, instead of reporting Success."""
    from kvtransfer.mooncake import MooncakeKVManager, MooncakeKVReceiver, MooncakeKVSender

    _, _, pre, sources = _prefill_group(2, transfer_timeout_s=1.0, io_timeout_s=1.0)
    dec_bufs, dec_args = _rank((0, KV), 0)
    dec = MooncakeKVManager(dec_args, "decode", HOST, transfer_timeout_s=30.0)
    assert pre.bootstrap is not None
    try:
        room = random.getrandbits(63)
        sender, receiver = MooncakeKVSender(pre, room), MooncakeKVReceiver(dec, HOST, pre.bootstrap[1], room)
        receiver.init([3, 1], 6)
        wait_for(lambda: sender.poll() != KVPoll.Bootstrapping, 10, "registration")
        sender.send([5, 7], 6, FirstToken(5, 6))
        ((rank, job),) = pre.take_part_jobs()
        if fault == "unwritable":  # a decode address nobody listens on
            job["targets"][0]["session_id"] = "127.0.0.1:1"
            sources[rank - 1].submit(job)
        # both polled every time, as their schedulers do (the prefill side's deadline is checked in poll())
        wait_for(lambda: {receiver.poll(), sender.poll()} <= set(DONE), 30, "both sides to finish")
        expected = "prefill rank 1 could not write" if fault == "unwritable" else "did not finish within"
        assert sender.poll() == KVPoll.Failed and expected in (sender.failure_reason or ""), sender.failure_reason
        assert receiver.poll() == KVPoll.Failed and expected in (receiver.failure_reason or ""), \
            receiver.failure_reason
    finally:
        pre.close()
        dec.close()
        for s in sources:
            s.close()
