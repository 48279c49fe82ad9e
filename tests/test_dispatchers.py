"""Expert-parallel dispatchers across real processes (gloo on 127.0.0.1), against references built in the test.

Every rank generates every rank's inputs from one seed, so each can compute, independently of the dispatcher,
which (token, expert) pairs it must receive and what the single-process, all-experts result is.
"""

from __future__ import annotations

import socket
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pd.moe.context import MoeContext
from pd.moe.dispatcher import dispatcher_names, get_dispatcher
from pd.moe.dispatcher.a2a_transport import LowLatencyHandle
from pd.moe.dispatcher.base import Dispatcher, DispatchFormat, DispatchOutput
from pd.moe.long_seq import (
    LongSeqConfig,
    check_hccl_buffsize,
    check_tokens_per_rank,
    hccl_buffsize_report,
    hccl_buffsize_with_rounds_mb,
    hccl_buffsize_without_rounds_mb,
    long_seq_config_from_env,
)
from pd.moe.runner.torch_ref import TorchMoeRunner
from pd.moe.topk import TopKOutput

HIDDEN, INTER, EXPERTS = 16, 8, 8
TAG_SCALE = 4096.0  # hidden[:, 0] = (rank * 1000 + token) / 4096: exact in fp32, identifies a received row


# ---- multi-process plumbing ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        torch.set_num_threads(1)
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined by gloo; a failure in any re-raises here. A port
    taken between _free_port and rank 0's listen (another test of the parallel suite) is retried with a new one."""
    for attempt in range(3):
        try:
            mp.spawn(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True)
            return
        except mp.ProcessRaisedException as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise


# ---- inputs and references -------------------------------------------------------------------------------------


@dataclass
class RankInputs:
    hidden: torch.Tensor  # [T, H] float32, column 0 = identity tag
    topk: TopKOutput


def _make_inputs(seed: int, tokens: list[int], top_k: int, unrouted: bool) -> list[RankInputs]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rank, num in enumerate(tokens):
        hidden = torch.randn(num, HIDDEN, generator=gen)
        hidden[:, 0] = (rank * 1000 + torch.arange(num, dtype=torch.float32)) / TAG_SCALE
        ids = torch.rand(num, EXPERTS, generator=gen).topk(top_k, dim=-1).indices
        if unrouted:  # slots that select no expert (-1) must be ignored everywhere
            ids = ids.masked_fill(torch.rand(num, top_k, generator=gen) < 0.2, -1)
        weights = torch.rand(num, top_k, generator=gen)
        out.append(RankInputs(hidden, TopKOutput(ids, weights, None)))
    return out


def _make_weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 7)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) * HIDDEN**-0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) * INTER**-0.5
    return w13, w2


def _single_rank_reference(inputs: list[RankInputs], w13: torch.Tensor, w2: torch.Tensor) -> list[torch.Tensor]:
    """All tokens of all ranks, all experts, one process (the EP=1 path); split back per rank."""
    hidden = torch.cat([x.hidden for x in inputs])
    ids = torch.cat([x.topk.topk_ids for x in inputs])
    weights = torch.cat([x.topk.topk_weights for x in inputs])
    out = TorchMoeRunner().run(DispatchOutput(hidden, ids, weights, None), w13, w2).hidden_states
    return list(out.split([x.hidden.shape[0] for x in inputs]))


def _expected_pairs(inputs: list[RankInputs], rank: int, world: int) -> list[tuple[int, int, int, float]]:
    """(source rank, token, local expert, weight) of every slot routed to ``rank``'s experts."""
    per_rank = EXPERTS // world
    pairs = []
    for src, x in enumerate(inputs):
        rows = zip(x.topk.topk_ids.tolist(), x.topk.topk_weights.tolist(), strict=True)
        for token, (ids, weights) in enumerate(rows):
            for expert, weight in zip(ids, weights, strict=True):
                if expert >= 0 and expert // per_rank == rank:
                    pairs.append((src, token, expert - rank * per_rank, weight))
    return sorted(pairs)


