"""The symmetric-memory transport's Triton kernels (pd.moe.dispatcher.symm_kernels) on CPU, in Triton's interpreter.

R ranks are simulated in one process: each rank's dispatch, combine and meta buffers are plain CPU tensors, the
kernels reach a peer's through its address (as on GPUs, where symmetric memory maps peer buffers into the
process), and a barrier is every rank finishing one step before any rank starts the next. Oracles, as in
tests/test_dispatchers.py: each rank receives exactly the (token, local expert, weight) triples routed to it, rows
bit for bit and in the order the NCCL transport delivers them; combine after the reference runner (low latency: in
the batched format the dispatcher makes of the rows) equals the single-rank MoE. The GPU run of the same kernels
across processes is tests/test_symm_exchange_gpu.py.

The checks run in a child Python with TRITON_INTERPRET=1 set before Triton is imported (Triton reads it when its
functions are defined, its own library included, and cannot be imported twice in one process), one child for the
run's kernel checks (tests/interpreter_child.py).
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import pytest
import torch

from pd.moe.dispatcher.base import DispatchOutput, batch_by_expert, sum_expert_rows
from pd.moe.dispatcher.payload import row_layout
from pd.moe.runner.torch_ref import TorchMoeRunner
from tests.interpreter_child import InterpreterChild
from tests.test_dispatchers import (
    EXPERTS,
    HIDDEN,
    RankInputs,
    _check_received,
    _make_inputs,
    _make_weights,
    _single_rank_reference,
)
from tests.triton_interpreter import patch_interpreter

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed (the test extra installs it)")


def _interpreted_kernels() -> ModuleType:
    """symm_kernels in this (child) process, built for Triton's interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run in a child with TRITON_INTERPRET=1"
    patch_interpreter()

    import pd.moe.dispatcher.symm_kernels as module

    return module


def _child_check(check: str, case: int) -> None:
    """In the interpreter child (tests.interpreter_child): ``check(kernels, *CASES[case])``."""
    globals()[check](_interpreted_kernels(), *CASES[case])


class World:
    """Every simulated rank's symmetric buffers, and the address tables the kernels take."""

    def __init__(self, ranks: int, capacity: int, top_k: int) -> None:
        self.ranks, self.capacity = ranks, capacity
        self.ids_at, self.row_bytes = row_layout(HIDDEN, torch.float32, top_k)
        # Garbage, not zeros, so a row the kernels forget to write cannot pass for a blank one.
        self.dispatch = [torch.randint(0, 256, (ranks, capacity, self.row_bytes), dtype=torch.uint8)
                         for _ in range(ranks)]  # fmt: skip
        self.combine = [torch.randn(ranks, capacity, HIDDEN) for _ in range(ranks)]
        self.meta = [torch.full((ranks, 2), -7, dtype=torch.int64) for _ in range(ranks)]

    @staticmethod
    def ptrs(buffers: list[torch.Tensor]) -> torch.Tensor:
        return torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)


def _finish(kernels: ModuleType, world: World, inputs: list[RankInputs], received: list[DispatchOutput],
            counts: list[torch.Tensor], pos: list[torch.Tensor], seed: int,
            full_grid: bool = False, batched: bool = False) -> None:  # fmt: skip
    """Reference runner on each rank's rows, send_back, (barrier), reduce; against the single-rank MoE. full_grid:
    send_back gets the rows padded with garbage to every row of every block (as a CUDA graph does), reduce a
    given output buffer with a padding token that no rank holds. batched: the rows go to the runner grouped per
    expert and come back weighted (batch_by_expert, sum_expert_rows), as the low_latency dispatcher hands them."""
    ranks, local = world.ranks, EXPERTS // world.ranks
    w13, w2 = _make_weights(seed)
    for rank, out in enumerate(received):
        _check_received(out, inputs, rank, ranks)
        weights = w13[rank * local : (rank + 1) * local], w2[rank * local : (rank + 1) * local]
        if batched:
            x_EMH, counts_E, expert_rows = batch_by_expert(out.hidden_states, out.topk_ids, out.topk_weights, local)
            y = TorchMoeRunner().run(DispatchOutput.batched(x_EMH, counts_E, None), *weights)
            rows = sum_expert_rows(y.hidden_states, expert_rows)
        else:
            rows = TorchMoeRunner().run(out, *weights).hidden_states
        if full_grid:
            rows = torch.cat([rows, torch.randn(ranks * world.capacity - rows.shape[0], rows.shape[1])])
        kernels.send_back(rows, counts[rank], World.ptrs(world.combine), world.capacity, rank)
    reference = _single_rank_reference(inputs, w13, w2)
    for rank in range(ranks):
        if not full_grid:
            combined = kernels.reduce_partials(world.combine[rank], pos[rank])
        else:
            padded_pos = torch.cat([pos[rank], torch.full((ranks, 1), -1, dtype=torch.int32)], dim=1)
            out = torch.randn(padded_pos.shape[1], HIDDEN)
            assert kernels.reduce_partials(world.combine[rank], padded_pos, out=out) is out
            assert not out[-1].any()  # the padding token: sent nowhere, zero
            combined = out[:-1]
        torch.testing.assert_close(combined, reference[rank], atol=1e-5, rtol=1e-5)


