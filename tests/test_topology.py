"""Rank coordinates against a direct enumeration of the layouts SGLang documents: attention groups are
consecutive ranks, expert blocks are consecutive ranks, nodes hold consecutive ranks."""

from __future__ import annotations

import itertools

import pytest

from pd.dist.topology import RankInfo


@pytest.mark.parametrize(("tp", "dp", "ep", "nnodes"),
                         [(1, 1, 1, 1), (2, 1, 2, 1), (4, 1, 2, 1), (4, 4, 4, 2), (8, 2, 4, 2), (8, 8, 8, 1)])
def test_every_rank_lands_in_exactly_one_group_of_each_kind(tp: int, dp: int, ep: int, nnodes: int) -> None:
    infos = [RankInfo(r, tp, dp, ep, nnodes) for r in range(tp)]
    attn_groups = [list(range(g, g + tp // dp)) for g in range(0, tp, tp // dp)]
    expert_blocks = [list(range(b, b + tp // ep)) for b in range(0, tp, tp // ep)]
    nodes = [list(range(n, n + tp // nnodes)) for n in range(0, tp, tp // nnodes)]
    for info in infos:
        group = next(g for g in attn_groups if info.rank in g)
        assert info.attn_group_ranks == group and info.leader == group[0]
        assert info.is_leader == (info.rank == group[0]) and info.attn_tp_rank == group.index(info.rank)
        assert info.dp_rank == attn_groups.index(group)
        block = next(b for b in expert_blocks if info.rank in b)
        assert (info.ep_rank, info.moe_tp_rank) == (expert_blocks.index(block), block.index(info.rank))
        node = next(n for n in nodes if info.rank in n)
        assert (info.node_rank, info.local_rank) == (nodes.index(node), node.index(info.rank))
    # Each (expert block, expert slice) pair is held by exactly one rank.
    pairs = {(i.ep_rank, i.moe_tp_rank) for i in infos}
    assert pairs == set(itertools.product(range(ep), range(tp // ep)))
    assert sum(i.is_leader for i in infos) == dp


@pytest.mark.parametrize(("rank", "tp", "dp", "ep", "nnodes"), [(0, 4, 3, 1, 1), (0, 4, 1, 3, 1), (4, 4, 1, 1, 1),
                                                             (0, 4, 1, 1, 3)])
def test_sizes_that_do_not_divide_tp_are_refused(rank: int, tp: int, dp: int, ep: int, nnodes: int) -> None:
    with pytest.raises(ValueError):
        RankInfo(rank, tp, dp, ep, nnodes)


@pytest.mark.parametrize(("flags", "layout"), [
    ("--tp 2 --ep 2 --moe-a2a-backend torch", "scatter"),  # TP attention: every rank holds the batch, split it
    ("--tp 2 --ep 2 --dp-size 2 --enable-dp-attention --moe-a2a-backend torch", "as_is"),  # own tokens per rank
    ("--tp 4 --ep 4 --dp-size 2 --enable-dp-attention --moe-a2a-backend torch", "scatter"),  # 2 ranks per group
    ("--tp 4 --dp-size 2 --enable-dp-attention", "gather"),  # no all-to-all: every rank sees every token
])  # fmt: skip
def test_moe_context_token_layout(flags: str, layout: str) -> None:
    from pd.dist.groups import Groups
    from pd.engine.rank import moe_context
    from pd.engine.spec import instance_layout, moe_settings
    from tests.test_server_args import parse

    args = parse(flags)
    for rank in range(args.tp_size):
        ctx = moe_context(moe_settings(args), instance_layout(args).rank(rank), Groups(None, None, None, None))
        assert ctx.token_layout == layout
