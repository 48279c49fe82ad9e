"""CUDA: the torch backend over symmetric memory against the same backend over NCCL all-to-all, both modes, EP=2
and EP=4 (not run in CI; needs >= 2 GPUs of one host).

Built from tests/test_dispatchers.py (inputs, delivery check, single-rank reference). Per case, on NCCL ranks:
- delivery: each rank receives exactly the (token, local expert, weight) triples routed to it, rows bit for bit;
- the symmetric-memory dispatch output equals the NCCL one bit for bit (same rows in the same order, same slots;
  low_latency: the same counts, rows below them and slots of the batched layout), and combine matches it to
  float32 rounding (the same partials, summed by another kernel);
- both equal the single-rank MoE reference within float32 tolerance;
- normal mode: small batches after the first replay CUDA graphs (pd.moe.dispatcher.symm_graphs) and stay exact; a
  batch larger than the blocks grows them (every rank alike, graphed ranks resending eagerly) and stays exact;
- low_latency: a CUDA graph captured once and replayed on fresh routings gives the eager NCCL results.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pd.moe.context import MoeContext
from pd.moe.dispatcher import get_dispatcher
from pd.moe.dispatcher.base import CombineInput, Dispatcher, DispatchFormat, DispatchOutput, ExpertRows
from pd.moe.dispatcher.symm_graphs import GraphedHandle
from pd.moe.dispatcher.symm_transport import SymmetricHandle
from pd.moe.runner.torch_ref import TorchMoeRunner
from pd.moe.topk import TopKOutput
from tests.test_dispatchers import EXPERTS, _check_received, _make_inputs, _make_weights, _single_rank_reference

pytestmark = pytest.mark.gpu

CAPACITY = 48


def _entry(rank: int, world: int, port: int, tokens: list[int], seed: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=120), device_id=torch.device("cuda", rank),
    )  # fmt: skip
    try:
        _worker(rank, world, tokens, seed)
    finally:
        dist.destroy_process_group()


def _on_gpu(x: Any) -> tuple[torch.Tensor, TopKOutput]:
    return x.hidden.cuda(), TopKOutput(x.topk.topk_ids.cuda(), x.topk.topk_weights.cuda(), None)


def _moe(out: DispatchOutput, w13: torch.Tensor, w2: torch.Tensor) -> CombineInput:
    return TorchMoeRunner().run(out, w13, w2)


def _same_layout(a: DispatchOutput, b: DispatchOutput) -> bool:
    """The same received rows in the same places: standard rows, ids and weights; or (low_latency, batched) the
    same counts, the same rows below them (the rows past them are unspecified) and the same slots and weights."""
    if a.format != b.format or a.hidden_states.shape != b.hidden_states.shape:
        return False
    if a.format == DispatchFormat.STANDARD:
        return all(torch.equal(x, y) for x, y in ((a.hidden_states, b.hidden_states), (a.topk_ids, b.topk_ids),
                                                  (a.topk_weights, b.topk_weights)))  # fmt: skip
    ra, rb = a.handle.expert_rows, b.handle.expert_rows
    counts = a.expert_counts.tolist()
    return (torch.equal(a.expert_counts, b.expert_counts) and torch.equal(ra.slot_NK, rb.slot_NK)
            and torch.equal(ra.weights_NK, rb.weights_NK)
            and all(torch.equal(a.hidden_states[e, :n], b.hidden_states[e, :n]) for e, n in enumerate(counts)))


def _on_cpu(out: DispatchOutput) -> DispatchOutput:
    if out.format == DispatchFormat.STANDARD:
        return DispatchOutput(out.hidden_states.cpu(), out.topk_ids.cpu(), out.topk_weights.cpu(), None)
    rows = out.handle.expert_rows
    handle = SimpleNamespace(expert_rows=ExpertRows(rows.slot_NK.cpu(), rows.weights_NK.cpu(), rows.max_rows))
    return DispatchOutput.batched(out.hidden_states.cpu(), out.expert_counts.cpu(), handle)


def _compare(symm: Dispatcher, nccl: Dispatcher, tokens: list[int], seed: int, top_k: int, unrouted: bool,
             rank: int, world: int) -> type:  # fmt: skip
    """One dispatch + combine on each transport, compared; returns the symmetric dispatch's handle type."""
    what = f"seed {seed} K={top_k} unrouted={unrouted} rank {rank} tokens {tokens} mode {symm.mode}"
    local = slice(rank * EXPERTS // world, (rank + 1) * EXPERTS // world)
    inputs = _make_inputs(seed, tokens, top_k, unrouted)
    w13, w2 = (w[local].cuda() for w in _make_weights(seed))
    hidden, topk = _on_gpu(inputs[rank])
    (out_s, comb_s), (out_n, comb_n) = [
        (out, d.combine(_moe(out, w13, w2))) for d in (symm, nccl) for out in [d.dispatch(hidden, topk)]
    ]
    assert isinstance(out_s.handle, (SymmetricHandle, GraphedHandle)), f"{what}: symmetric memory was not used"
    assert _same_layout(out_s, out_n), what
    torch.testing.assert_close(comb_s, comb_n, rtol=1e-6, atol=1e-6, msg=what)
    _check_received(_on_cpu(out_s), inputs, rank, world)
    reference = _single_rank_reference(inputs, *_make_weights(seed))[rank]
    torch.testing.assert_close(comb_s.cpu(), reference, atol=1e-5, rtol=1e-5, msg=what)
    return type(out_s.handle)


def _worker(rank: int, world: int, tokens: list[int], seed: int) -> None:
    ctx = MoeContext(ep_rank=rank, ep_size=world, group=dist.group.WORLD)
    for mode in ("normal", "low_latency"):
        options = {"num_experts": EXPERTS, "mode": mode, "max_tokens_per_rank": CAPACITY}
        symm = get_dispatcher("torch", ctx, transport="symm_mem", **options)
        nccl = get_dispatcher("torch", ctx, transport="nccl", **options)
        handles = [_compare(symm, nccl, tokens, seed + case, top_k, unrouted, rank, world)
                   for case, (top_k, unrouted) in enumerate([(1, False), (3, False), (2, True), (2, False)])]
        if mode == "normal":
            # The first dispatch sizes the blocks eagerly; later small batches replay CUDA graphs (K=3 included).
            assert handles[0] is SymmetricHandle and set(handles[1:]) == {GraphedHandle}, handles
            # More tokens than the blocks hold (some ranks over GRAPH_MAX_TOKENS, others under it): the blocks
            # grow on every rank alike, graphed ranks resend eagerly; then small batches replay new graphs.
            grown = [t * 7 + 60 for t in tokens]  # the largest over 256 rows, others under
            assert _compare(symm, nccl, grown, seed + 5, 2, True, rank, world) is SymmetricHandle
            assert _compare(symm, nccl, tokens, seed + 6, 2, True, rank, world) is GraphedHandle
    _graph_replays(ctx, rank, world, tokens, seed)
    _two_in_flight(ctx, rank, world, tokens, seed)
    torch.cuda.synchronize()
    dist.barrier()


def _two_in_flight(ctx: MoeContext, rank: int, world: int, tokens: list[int], seed: int) -> None:
    """Two micro-batches (two-batch overlap): A's and B's dispatch started before either's experts run, then both
    combines. They go over NCCL's all_to_all_single even where single dispatches use symmetric memory (whose blocks
    the second dispatch would overwrite), interleaved with symmetric-memory dispatches of the same dispatcher."""
    local = slice(rank * EXPERTS // world, (rank + 1) * EXPERTS // world)
    for mode in ("normal", "low_latency"):
        dispatcher = get_dispatcher("torch", ctx, num_experts=EXPERTS, mode=mode, max_tokens_per_rank=CAPACITY)
        batches = [_make_inputs(seed + 40 + i, tokens, 2, True) for i in range(3)]
        w13, w2 = (w[local].cuda() for w in _make_weights(seed + 40))
        single = dispatcher.dispatch(*_on_gpu(batches[2][rank]))  # symmetric memory, between the in-flight pair
        assert isinstance(single.handle, (SymmetricHandle, GraphedHandle))
        finish = [dispatcher.dispatch_start(*_on_gpu(inputs[rank])) for inputs in batches[:2]]
        dispatched = [f() for f in finish]
        finish_back = [dispatcher.combine_start(_moe(d, w13, w2)) for d in dispatched]
        single_out = dispatcher.combine(_moe(single, w13, w2))
        for inputs, got in zip(batches, [f() for f in finish_back] + [single_out], strict=True):
            reference = _single_rank_reference(inputs, *_make_weights(seed + 40))[rank]
            torch.testing.assert_close(got.cpu(), reference, atol=1e-5, rtol=1e-5, msg=f"two in flight, {mode}")


def _graph_replays(ctx: MoeContext, rank: int, world: int, tokens: list[int], seed: int) -> None:
    """low_latency dispatch and combine captured once each, replayed on fresh routings of the same shapes."""
    options = {"num_experts": EXPERTS, "mode": "low_latency", "max_tokens_per_rank": CAPACITY}
    symm = get_dispatcher("torch", ctx, transport="symm_mem", **options)
    nccl = get_dispatcher("torch", ctx, transport="nccl", **options)
    local = slice(rank * EXPERTS // world, (rank + 1) * EXPERTS // world)
    inputs = _make_inputs(seed + 10, tokens, 2, True)
    w13, w2 = (w[local].cuda() for w in _make_weights(seed + 10))
    hidden, topk = _on_gpu(inputs[rank])
    symm.dispatch(hidden, topk)  # the first dispatch sets up the transport, eagerly
    static_x, static_topk = hidden.clone(), TopKOutput(topk.topk_ids.clone(), topk.topk_weights.clone(), None)
    dispatch_graph, combine_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(dispatch_graph, capture_error_mode="thread_local"):
        static_out = symm.dispatch(static_x, static_topk)
    static_in = _moe(static_out, w13, w2)
    with torch.cuda.graph(combine_graph, capture_error_mode="thread_local"):
        static_combined = symm.combine(static_in)
    for replay in range(3):
        fresh = _make_inputs(seed + 20 + replay, tokens, 2, True)
        hidden, topk = _on_gpu(fresh[rank])
        static_x.copy_(hidden)
        static_topk.topk_ids.copy_(topk.topk_ids)
        static_topk.topk_weights.copy_(topk.topk_weights)
        dispatch_graph.replay()
        static_in.hidden_states.copy_(_moe(static_out, w13, w2).hidden_states)
        combine_graph.replay()
        out_n = nccl.dispatch(hidden, topk)
        comb_n = nccl.combine(_moe(out_n, w13, w2))
        what = f"graph replay {replay} rank {rank}"
        assert _same_layout(static_out, out_n), what
        torch.testing.assert_close(static_combined, comb_n, rtol=1e-6, atol=1e-6, msg=what)


@pytest.mark.parametrize("tokens", [[45, 23], [30, 0], [40, 0, 48, 17]], ids=["ep2", "ep2-idle-rank", "ep4"])
def test_symmetric_memory_transport_equals_nccl_in_both_modes_and_in_a_graph(tokens: list[int]) -> None:
    world = len(tokens)
    visible = torch.cuda.device_count()
    if visible < world:
        pytest.skip(f"needs {world} GPUs, {visible} visible")
    seed = int(torch.randint(0, 2**31 - 1000, ()).item())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    mp.spawn(_entry, args=(world, port, tokens, seed), nprocs=world, join=True)