CASES = [  # tokens per rank, top_k, unrouted slots
    ([7, 5], 2, False),
    ([6, 0, 9, 3], 3, True),  # an idle rank, K not a power of two, slots that select no expert
    ([12, 12], 1, False),  # every row of the block in use (low latency: T == C)
]


def check_low_latency(kernels: ModuleType, tokens: list[int], top_k: int, unrouted: bool) -> None:
    seed, ranks, capacity = sum(tokens) + top_k, len(tokens), max(tokens)
    world, inputs = World(ranks, capacity, top_k), _make_inputs(sum(tokens) + top_k, tokens, top_k, unrouted)
    local = EXPERTS // ranks
    pos = [torch.empty(ranks, t, dtype=torch.int32) for t in tokens]
    for rank, x in enumerate(inputs):  # every rank writes rows 0..C-1 of its block on every peer
        kernels.send_rows(x.hidden, x.topk.topk_ids, x.topk.topk_weights, pos[rank], World.ptrs(world.dispatch),
                          capacity, rank, local, world.ids_at, world.row_bytes, all_rows=True)  # fmt: skip
    full = torch.full((ranks,), capacity, dtype=torch.int64)
    received = []
    for rank in range(ranks):
        hidden, ids, weights, valid = kernels.unpack_rows(world.dispatch[rank], full, ranks * capacity, HIDDEN,
                                                          torch.float32, top_k, rank, local, world.ids_at)  # fmt: skip
        assert torch.equal(valid, (ids >= 0).any(dim=-1))
        assert not hidden[~valid].any() and (ids[~valid] == -1).all()  # blank rows, also beyond T
        received.append(DispatchOutput(hidden, ids, weights, None))
        # row t of block s is token t of rank s: pos says which tokens went where
        for source in range(ranks):
            sent = pos[source][rank] >= 0
            block = valid[source * capacity : (source + 1) * capacity]
            assert torch.equal(block[: tokens[source]], sent) and not block[tokens[source] :].any()
    _finish(kernels, world, inputs, received, [full] * ranks, pos, seed, batched=True)


