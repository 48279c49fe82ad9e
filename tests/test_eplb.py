"""EPLB: the placement policy against DeepSeek's published example and brute force, and MoE layers on several
gloo ranks whose experts are rebalanced (weights moved between ranks) still matching the one-rank layer."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import pytest
import torch
import torch.distributed as dist

from pd.moe.context import EplbConfig, MoeContext
from pd.moe.eplb.algorithm import rebalance_experts, replicate_experts
from pd.moe.eplb.location import ExpertLocationError, read_location
from pd.moe.eplb.manager import EplbManager, balancedness, place_from_file
from pd.moe.eplb.migrate import plan_moves
from pd.moe.eplb.placement import LayerPlacement, dispatch_map, trivial_phy2log
from pd.moe.layer import FusedMoE
from pd.moe.topk import TopKConfig
from tests.test_dispatchers import _spawn


def test_hierarchical_policy_reproduces_deepseeks_published_example() -> None:
    # deepseek-ai/EPLB README: two layers of 12 experts, 16 slots, 4 groups, 2 nodes of 4 GPUs.
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])  # fmt: skip
    phy2log, log2phy, count = rebalance_experts(weight, 16, 4, 2, 8)
    published = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                              [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])  # fmt: skip
    assert torch.equal(phy2log, published)
    for layer in range(2):
        for expert in range(12):
            slots = [s for s in log2phy[layer, expert].tolist() if s >= 0]
            assert slots == [s for s in range(16) if phy2log[layer, s] == expert]
            assert len(slots) == count[layer, expert]


def test_replication_minimises_the_largest_load_per_replica_like_brute_force() -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    for experts, slots in ((3, 5), (4, 7), (5, 9)):
        weight = torch.randint(1, 1000, (6, experts), generator=gen).double()
        _, _, count = replicate_experts(weight, slots)
        for row in range(weight.shape[0]):
            best = min(
                max(w / c for w, c in zip(weight[row].tolist(), counts, strict=True))
                for counts in itertools.product(range(1, slots - experts + 2), repeat=experts)
                if sum(counts) == slots
            )
            assert float((weight[row] / count[row]).max()) == pytest.approx(best)


@pytest.mark.parametrize(("experts", "slots", "groups", "nodes", "gpus"),
                         [(16, 20, 4, 2, 4), (16, 24, 8, 2, 8), (8, 10, 1, 1, 2), (12, 18, 3, 2, 6)])  # fmt: skip
def test_placement_is_complete_and_keeps_groups_on_their_node(
    experts: int, slots: int, groups: int, nodes: int, gpus: int
) -> None:
    load = (torch.rand(3, experts) ** 4 * 1000).round() + 1  # skewed: a few hot experts
    phy2log, _, count = rebalance_experts(load, slots, groups, nodes, gpus)
    assert phy2log.shape == (3, slots)
    for layer in range(3):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=experts), count[layer])
        assert int(count[layer].min()) >= 1
        if groups % nodes == 0:  # hierarchical: every slot of a group's experts on the group's node
            node_of_slot = torch.arange(slots) // (slots // nodes)
            group_of_slot = phy2log[layer] // (experts // groups)
            for group in range(groups):
                assert len(set(node_of_slot[group_of_slot == group].tolist())) == 1


def test_hot_experts_are_split_over_distinct_gpus() -> None:
    """Two hot experts and two spare slots on 4 GPUs: each hot expert gets two replicas, and the four half-loads
    go to four different GPUs, so no GPU carries more than half a hot expert plus cold ones (the start-up
    placement leaves a whole hot expert on one GPU)."""
    experts, slots, gpus = 14, 16, 4
    load = torch.ones(1, experts)
    hot = 2 + torch.randperm(experts - 2)[:2]  # not experts 0 and 1, which the start-up placement replicates
    load[0, hot] = 1000
    phy2log, _, count = rebalance_experts(load, slots, 1, 1, gpus)
    assert count[0, hot].tolist() == [2, 2]
    hot_gpus = (torch.nonzero(torch.isin(phy2log[0], hot)).flatten() // (slots // gpus)).tolist()
    assert sorted(hot_gpus) == [0, 1, 2, 3]
    gpu_load = ((load[0] / count[0])[phy2log[0]]).view(gpus, -1).sum(-1)
    trivial = load[0][trivial_phy2log(experts, slots)].view(gpus, -1).sum(-1)
    assert float(gpu_load.max()) <= 500 + experts and float(trivial.max()) >= 1000
    assert balancedness(gpu_load.view(1, -1)) > balancedness(trivial.view(1, -1))


def test_dispatch_map_prefers_a_local_replica_and_spreads_the_rest() -> None:
    phy2log = torch.tensor([0, 1, 2, 0, 3, 4, 0, 5])  # 4 ranks x 2 slots; expert 0 on ranks 0, 1, 3
    maps = [dispatch_map(phy2log, 6, rank, 4) for rank in range(4)]
    # ranks 0, 1, 3 use their own; rank 2 takes replica number (2 + 0) % 3 of slots [0, 3, 6]
    assert [int(m[0]) for m in maps] == [0, 3, 6, 6]
    for rank, m in enumerate(maps):
        assert torch.equal(phy2log[m], torch.arange(6)), rank


def test_move_plan_fills_every_new_slot_with_its_expert_and_keeps_what_a_rank_already_holds() -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    for _ in range(50):
        ep, experts = int(torch.randint(1, 5, (), generator=gen)), 8
        slots = experts + ep * int(torch.randint(0, 3, (), generator=gen))
        slots += (-slots) % ep
        old = torch.cat([torch.arange(experts), torch.randint(0, experts, (slots - experts,), generator=gen)])
        new = torch.cat([torch.arange(experts), torch.randint(0, experts, (slots - experts,), generator=gen)])
        old, new = old[torch.randperm(slots, generator=gen)], new[torch.randperm(slots, generator=gen)]
        plan = plan_moves(old, new, ep)
        per_rank = slots // ep
        held = old.view(ep, per_rank).tolist()  # the "weights": each slot holds its expert's id
        moved = 0
        for rank, row in enumerate(plan.sources):
            got = [held[src][src_slot] for src, src_slot in row]
            assert got == new.view(ep, per_rank)[rank].tolist()
            for (src, _), expert in zip(row, got, strict=True):
                assert (src == rank) == (expert in held[rank])  # local when it can be, remote only when it must
                moved += src != rank
        assert moved == plan.num_moved


# ---- layers on several ranks ----------------------------------------------------------------------------------

HIDDEN, INTER, EXPERTS, TOP_K = 16, 16, 8, 3


def _full_weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) / 4,
            torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) / 4)  # fmt: skip


def _layer(ctx: MoeContext, weights: tuple[torch.Tensor, torch.Tensor]) -> FusedMoE:
    layer = FusedMoE(EXPERTS, HIDDEN, INTER, TopKConfig(top_k=TOP_K), ctx)
    layer.load_fused(*weights)
    layer.finalize_weights()
    return layer


def _worker_rebalance(rank: int, world: int, ep: int, backend: str, seed: int) -> None:
    moe_tp = world // ep
    ctx = MoeContext(ep_rank=rank // moe_tp, ep_size=ep, dispatcher=backend, group=dist.group.WORLD,
                     moe_tp_rank=rank % moe_tp, moe_tp_size=moe_tp, eplb=EplbConfig(redundant_experts=ep))  # fmt: skip
    weights = _full_weights(seed)
    layer, reference = _layer(ctx, weights), _layer(MoeContext(), weights)
    manager = EplbManager([layer], ctx, ctx.eplb)  # type: ignore[arg-type]
    # The "none" backend needs the same tokens on every rank; the all-to-all takes each rank's own.
    gen = torch.Generator().manual_seed(seed + (rank if backend == "torch" else 0))

    def check(tokens: int) -> None:
        hidden = torch.randn(tokens, HIDDEN, generator=gen)
        logits = torch.randn(tokens, EXPERTS, generator=gen) * 3
        torch.testing.assert_close(layer(hidden, logits), reference(hidden, logits), rtol=1e-5, atol=1e-5)

    check(20)
    before = layer.placement.phy2log.clone()  # type: ignore[union-attr]
    hot = torch.zeros(1, EXPERTS, dtype=torch.int64)
    # Two hot experts among those without a start-up replica (the first ep experts have one), so slots must move.
    hot[0, ep + torch.randperm(EXPERTS - ep, generator=torch.Generator().manual_seed(seed))[:2]] = 1000
    report = manager.rebalance(hot + 1)
    assert report is not None and report.moved > 0
    after = layer.placement.phy2log  # type: ignore[union-attr]
    assert not torch.equal(before, after)
    assert int((hot[0] > 0)[after].sum()) == 2 + ep  # every redundant slot went to the hot experts
    check(33)
    check(1)
    report = manager.rebalance()  # from the load recorded by the three checks
    assert report is not None and 0 < report.balancedness_before <= 1
    check(17)


def _worker_chunks(rank: int, world: int, seed: int) -> None:
    """Three layers, one moved per forward: until the last one moves, the layers serve on different placements."""
    config = EplbConfig(redundant_experts=2, layers_per_chunk=1)
    ctx = MoeContext(ep_rank=rank, ep_size=world, dispatcher="torch", group=dist.group.WORLD, eplb=config)
    pairs = [(_layer(ctx, w), _layer(MoeContext(), w)) for w in (_full_weights(seed + i) for i in range(3))]
    manager = EplbManager([layer for layer, _ in pairs], ctx, config)
    gen = torch.Generator().manual_seed(seed + rank)
    start = [layer.placement.phy2log.clone() for layer, _ in pairs]  # type: ignore[union-attr]
    hot = torch.ones(3, EXPERTS, dtype=torch.int64)
    hot[:, 2 + torch.randperm(EXPERTS - 2, generator=torch.Generator().manual_seed(seed))[:2]] = 1000
    manager.rebalance(hot)
    for step in range(3):
        now = [layer.placement.phy2log for layer, _ in pairs]  # type: ignore[union-attr]
        switched = [not torch.equal(a, b) for a, b in zip(start, now, strict=True)]
        assert switched == [i <= step for i in range(3)], (step, switched)
        for layer, reference in pairs:
            hidden, logits = torch.randn(9, HIDDEN, generator=gen), torch.randn(9, EXPERTS, generator=gen) * 3
            torch.testing.assert_close(layer(hidden, logits), reference(hidden, logits), rtol=1e-5, atol=1e-5)
        manager.after_forward()
    assert not manager.pending


def _worker_threshold(rank: int, world: int, seed: int) -> None:
    """Above --eplb-min-rebalancing-utilization-threshold the recorded window is dropped and nothing moves."""
    for threshold, rebalances in ((0.0, False), (1.0, True)):
        config = EplbConfig(redundant_experts=2, min_balancedness=threshold)
        ctx = MoeContext(ep_rank=rank, ep_size=world, dispatcher="torch", group=dist.group.WORLD, eplb=config)
        layer = _layer(ctx, _full_weights(seed))
        gen = torch.Generator().manual_seed(seed + rank)
        layer(torch.randn(40, HIDDEN, generator=gen), torch.randn(40, EXPERTS, generator=gen) * 3)
        before = layer.placement.phy2log.clone()  # type: ignore[union-attr]
        report = EplbManager([layer], ctx, config).rebalance()
        assert (report is not None) == rebalances, (threshold, report)
        if not rebalances:
            assert torch.equal(before, layer.placement.phy2log)  # type: ignore[union-attr]
            assert int(layer.placement.logical_load.sum()) == 0  # the window was consumed  # type: ignore[union-attr]


def test_no_rebalance_while_the_measured_balance_is_above_the_threshold() -> None:
    _spawn(2, _worker_threshold, int(torch.randint(0, 2**31, ()).item()))


def test_layers_per_chunk_moves_one_layer_per_forward_and_every_step_matches_the_one_rank_layers() -> None:
    _spawn(2, _worker_chunks, int(torch.randint(0, 2**31, ()).item()))


def _worker_location_file(rank: int, world: int, seed: int, directory: str) -> None:
    """A rebalance writes its load; layers started from that file get the same placement and serve exactly."""
    recorder = EplbConfig(redundant_experts=2, dump_dir=directory)
    ctx = MoeContext(ep_rank=rank, ep_size=world, dispatcher="torch", group=dist.group.WORLD, eplb=recorder)
    weights = _full_weights(seed)
    layer, reference = _layer(ctx, weights), _layer(MoeContext(), weights)
    load = torch.randint(1, 50, (1, EXPERTS), generator=torch.Generator().manual_seed(seed)) ** 2
    EplbManager([layer], ctx, recorder).rebalance(load)
    dist.barrier()
    (path,) = [os.path.join(directory, name) for name in os.listdir(directory)]  # written once, by rank 0
    starter = EplbConfig(redundant_experts=2, init_location=path)
    started = _layer(dataclasses.replace(ctx, eplb=starter), weights)
    place_from_file([started], ctx, starter)
    assert torch.equal(started.placement.phy2log, layer.placement.phy2log)  # type: ignore[union-attr]
    gen = torch.Generator().manual_seed(seed + rank)
    hidden, logits = torch.randn(21, HIDDEN, generator=gen), torch.randn(21, EXPERTS, generator=gen) * 3
    torch.testing.assert_close(started(hidden, logits), reference(hidden, logits), rtol=1e-5, atol=1e-5)


def test_a_rebalance_writes_its_load_and_a_start_from_that_file_places_the_same(tmp_path) -> None:
    _spawn(2, _worker_location_file, int(torch.randint(0, 2**31, ()).item()), str(tmp_path / "dist"))


def test_expert_location_files_are_read_in_both_forms_and_bad_ones_say_why(tmp_path) -> None:
    def write(name: str, data: object) -> str:
        path = str(tmp_path / name)
        with open(path, "w") as f:
            json.dump(data, f)
        return path

    count = torch.randint(0, 9, (3, 2, 8))  # per step, per layer, per expert: the steps are summed
    got = read_location(write("c.json", {"logical_count": count.tolist()}), 2, 8, 10)
    assert torch.equal(got["logical_count"], count.sum(0).double())
    torch.save({"logical_count": count[0]}, tmp_path / "c.pt")
    assert torch.equal(read_location(str(tmp_path / "c.pt"), 2, 8, 10)["logical_count"], count[0].double())
    phy2log = torch.stack([torch.randperm(10) % 8 for _ in range(2)])
    got = read_location(write("m.json", {"physical_to_logical_map": phy2log.tolist()}), 2, 8, 10)
    assert torch.equal(got["physical_to_logical_map"], phy2log)
    bad = [
        ({"logical_count": count.tolist()}, 3, "3 MoE layers"),
        ({"physical_to_logical_map": phy2log[:, :9].tolist()}, 2, "10 expert slots"),
        ({"physical_to_logical_map": [[0] * 10, list(range(8)) + [0, 0]]}, 2, "layer 0 gives no slot to experts"),
        ({"something": 1}, 2, "neither physical_to_logical_map nor logical_count"),
    ]
    for i, (data, layers, message) in enumerate(bad):
        with pytest.raises(ExpertLocationError, match=message):
            read_location(write(f"bad{i}.json", data), layers, 8, 10)
    with pytest.raises(ExpertLocationError, match="cannot read"):
        read_location(str(tmp_path / "missing.json"), 2, 8, 10)


@pytest.mark.parametrize(("world", "ep", "backend"), [(2, 2, "torch"), (4, 2, "none"), (4, 4, "torch")])
def test_layers_rebalanced_across_ranks_match_the_one_rank_layer(world: int, ep: int, backend: str) -> None:
    _spawn(world, _worker_rebalance, ep, backend, int(torch.randint(0, 2**31, ()).item()))


def test_redundant_experts_must_fill_every_rank_equally() -> None:
    ctx = MoeContext(ep_rank=0, ep_size=4, dispatcher="single_rank", eplb=EplbConfig(redundant_experts=2))
    with pytest.raises(ValueError, match="--ep-num-redundant-experts"):
        FusedMoE(EXPERTS, HIDDEN, INTER, TopKConfig(top_k=TOP_K), ctx)


def test_placement_is_host_side_while_a_model_is_built_under_another_default_device() -> None:
    # Models are built under `with torch.device(gpu)`; the placement's arithmetic must stay on the host.
    with torch.device("meta"):
        placement = LayerPlacement(trivial_phy2log(8, 10), 8, ep_rank=1, ep_size=2, device=torch.device("meta"))
    assert placement.slot_of.device.type == "meta" and placement.replicas_ER.device.type == "meta"
    assert placement.local_slots().tolist() == [5, 6, 7, 0, 1]


def test_eplb_plan_cli_writes_the_policys_placement_and_reports_its_balance(tmp_path, capsys) -> None:
    from launch.cli import main

    load = (torch.rand(3, 16) ** 4 * 1000).round() + 1
    with open(tmp_path / "load.json", "w") as f:
        json.dump({"logical_count": load.tolist()}, f)
    out = str(tmp_path / "plan.json")
    assert main(["eplb-plan", "--load", str(tmp_path / "load.json"), "--ep", "4", "--redundant", "4",
                 "--num-groups", "4", "--nnodes", "2", "--out", out]) == 0  # fmt: skip
    expected, _, count = rebalance_experts(load, 20, 4, 2, 4)
    plan = read_location(out, 3, 16, 20)["physical_to_logical_map"]
    assert torch.equal(plan, expected)
    # The planned balancedness, slot by slot: each replica carries its expert's load / its replica count.
    gpu = torch.zeros(3, 4, dtype=torch.float64)
    for layer in range(3):
        for slot, expert in enumerate(plan[layer].tolist()):
            gpu[layer, slot // 5] += float(load[layer, expert]) / int(count[layer, expert])
    ratio = (gpu.mean(dim=1) / gpu.max(dim=1).values).mean()
    mean_line = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("mean")][0]
    assert float(mean_line.split()[-1]) == pytest.approx(float(ratio), abs=1e-3)
    with pytest.raises(SystemExit):
        main(["eplb-plan", "--load", str(tmp_path / "load.json"), "--ep", "3"])
