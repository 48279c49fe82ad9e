"""The torch backend's transports and their resource owner, apart from the dispatcher's numerics (tested in
tests/test_dispatchers.py):

- CommResources: each object is made once per key; every MoE layer built from one context holds that context's
  owner; a context made by dataclasses.replace starts with its own.
- Handles finish themselves: a batch dispatched in either mode combines to the single-rank MoE through either
  mode's dispatcher (gloo, 2 ranks), so combine depends on the handle alone.
- SymmetricTransport on CPU, both modes: R ranks are threads of one process running Triton's interpreter (as in
  tests/test_symm_kernels.py, each rank's symmetric buffers are plain CPU tensors that the kernels reach through
  their addresses), a barrier is a threading.Barrier, and the transport takes its buffers from a stand-in for the
  rank's CommResources. Normal mode's first dispatch grows the blocks from nothing and sends again; its second
  sends at once. Oracles: the delivery check and the single-rank MoE of tests/test_dispatchers.py, and normal
  mode's rows in the order all_to_all_single delivers them. The GPU run is tests/test_symm_exchange_gpu.py.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pickle
import threading
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from pd.moe.context import MoeContext
from pd.moe.dispatcher import get_dispatcher
from pd.moe.dispatcher.base import CombineInput, DispatchOutput
from pd.moe.dispatcher.symm_graphs import ENV_ENABLE as GRAPHS_ENV
from pd.moe.dispatcher.symm_transport import MIN_NORMAL_CAPACITY, SymmetricHandle, SymmetricTransport
from pd.moe.layer import FusedMoE
from pd.moe.runner.torch_ref import TorchMoeRunner
from pd.moe.topk import TopKConfig
from tests.interpreter_child import InterpreterChild
from tests.test_dispatchers import (
    EXPERTS,
    HIDDEN,
    INTER,
    TAG_SCALE,
    RankInputs,
    _check_received,
    _make_inputs,
    _make_weights,
    _single_rank_reference,
    _spawn,
)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed (the test extra installs it)")


def test_comm_resources_make_each_object_once_and_a_replaced_context_starts_its_own() -> None:
    ctx = MoeContext()
    made: list[object] = []

    def make() -> object:
        made.append(object())
        return made[-1]

    first = ctx.comm.get(("stream", "cpu"), make)
    assert ctx.comm.get(("stream", "cpu"), make) is first and made == [first]
    assert ctx.comm.get(("stream", "other"), make) is made[1]
    rank_ctx = dataclasses.replace(ctx, ep_rank=1, ep_size=2)
    assert rank_ctx.comm is not ctx.comm and rank_ctx.comm.get(("stream", "cpu"), make) is made[2]
    # not part of the placement: equality, hashing and repr ignore it, and a context still pickles (to its ranks)
    assert rank_ctx == dataclasses.replace(ctx, ep_rank=1, ep_size=2) and "comm" not in repr(ctx)
    assert hash(MoeContext()) == hash(ctx) and pickle.loads(pickle.dumps(MoeContext())) == MoeContext()


def _layers_share_the_owner_and_handles_finish_themselves(rank: int, world: int, seed: int) -> None:
    ctx = MoeContext(ep_rank=rank, ep_size=world, dispatcher="torch", a2a_mode="auto", max_tokens_per_rank=12,
                     group=dist.group.WORLD)  # fmt: skip
    layers = [FusedMoE(EXPERTS, HIDDEN, INTER, TopKConfig(top_k=2), ctx) for _ in range(3)]
    transports = [d.symm_transport for layer in layers for d in layer.dispatchers.values()]  # type: ignore[attr-defined]
    assert len(transports) == 6 and all(t is not None and t.comm is ctx.comm for t in transports)

    normal, low_latency = (get_dispatcher("torch", ctx, num_experts=EXPERTS, mode=mode, max_tokens_per_rank=12)
                           for mode in ("normal", "low_latency"))  # fmt: skip
    local = slice(rank * EXPERTS // world, (rank + 1) * EXPERTS // world)
    for made_by in (normal, low_latency):
        inputs = _make_inputs(seed, [5, 9], 2, True)
        w13, w2 = _make_weights(seed)
        out = made_by.dispatch(inputs[rank].hidden, inputs[rank].topk)
        y = TorchMoeRunner().run(out, w13[local], w2[local])
        reference = _single_rank_reference(inputs, w13, w2)[rank]
        for combiner in (normal, low_latency):
            got = combiner.combine(CombineInput(y.hidden_states, y.handle))
            torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5, msg=f"{made_by.mode} by {combiner.mode}")
        seed += 1


def test_every_layer_of_a_context_shares_its_owner_and_a_handle_combines_through_any_dispatcher() -> None:
    _spawn(2, _layers_share_the_owner_and_handles_finish_themselves, int(torch.randint(0, 2**31 - 100, ()).item()))


# ---- the symmetric transport on simulated ranks (Triton's interpreter, in the module's child) -------------------


def _ptrs(buffers: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)


class SimulatedGroup:
    """Every simulated rank's symmetric buffers and one barrier. An exchange's buffers are made when the first rank
    asks for its capacity (where a real group would rendezvous), filled with garbage, not zeros, so a row the
    transport forgets to write cannot pass for a blank one."""

    def __init__(self, ranks: int) -> None:
        self.ranks = ranks
        self.barrier = threading.Barrier(ranks, timeout=120)
        self.meta = [torch.full((ranks, 2), -7, dtype=torch.int64) for _ in range(ranks)]
        self._blocks: dict[tuple[int, int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._lock = threading.Lock()

    def wait(self) -> None:
        self.barrier.wait()

    def exchange(self, rank: int, capacity: int, row_bytes: int, hidden: int, dtype: torch.dtype) -> SimpleNamespace:
        """Rank ``rank``'s view of the exchange (SymmetricExchange's attributes)."""
        ranks, key = self.ranks, (capacity, row_bytes, hidden)
        with self._lock:
            if key not in self._blocks:
                rows = [torch.randint(0, 256, (ranks, capacity, row_bytes), dtype=torch.uint8) for _ in range(ranks)]
                self._blocks[key] = rows, [torch.randn(ranks, capacity, hidden).to(dtype) for _ in range(ranks)]
        dispatch, combine = self._blocks[key]
        return SimpleNamespace(capacity=capacity, dispatch_buffer=dispatch[rank], dispatch_peer_ptrs=_ptrs(dispatch),
                               combine_buffer=combine[rank], combine_peer_ptrs=_ptrs(combine),
                               full_counts=torch.full((ranks,), capacity, dtype=torch.int64), barrier=self.wait)


class SimulatedComm:
    """A rank's CommResources for the symmetric transport: its meta buffer (SymmetricMeta's attributes) and its
    exchanges, over the simulated group's buffers."""

    def __init__(self, group: SimulatedGroup, rank: int) -> None:
        self.group, self.rank = group, rank
        self.meta = SimpleNamespace(buffer=group.meta[rank], peer_ptrs=_ptrs(group.meta), barrier=group.wait,
                                    normal_capacity=0)  # fmt: skip

    def symmetric_meta(self, group: object, device: torch.device) -> SimpleNamespace:
        return self.meta

    def symmetric_exchange(self, group: object, capacity: int, row_bytes: int, hidden: int, dtype: torch.dtype,
                           device: torch.device) -> SimpleNamespace:  # fmt: skip
        return self.group.exchange(self.rank, capacity, row_bytes, hidden, dtype)