def check_normal(kernels: ModuleType, tokens: list[int], top_k: int, unrouted: bool) -> None:
    seed, ranks = sum(tokens) + top_k + 1, len(tokens)
    capacity = max(tokens) + 3  # the blocks need not be full
    world, inputs = World(ranks, capacity, top_k), _make_inputs(seed, tokens, top_k, unrouted)
    local = EXPERTS // ranks
    pos = [kernels.route(x.topk.topk_ids, World.ptrs(world.meta), rank, local) for rank, x in enumerate(inputs)]
    for rank, x in enumerate(inputs):
        # route's slots: the routed tokens of each destination numbered 0.. in token order, -1 elsewhere
        owner = torch.where(x.topk.topk_ids >= 0, x.topk.topk_ids // local, -1)
        for dest in range(ranks):
            routed = (owner == dest).any(dim=-1)
            want = torch.where(routed, routed.long().cumsum(0) - 1, -1).to(torch.int32)
            assert torch.equal(pos[rank][dest], want)
            assert world.meta[dest][rank].tolist() == [int(routed.sum()), tokens[rank]]  # what dest learns
    for rank, x in enumerate(inputs):
        kernels.send_rows(x.hidden, x.topk.topk_ids, x.topk.topk_weights, pos[rank], World.ptrs(world.dispatch),
                          capacity, rank, local, world.ids_at, world.row_bytes, all_rows=False)  # fmt: skip
    _check_blocks_too_small(kernels, world, inputs, pos, tokens)
    received, counts = [], []
    for rank in range(ranks):
        counts.append(world.meta[rank][:, 0].clone())
        hidden, ids, weights, valid = kernels.unpack_rows(
            world.dispatch[rank], counts[rank], int(counts[rank].sum()), HIDDEN, torch.float32, top_k, rank, local,
            world.ids_at,
        )  # fmt: skip
        assert valid.all()  # only routed rows arrive
        # source-major, token order within a source: the order all_to_all_single delivers
        tags = (hidden[:, 0] * 4096.0).round().long()
        assert tags.tolist() == sorted(tags.tolist())
        received.append(DispatchOutput(hidden, ids, weights, None))
        _check_full_grid_unpack(kernels, world, rank, counts[rank], received[-1], valid, top_k)
    _finish(kernels, world, inputs, received, counts, pos, seed, full_grid=True)


def _check_full_grid_unpack(kernels: ModuleType, world: World, rank: int, counts: torch.Tensor, exact: DispatchOutput,
                            valid: torch.Tensor, top_k: int) -> None:  # fmt: skip
    """A grid for every row of every block (what a CUDA graph captures, whatever arrives): the received rows come
    out as with the exact grid, into the given buffers, and the rows past them stay as they were."""
    rows, n = world.ranks * world.capacity, exact.hidden_states.shape[0]
    out = (torch.randn(rows, HIDDEN), torch.randint(-5, 5, (rows, top_k)), torch.randn(rows, top_k),
           torch.randint(0, 2, (rows,)).bool())  # fmt: skip
    before = [t.clone() for t in out]
    got = kernels.unpack_rows(world.dispatch[rank], counts, rows, HIDDEN, torch.float32, top_k, rank,
                              EXPERTS // world.ranks, world.ids_at, out=out)  # fmt: skip
    assert all(g is o for g, o in zip(got, out, strict=True))
    for g, want in zip(got, (exact.hidden_states, exact.topk_ids, exact.topk_weights, valid), strict=True):
        assert torch.equal(g[:n], want)
    for g, b in zip(got, before, strict=True):
        assert torch.equal(g[n:], b[n:])


def _check_blocks_too_small(kernels: ModuleType, world: World, inputs: list[RankInputs], pos: list[torch.Tensor],
                            tokens: list[int]) -> None:  # fmt: skip
    """Normal mode sends before it knows whether the blocks are large enough: into blocks of fewer rows than some
    source sends, send_rows writes the slots that fit (the bytes of full-size blocks) and not one byte more.
    Called after the full-size send into ``world.dispatch``."""
    ranks, row_bytes, local = world.ranks, world.row_bytes, EXPERTS // world.ranks
    payload = world.ids_at + 8 * inputs[0].topk.topk_ids.shape[1]
    small = max(1, max(tokens) // 2)
    size = ranks * small * row_bytes
    arenas = [torch.randint(0, 256, (size + 4096,), dtype=torch.uint8) for _ in range(ranks)]  # tail = guard
    before = [a.clone() for a in arenas]
    blocks = [a[:size].view(ranks, small, row_bytes) for a in arenas]
    for rank, x in enumerate(inputs):
        kernels.send_rows(x.hidden, x.topk.topk_ids, x.topk.topk_weights, pos[rank], World.ptrs(blocks), small, rank,
                          local, world.ids_at, row_bytes, all_rows=False)  # fmt: skip
    overflowed = 0
    for dest in range(ranks):
        old = before[dest][:size].view(ranks, small, row_bytes)
        for source in range(ranks):
            sent = int(world.meta[dest][source, 0])
            fit = min(sent, small)
            overflowed += sent > small
            # a row's bytes past its ids and weights are padding nobody writes
            assert torch.equal(blocks[dest][source, :fit, :payload], world.dispatch[dest][source, :fit, :payload])
            assert torch.equal(blocks[dest][source, fit:], old[source, fit:])
        assert torch.equal(arenas[dest][size:], before[dest][size:])
    assert overflowed, "the case never overflows a block: it checks nothing"


@needs_triton
@pytest.mark.parametrize("case", range(len(CASES)))
def test_low_latency_kernels_deliver_every_block_and_combine_to_the_reference(case: int,
                                                                              interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "_child_check", "check_low_latency", case, timeout_s=300)


@needs_triton
@pytest.mark.parametrize("case", range(len(CASES)))
def test_normal_kernels_route_send_only_routed_rows_and_combine_to_the_reference(case: int,
                                                                                interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "_child_check", "check_normal", case, timeout_s=300)