def _sender(row: torch.Tensor, inputs: list[RankInputs]) -> tuple[int, int]:
    """(source rank, token) a received row came from, by its tag; the row must be the sender's, bit for bit."""
    src, token = divmod(int(round(row[0].item() * TAG_SCALE)), 1000)
    assert torch.equal(row, inputs[src].hidden[token])
    return src, token


def _check_received(out: DispatchOutput, inputs: list[RankInputs], rank: int, world: int) -> None:
    """The rank got exactly its (token, expert) pairs with the sender's hidden rows: in the standard format each
    token once; in the batched format each (token, expert) once, in rows below the expert's count, every such row
    a slot's (the weights are in the handle's ExpertRows)."""
    got, seen = [], set()
    if out.format == DispatchFormat.BATCHED:
        rows = out.handle.expert_rows
        counts = out.expert_counts.tolist()
        x_EMH = out.hidden_states
        assert x_EMH.shape[1] == rows.max_rows and rows.slot_NK.shape == rows.weights_NK.shape
        used = set()
        for slots, weights in zip(rows.slot_NK.tolist(), rows.weights_NK.tolist(), strict=True):
            for slot, weight in zip(slots, weights, strict=True):
                if slot < 0:
                    continue
                expert, j = divmod(slot, rows.max_rows)
                assert j < counts[expert], f"slot {slot} past expert {expert}'s {counts[expert]} rows on rank {rank}"
                used.add((expert, j))
                got.append((*_sender(x_EMH[expert, j], inputs), expert, weight))
        assert used == {(e, j) for e, n in enumerate(counts) for j in range(n)}, "rows no slot points at"
        for expert, n in enumerate(counts):
            for j in range(n):
                key = (*_sender(x_EMH[expert, j], inputs), expert)
                assert key not in seen, f"{key} arrived twice on rank {rank}"
                seen.add(key)
        assert sorted(got) == _expected_pairs(inputs, rank, world)
        return
    for row, ids, weights in zip(out.hidden_states, out.topk_ids.tolist(), out.topk_weights.tolist(), strict=True):
        if all(e < 0 for e in ids):
            continue
        src, token = _sender(row, inputs)
        assert (src, token) not in seen, f"token {token} of rank {src} arrived twice on rank {rank}"
        seen.add((src, token))
        got += [(src, token, e, w) for e, w in zip(ids, weights, strict=True) if e >= 0]
    assert sorted(got) == _expected_pairs(inputs, rank, world)