def _one_at_a_time(kernels: ModuleType) -> None:
    """The interpreter runs a kernel through module-wide state (its builder, the patched triton.language), so the
    rank threads take turns: each kernel function of ``kernels`` holds one lock while it runs."""
    if getattr(kernels, "_one_at_a_time", False):
        return
    lock = threading.Lock()

    def locked(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with lock:
            return fn(*args, **kwargs)

    for name in ("route", "send_rows", "unpack_rows", "send_back", "reduce_partials"):
        setattr(kernels, name, functools.partial(locked, getattr(kernels, name)))
    kernels._one_at_a_time = True  # type: ignore[attr-defined]


def _run_ranks(group: SimulatedGroup, step: Callable[[int], None]) -> None:
    """``step(rank)`` on one thread per rank; the first failure is raised here (the barrier is broken so that
    the other ranks stop waiting for it)."""
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            step(rank)
        except BaseException as e:
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(group.ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        raise (real or errors)[0]


def check_symmetric_transport(mode: str, tokens: list[int], top_k: int, unrouted: bool) -> None:
    """In the interpreter child: dispatch, the reference runner and the handle's combine on every rank (normal
    mode: twice, the first growing the blocks), against the single-rank MoE."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run in the interpreter child"
    import pd.moe.dispatcher.symm_kernels as kernels

    _one_at_a_time(kernels)
    os.environ[GRAPHS_ENV] = "0"  # the small-batch graphs need CUDA; this checks the eager steps they replay
    ranks, local = len(tokens), EXPERTS // len(tokens)
    group = SimulatedGroup(ranks)
    comms = [SimulatedComm(group, rank) for rank in range(ranks)]
    capacity = max(tokens) + 2  # low_latency: blocks of C rows, not all of them used
    transports = [SymmetricTransport(mode, group, ranks, rank, local, capacity, comm)  # type: ignore[arg-type]
                  for rank, comm in enumerate(comms)]  # fmt: skip
    for turn in range(2 if mode == "normal" else 1):
        seed = sum(tokens) * 10 + top_k + turn
        inputs: list[RankInputs] = _make_inputs(seed, tokens, top_k, unrouted)
        w13, w2 = _make_weights(seed)
        dispatched: list[DispatchOutput | None] = [None] * ranks
        combined: list[torch.Tensor | None] = [None] * ranks

        def step(rank: int, inputs: list[RankInputs] = inputs, w13: torch.Tensor = w13, w2: torch.Tensor = w2,
                 dispatched: list = dispatched, combined: list = combined) -> None:  # fmt: skip
            x = inputs[rank]
            out = transports[rank].dispatch(x.hidden, x.topk)
            y = TorchMoeRunner().run(out, w13[rank * local : (rank + 1) * local], w2[rank * local : (rank + 1) * local])
            assert isinstance(y.handle, SymmetricHandle)
            dispatched[rank], combined[rank] = out, y.handle.combine(y.hidden_states)

        _run_ranks(group, step)
        reference = _single_rank_reference(inputs, w13, w2)
        for rank in range(ranks):
            out, got = dispatched[rank], combined[rank]
            assert out is not None and got is not None
            _check_received(out, inputs, rank, ranks)
            if mode == "normal":  # source-major, token order within a source: what all_to_all_single delivers
                tags = (out.hidden_states[:, 0] * TAG_SCALE).round().long().tolist()
                assert tags == sorted(tags)
                assert comms[rank].meta.normal_capacity == MIN_NORMAL_CAPACITY  # grown once, by every rank alike
            torch.testing.assert_close(got, reference[rank], atol=1e-5, rtol=1e-5, msg=f"{mode} turn {turn}")


SYMMETRIC_CASES = [  # tokens per rank, top_k, unrouted slots
    ([7, 5], 2, False),
    ([6, 0, 9, 3], 3, True),  # an idle rank, K not a power of two, slots that select no expert
]


@needs_triton
@pytest.mark.parametrize("mode", ["normal", "low_latency"])
@pytest.mark.parametrize("case", range(len(SYMMETRIC_CASES)))
def test_symmetric_transport_on_simulated_ranks_delivers_and_combines_to_the_reference(
    mode: str, case: int, interpreter: InterpreterChild
) -> None:
    interpreter.run(__name__, "check_symmetric_transport", mode, *SYMMETRIC_CASES[case], timeout_s=300)