def _run_moe(
    dispatcher: Dispatcher, x: RankInputs, w13: torch.Tensor, w2: torch.Tensor, rank: int, world: int
) -> tuple[DispatchOutput, torch.Tensor]:
    local = slice(rank * EXPERTS // world, (rank + 1) * EXPERTS // world)
    dispatched = dispatcher.dispatch(x.hidden, x.topk)
    combined = dispatcher.combine(TorchMoeRunner().run(dispatched, w13[local], w2[local]))
    return dispatched, combined


# ---- workers (run inside the spawned ranks) ---------------------------------------------------------------------

BACKENDS = (("none", {}), ("torch", {"mode": "normal"}), ("torch", {"mode": "low_latency", "max_tokens_per_rank": 12}))


def _worker_dispatchers(rank: int, world: int, tokens: list[int]) -> None:
    ctx = MoeContext(ep_rank=rank, ep_size=world, group=dist.group.WORLD)
    with pytest.raises(ValueError, match="but its group has rank"):
        get_dispatcher(
            "none", MoeContext(ep_rank=(rank + 1) % world, ep_size=world, group=dist.group.WORLD), num_experts=EXPERTS
        )
    # symmetric memory needs CUDA ranks of one host; asking for it elsewhere fails at the first dispatch
    required = get_dispatcher("torch", ctx, num_experts=EXPERTS, mode="low_latency", transport="symm_mem")
    x = _make_inputs(1, tokens, 2, False)[rank]
    with pytest.raises(ValueError, match="transport='symm_mem' needs"):
        required.dispatch(x.hidden, x.topk)
    for case, (top_k, unrouted) in enumerate([(1, False), (3, False), (2, True)]):
        for name, options in BACKENDS:
            seed = 100 * case + len(name) + len(options)
            # "none" is the replicated-token layout: every rank holds the same batch.
            inputs = _make_inputs(seed, [tokens[0]] if name == "none" else tokens, top_k, unrouted)
            mine = inputs[0] if name == "none" else inputs[rank]
            w13, w2 = _make_weights(seed)
            dispatcher = get_dispatcher(name, ctx, num_experts=EXPERTS, **options)
            dispatched, combined = _run_moe(dispatcher, mine, w13, w2, rank, world)
            what = f"{name} {options} K={top_k} unrouted={unrouted} rank {rank}"
            _check_received(dispatched, inputs, rank, world)
            if name == "none":  # every token stays, masked to this rank's experts
                assert dispatched.hidden_states.shape[0] == tokens[0], what
            assert dispatched.format == dispatcher.output_format, what
            if options.get("mode") == "low_latency":  # per local expert, padding never reaches the runner
                assert isinstance(dispatched.handle, LowLatencyHandle), what
                assert dispatched.format == DispatchFormat.BATCHED, what
                assert dispatched.hidden_states.shape == (EXPERTS // world, world * 12, HIDDEN), what
                want = torch.bincount(torch.tensor([e for _, _, e, _ in _expected_pairs(inputs, rank, world)],
                                                   dtype=torch.int64), minlength=EXPERTS // world)  # fmt: skip
                assert dispatched.expert_counts.tolist() == want.tolist(), what
            reference = _single_rank_reference(inputs, w13, w2)[0 if name == "none" else rank]
            assert combined.shape == mine.hidden.shape, what
            torch.testing.assert_close(combined, reference, atol=1e-5, rtol=1e-5, msg=what)


def _worker_two_batches_in_flight(rank: int, world: int, tokens: list[int]) -> None:
    """Two micro-batches with their transfers in flight together (as two-batch overlap runs them): start A, start
    B, finish A, ... Each still delivers exactly its pairs and combines to the single-rank reference."""
    ctx = MoeContext(ep_rank=rank, ep_size=world, group=dist.group.WORLD)
    local = slice(rank * EXPERTS // world, (rank + 1) * EXPERTS // world)
    for name, options in BACKENDS:
        batches = [_make_inputs(seed, [tokens[0]] if name == "none" else tokens, 2, True) for seed in (5, 6)]
        w13, w2 = _make_weights(5)
        dispatcher = get_dispatcher(name, ctx, num_experts=EXPERTS, **options)
        mine = [inputs[0] if name == "none" else inputs[rank] for inputs in batches]
        finish = [dispatcher.dispatch_start(x.hidden, x.topk) for x in mine]
        dispatched = [f() for f in finish]
        finish_back = [dispatcher.combine_start(TorchMoeRunner().run(d, w13[local], w2[local])) for d in dispatched]
        combined = [f() for f in finish_back]
        for inputs, d, c, x in zip(batches, dispatched, combined, mine, strict=True):
            _check_received(d, inputs, rank, world)
            reference = _single_rank_reference(inputs, w13, w2)[0 if name == "none" else rank]
            torch.testing.assert_close(c, reference, atol=1e-5, rtol=1e-5, msg=f"{name} {options}")
            assert c.shape == x.hidden.shape


def _worker_long_seq(rank: int, world: int, tokens: list[int]) -> None:
    ctx = MoeContext(ep_rank=rank, ep_size=world, group=dist.group.WORLD)
    top_k, per_round = 2, 32
    inputs = _make_inputs(11, tokens, top_k, unrouted=False)
    w13, w2 = _make_weights(11)
    reference = _single_rank_reference(inputs, w13, w2)[rank]
    calls: list[tuple[str, torch.Size, torch.Size]] = []
    phase = ["dispatch"]
    original = dist.all_to_all_single

    def spy(out: torch.Tensor, inp: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if inp.dtype in (torch.float32, torch.uint8):  # token rows (payload bytes out, hidden back); counts are int64
            calls.append((phase[0], inp.shape, out.shape))
        return original(out, inp, *args, **kwargs)

    def run(long_seq: LongSeqConfig | None) -> tuple[torch.Tensor, list[tuple[str, torch.Size, torch.Size]]]:
        calls.clear()
        dispatcher = get_dispatcher("torch", ctx, num_experts=EXPERTS, mode="normal", long_seq=long_seq)
        local = slice(rank * EXPERTS // world, (rank + 1) * EXPERTS // world)
        phase[0] = "dispatch"
        dispatched = dispatcher.dispatch(inputs[rank].hidden, inputs[rank].topk)
        _check_received(dispatched, inputs, rank, world)
        partial = TorchMoeRunner().run(dispatched, w13[local], w2[local])
        phase[0] = "combine"
        return dispatcher.combine(partial), list(calls)

    dist.all_to_all_single = spy
    try:
        one_round, one_calls = run(None)
        send_bound, recv_bound = per_round * min(top_k, world), per_round * world
        rounds = -(-max(tokens) // per_round)
        for combine_rounds in (True, False):
            cfg = LongSeqConfig(per_round_tokens=per_round, rounds=4, combine_enabled=combine_rounds)
            out, rounds_calls = run(cfg)
            torch.testing.assert_close(out, one_round, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
            dispatch = [(i, o) for p, i, o in rounds_calls if p == "dispatch"]
            combine = [(i, o) for p, i, o in rounds_calls if p == "combine"]
            assert len(dispatch) == rounds
            assert max(i[0] for i, _ in dispatch) <= send_bound and max(o[0] for _, o in dispatch) <= recv_bound
            assert sum(i[0] for i, _ in dispatch) == sum(i[0] for p, i, _ in one_calls if p == "dispatch")
            if combine_rounds:
                assert len(combine) == rounds
                assert max(i[0] for i, _ in combine) <= recv_bound and max(o[0] for _, o in combine) <= send_bound
            else:
                assert len(combine) == 1 and combine[0][1][0] == sum(i[0] for i, _ in dispatch)
        if tokens[rank] > send_bound:  # the bound is not vacuous: one round needs a bigger buffer here
            assert max(i[0] for p, i, _ in one_calls if p == "dispatch") > send_bound
    finally:
        dist.all_to_all_single = original

    # One rank over rounds x tokens: every rank fails with the same message (no rank is left in a collective).
    too_many = LongSeqConfig(per_round_tokens=per_round, rounds=1)
    dispatcher = get_dispatcher("torch", ctx, num_experts=EXPERTS, long_seq=too_many)
    x = inputs[rank] if rank != 0 else _make_inputs(3, [per_round + 1], top_k, unrouted=False)[0]
    with pytest.raises(ValueError, match="1 x 32 = 32"):
        dispatcher.dispatch(x.hidden, x.topk)


class _FakeDeepEPBuffer:
    """One-rank stand-in with the semantics DeepEP documents for ``deep_ep.Buffer`` (NOT DeepEP itself): it lets
    the adapter code in pd/moe/dispatcher/deepep.py run on CPU; the real kernels are not exercised."""

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int) -> tuple[Any, ...]:
        in_rank = (topk_idx >= 0).any(dim=1, keepdim=True)
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts)
        return in_rank.sum(0), None, per_expert, in_rank, None

    def dispatch(self, x: torch.Tensor, **kw: Any) -> tuple[Any, ...]:
        keep = kw["is_token_in_rank"][:, 0]
        ids = kw["topk_idx"][keep]
        counts = torch.bincount(ids[ids >= 0], minlength=kw["num_tokens_per_expert"].numel()).tolist()
        return x[keep], ids, kw["topk_weights"][keep], counts, keep, None

    def combine(self, x: torch.Tensor, handle: torch.Tensor) -> tuple[Any, ...]:
        out = x.new_zeros(handle.shape[0], x.shape[1])
        out[handle] = x  # unweighted sum over ranks (one rank here)
        return out, None, None

    def low_latency_dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, cap: int, num_experts: int, use_fp8: bool
    ) -> tuple[Any, ...]:
        assert not use_fp8
        recv = x.new_zeros(num_experts, cap, x.shape[1])
        slots: dict[tuple[int, int], tuple[int, int]] = {}
        counts = [0] * num_experts
        for t, ids in enumerate(topk_idx.tolist()):
            for k, e in enumerate(ids):
                if e >= 0:
                    recv[e, counts[e]] = x[t]
                    slots[(t, k)] = (e, counts[e])
                    counts[e] += 1
        return recv, torch.tensor(counts), slots, None, None

    def low_latency_combine(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: Any
    ) -> tuple[Any, ...]:
        out = x.new_zeros(topk_idx.shape[0], x.shape[-1])
        for (t, k), (e, row) in handle.items():  # weighted sum, as DeepEP's low-latency combine does
            out[t] += topk_weights[t, k] * x[e, row]
        return out, None, None


@pytest.mark.parametrize("mode", ["normal", "low_latency"])
def test_deepep_adapter_against_one_rank_fake_buffer(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deep_ep", types.ModuleType("deep_ep"))
    x = _make_inputs(21, [9], 3, unrouted=True)[0]
    w13, w2 = _make_weights(21)
    dispatcher = get_dispatcher(
        "deepep", MoeContext(), num_experts=EXPERTS, mode=mode, max_tokens_per_rank=9, buffer=_FakeDeepEPBuffer()
    )
    dispatched, combined = _run_moe(dispatcher, x, w13, w2, rank=0, world=1)
    assert dispatched.format == dispatcher.output_format
    if mode == "low_latency":  # DeepEP's [E_local, R * C, H] buffer and counts, handed on as they are
        ids = x.topk.topk_ids
        assert dispatched.format == DispatchFormat.BATCHED and dispatched.hidden_states.shape == (EXPERTS, 9, HIDDEN)
        assert dispatched.expert_counts.tolist() == torch.bincount(ids[ids >= 0], minlength=EXPERTS).tolist()
    torch.testing.assert_close(combined, _single_rank_reference([x], w13, w2)[0], atol=1e-5, rtol=1e-5)


# ---- tests -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [[7, 0], [5, 0, 9, 3]], ids=["ep2", "ep4"])
def test_dispatchers_deliver_routed_pairs_and_match_single_rank_moe(tokens: list[int]) -> None:
    _spawn(len(tokens), _worker_dispatchers, tokens)


@pytest.mark.parametrize("tokens", [[5, 0], [9, 4, 7, 3]])
def test_two_micro_batches_in_flight_together_each_match_single_rank_moe(tokens: list[int]) -> None:
    _spawn(len(tokens), _worker_two_batches_in_flight, tokens)


@pytest.mark.parametrize("tokens", [[100, 45], [70, 0, 100, 33]], ids=["ep2", "ep4"])
def test_long_seq_rounds_match_one_round_with_per_round_buffers(tokens: list[int]) -> None:
    _spawn(len(tokens), _worker_long_seq, tokens)


def test_registry_and_single_process_errors() -> None:
    assert {"none", "torch", "deepep"} <= set(dispatcher_names())
    with pytest.raises(ImportError, match="deep_ep"):
        get_dispatcher("deepep", MoeContext(), num_experts=EXPERTS)
    with pytest.raises(ValueError, match="needs MoeContext.group"):
        get_dispatcher("torch", MoeContext(ep_rank=0, ep_size=2), num_experts=EXPERTS)
    with pytest.raises(ValueError, match="mode"):
        get_dispatcher("torch", MoeContext(), num_experts=EXPERTS, mode="fast")
    with pytest.raises(ValueError, match="transport must be one of"):
        get_dispatcher("torch", MoeContext(), num_experts=EXPERTS, mode="low_latency", transport="rdma")
    x = _make_inputs(5, [13], 2, unrouted=False)[0]
    low_latency = get_dispatcher("torch", MoeContext(), num_experts=EXPERTS, mode="low_latency", max_tokens_per_rank=12)
    with pytest.raises(ValueError, match="max_tokens_per_rank=12"):
        low_latency.dispatch(x.hidden, x.topk)
    # The context's group is wiring, not placement: it stays out of equality and hashing.
    assert MoeContext(group=object()) == MoeContext() and hash(MoeContext(group=object())) == hash(MoeContext())


def test_long_seq_config_from_env_and_misconfiguration() -> None:
    assert long_seq_config_from_env({}) == LongSeqConfig()
    cfg = long_seq_config_from_env(
        {
            "DEEPEP_NORMAL_LONG_SEQ_ROUND": "32",
            "DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS": "3584",
            "DEEPEP_NORMAL_COMBINE_ENABLE_LONG_SEQ": "1",
            "HCCL_BUFFSIZE": "2000",
        }
    )
    assert (cfg.rounds, cfg.per_round_tokens, cfg.combine_enabled, cfg.hccl_buffsize_mb) == (32, 3584, True, 2000)
    assert cfg.capacity == 32 * 3584
    bad = [
        ({"DEEPEP_NORMAL_LONG_SEQ_ROUND": "4"}, "DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS is not"),
        ({"DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS": "512"}, "DEEPEP_NORMAL_LONG_SEQ_ROUND is not"),
        ({"DEEPEP_NORMAL_COMBINE_ENABLE_LONG_SEQ": "1"}, "needs DEEPEP_NORMAL_LONG_SEQ_ROUND"),
        ({"DEEPEP_NORMAL_LONG_SEQ_ROUND": "64", "DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS": "4096"}, "exceeds 131072"),
        ({"DEEPEP_NORMAL_LONG_SEQ_ROUND": "x", "DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS": "512"}, "not an integer"),
        ({"DEEPEP_NORMAL_LONG_SEQ_ROUND": "2", "DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS": "16"}, r"\[32, 8192\]"),
    ]
    for env, message in bad:
        with pytest.raises(ValueError, match=message):
            long_seq_config_from_env(env)
    # 64 x 2048 = 131072 is the largest accepted product.
    assert (
        long_seq_config_from_env(
            {"DEEPEP_NORMAL_LONG_SEQ_ROUND": "64", "DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS": "2048"}
        ).capacity
        == 131072
    )
    small = LongSeqConfig(per_round_tokens=512, rounds=5)
    check_tokens_per_rank(small, 2560)
    with pytest.raises(ValueError, match="2561 tokens on one rank.*5 x 512 = 2560"):
        check_tokens_per_rank(small, 2561)
    check_tokens_per_rank(LongSeqConfig(), 10**6)  # rounds disabled: no bound


def test_hccl_buffsize_formulas_against_hand_computed_values() -> None:
    # With rounds: 2 * (102 + 4 + ceil(P * 3H * K / 2**20)) + padding.
    # P=8192, H=7168, K=8: 8192 * 21504 * 8 B = 1344 MiB -> 2 * (106 + 1344) + 20 = 2920.
    assert hccl_buffsize_with_rounds_mb(8192, 7168, 8) == 2920
    # P=1000, H=4096, K=8: 98,304,000 B = 93.75 MiB -> 94 -> 2 * (106 + 94) + 20 = 420.
    assert hccl_buffsize_with_rounds_mb(1000, 4096, 8) == 420
    assert hccl_buffsize_with_rounds_mb(1000, 4096, 8, padding_mb=50) == 450
    # Without rounds: 2 * (106 + ceil(T * 2H * K / 2**20)) + padding.
    # T=8192, H=7168, K=8: 8192 * 14336 * 8 B = 896 MiB -> 2 * (106 + 896) + 20 = 2024.
    assert hccl_buffsize_without_rounds_mb(8192, 7168, 8) == 2024
    # T=1, H=1, K=1: 2 B -> 1 MiB (rounded up) -> 2 * 107 + 20 = 234.
    assert hccl_buffsize_without_rounds_mb(1, 1, 1) == 234

    rounds = LongSeqConfig(per_round_tokens=1000, rounds=4, hccl_buffsize_mb=420)
    check_hccl_buffsize(rounds, hidden_size=4096, top_k=8, max_tokens_per_rank=4000)
    with pytest.raises(ValueError, match="HCCL_BUFFSIZE=419 MB is too small.*>= 420 MB"):
        check_hccl_buffsize(
            LongSeqConfig(per_round_tokens=1000, rounds=4, hccl_buffsize_mb=419), 4096, 8, max_tokens_per_rank=4000
        )
    with pytest.raises(ValueError, match="HCCL_BUFFSIZE=200 MB"):  # unset: HCCL's default 200 MB
        check_hccl_buffsize(LongSeqConfig(), hidden_size=7168, top_k=8, max_tokens_per_rank=8192)

    report = hccl_buffsize_report(rounds, hidden_size=4096, top_k=8, max_tokens_per_rank=4000)
    assert "4 rounds x 1000 tokens" in report and ">= 420 MB" in report and "HCCL_BUFFSIZE=420 MB -> OK" in report
    report = hccl_buffsize_report(LongSeqConfig(), hidden_size=7168, top_k=8, max_tokens_per_rank=8192)
    assert "unset" in report and "TOO SMALL: export HCCL_BUFFSIZE=2024" in report
    over = hccl_buffsize_report(rounds, hidden_size=4096, top_k=8, max_tokens_per_rank=4001)
    assert "ERROR: 4001 tokens per rank exceed rounds x tokens = 4000" in over


def test_hccl_buffsize_cli_reads_the_checkpoint_and_the_environment(tmp_path: Any, capsys: Any,
                                                                    monkeypatch: Any) -> None:  # fmt: skip
    """`pd hccl-buffsize`: the requirement from the seed's formula (computed here by hand), exit status 1 while the
    configured HCCL_BUFFSIZE is short of it, 0 once it is not, 2 for missing sizes or bad variables."""
    import json
    import random

    from launch.cli import main

    rng = random.Random()
    hidden, top_k, per_round = rng.choice([2048, 4096, 7168]), rng.choice([2, 6, 8]), rng.randrange(32, 8192)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": hidden, "num_experts_per_tok": top_k}))
    needed = 2 * (102 + 4 + -(-per_round * 3 * hidden * top_k // 2**20)) + 20
    monkeypatch.setenv("DEEPEP_NORMAL_LONG_SEQ_ROUND", "4")
    monkeypatch.setenv("DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS", str(per_round))
    argv = ["hccl-buffsize", "--model-path", str(tmp_path), "--max-tokens-per-rank", str(4 * per_round)]
    for configured, status in ((needed - 1, 1), (needed, 0)):
        monkeypatch.setenv("HCCL_BUFFSIZE", str(configured))
        assert main(argv) == status
        out = capsys.readouterr().out
        assert f"hidden_size={hidden} top_k={top_k}" in out and f">= {needed} MB" in out
    assert main([*argv[:-1], str(4 * per_round + 1)]) == 1  # more tokens than 4 rounds move
    assert "ERROR" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["hccl-buffsize", "--hidden-size", "7168"])
    assert e.value.code == 2
    monkeypatch.delenv("DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "set both" in capsys.readouterr().err
