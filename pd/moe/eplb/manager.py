"""The expert-parallel load balancer of one rank: every N forwards, rebalance every MoE layer's placement.

Every rank of the EP group runs the same forwards (DP-attention groups without work run empty ones), so every
rank reaches the N-th forward together and rebalances between two forwards, with no request dropped: the
running batch simply waits. A rebalance sums the load every rank recorded (one all-reduce), computes the new
placement on every rank from that same sum (pd.moe.eplb.algorithm, deterministic), moves the weights
(pd.moe.eplb.migrate) and switches routing. It logs the balancedness (mean / max GPU load, 1.0 = even):
measured under the old placement, and expected under the new one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pd.moe.context import EplbConfig, MoeContext
from pd.moe.eplb.algorithm import rebalance_experts
from pd.moe.eplb.location import read_location, write_load
from pd.moe.eplb.migrate import MovePlan, migrate, plan_moves
from pd.moe.layer import FusedMoE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebalanceReport:
    forwards: int  # forwards whose load this rebalance used
    balancedness_before: float  # measured: mean / max GPU load under the old placement, averaged over layers
    balancedness_after: float  # expected under the new placement (an expert's load split evenly over replicas)
    moved: int  # expert slots filled from another rank, all layers
    seconds: float


def expected_gpu_load(logical_LE: torch.Tensor, phy2log_LP: torch.Tensor, count_LE: torch.Tensor,
                      num_gpus: int) -> torch.Tensor:  # fmt: skip
    """[L, G] float64: each GPU's load under a placement, an expert's load split evenly over its replicas."""
    share_LP = (logical_LE.double().cpu() / count_LE).gather(1, phy2log_LP)
    return share_LP.view(share_LP.shape[0], num_gpus, -1).sum(-1)


def _num_groups(layers: list[FusedMoE]) -> int:
    """The router's expert groups, which the hierarchical policy keeps on one node (1 without groups)."""
    return layers[0].topk_config.num_expert_group or 1


def balancedness(gpu_load_LG: torch.Tensor) -> float:
    """Mean over layers of (mean GPU load / max GPU load); 1.0 for layers without load."""
    load = gpu_load_LG.double()
    peak = load.max(dim=-1).values
    ratio = torch.where(peak > 0, load.mean(dim=-1) / peak.clamp(min=1e-30), torch.ones_like(peak))
    return float(ratio.mean())


class EplbManager:
    """Counts forwards and rebalances ``layers`` (this rank's MoE layers, model order) every ``rebalance_every``."""

    def __init__(self, layers: list[FusedMoE], ctx: MoeContext, config: EplbConfig) -> None:
        assert layers and all(layer.placement is not None for layer in layers)
        self.layers, self.ctx, self.config = layers, ctx, config
        self.num_groups = _num_groups(layers)
        self.forwards = 0
        self.last_rebalance = 0  # self.forwards at the last rebalance
        # (layer, its new placement, the plan from what it holds now) not applied yet
        self.pending: list[tuple[FusedMoE, torch.Tensor, MovePlan]] = []
        self.rebalances = 0
        self.last_report: RebalanceReport | None = None

    def after_forward(self) -> RebalanceReport | None:
        self.forwards += 1
        if self.pending:
            self._apply(self.config.layers_per_chunk)
        every = self.config.rebalance_every
        if every > 0 and self.forwards % every == 0:
            return self.rebalance()
        return None

    @torch.no_grad()
    def rebalance(self, logical_load_LE: torch.Tensor | None = None) -> RebalanceReport | None:
        """Collective over the EP group. Computes a placement from the load recorded since the last rebalance (or
        from ``logical_load_LE``, the same on every rank: tests and offline placement) and applies it: every layer
        now, or ``layers_per_chunk`` layers now and as many after each following forward. Returns None when no
        load was recorded."""
        start = time.perf_counter()
        ctx, layers = self.ctx, self.layers
        self._apply(0)  # the rest of an earlier placement first: plans start from what the layers hold
        recorded = [layer.placement.take_load() for layer in layers]  # type: ignore[union-attr]
        logical_LE = torch.stack([r[0] for r in recorded])
        physical_LP = torch.stack([r[1] for r in recorded])
        if ctx.group is not None and dist.get_world_size(ctx.group) > 1:
            both = torch.cat([logical_LE, physical_LP], dim=1)
            dist.all_reduce(both, group=ctx.group)
            logical_LE, physical_LP = both.split([logical_LE.shape[1], physical_LP.shape[1]], dim=1)
        if logical_load_LE is not None:
            logical_LE = logical_load_LE
        elif int(logical_LE.sum()) == 0:
            logger.debug("EPLB: no expert load recorded in the last %d forwards; placement kept",
                         self.forwards - self.last_rebalance)
            self.last_rebalance = self.forwards
            return None
        measured = balancedness(physical_LP.cpu().view(len(layers), ctx.ep_size, -1).sum(-1))
        if logical_load_LE is None and measured > self.config.min_balancedness:
            if ctx.group_rank_is_first:
                logger.info("EPLB: balancedness %.3f over the last %d forwards is above the rebalancing threshold "
                            "%.3f; placement kept", measured, self.forwards - self.last_rebalance,
                            self.config.min_balancedness)  # fmt: skip
            self.last_rebalance = self.forwards
            return None
        if self.config.dump_dir is not None and ctx.group_rank_is_first:
            path = write_load(self.config.dump_dir, logical_LE, self.forwards - self.last_rebalance, self.forwards)
            logger.info("EPLB: recorded expert load written to %s (--init-expert-location reads it)", path)
        num_physical = layers[0].placement.num_physical  # type: ignore[union-attr]
        ep = ctx.ep_size
        phy2log_LP, _, count_LE = rebalance_experts(logical_LE, num_physical, self.num_groups,
                                                    self.config.num_nodes, ep)  # fmt: skip
        moved = 0
        for layer, new_P in zip(layers, phy2log_LP, strict=True):
            current = layer.placement.phy2log  # type: ignore[union-attr]
            if not torch.equal(current, new_P):
                plan = plan_moves(current, new_P, ep)  # still valid when applied: earlier plans went first above
                moved += plan.num_moved
                self.pending.append((layer, new_P, plan))
        self._apply(self.config.layers_per_chunk)
        report = RebalanceReport(
            forwards=self.forwards - self.last_rebalance,
            balancedness_before=measured,
            balancedness_after=balancedness(expected_gpu_load(logical_LE, phy2log_LP, count_LE, ep)),
            moved=moved,
            seconds=time.perf_counter() - start,
        )
        self.last_rebalance = self.forwards
        self.rebalances += 1
        self.last_report = report
        log = logger.info if ctx.group_rank_is_first else logger.debug  # one line per instance
        later = f"; {len(self.pending)} more layers over the next forwards" if self.pending else ""
        log("EPLB: rebalanced %d MoE layers after %d forwards in %.2f s: balancedness (mean/max GPU load) %.3f "
            "measured before, %.3f expected after; %d expert slots moved between ranks%s", len(layers),
            report.forwards, report.seconds, report.balancedness_before, report.balancedness_after, moved, later)
        return report

    def _apply(self, max_layers: int) -> None:
        """Moves the weights of the next ``max_layers`` pending layers (0: all) and switches their routing."""
        count = len(self.pending) if max_layers == 0 else min(max_layers, len(self.pending))
        for layer, new_P, plan in self.pending[:count]:
            move_layer(layer, self.ctx, new_P, plan)
        del self.pending[:count]


def move_layer(layer: FusedMoE, ctx: MoeContext, new_P: torch.Tensor, plan: MovePlan | None = None) -> int:
    """Collective over the EP group: gives ``layer`` the placement ``new_P`` ([P] logical expert per slot), moving
    its expert weights between ranks (by ``plan`` when already made from what the layer holds), and returns how
    many slots were filled from another rank."""
    placement = layer.placement
    assert placement is not None
    plan = plan or plan_moves(placement.phy2log, new_P, ctx.ep_size)
    params = [layer.w13_weight.data, layer.w2_weight.data]
    if layer.fp8_block is not None:  # FP8 experts kept in memory move with their block scales
        params += [layer.w13_weight_scale_inv.data, layer.w2_weight_scale_inv.data]
    new = migrate(params, plan, ctx.ep_rank, ctx.moe_tp_rank, ctx.moe_tp_size, ctx.group)
    for param, moved in zip(params, new, strict=True):
        param.copy_(moved)
    placement.set(new_P)
    layer.finalize_weights()
    return plan.num_moved


def place_from_file(layers: list[FusedMoE], ctx: MoeContext, config: EplbConfig) -> None:
    """Collective: the start-up placement from ``config.init_location`` (see pd.moe.eplb.location), applied to
    every MoE layer (the checkpoint loaded them in the trivial placement; the weights move from there)."""
    assert config.init_location is not None and layers[0].placement is not None
    num_experts, num_physical = layers[0].num_experts, layers[0].placement.num_physical
    location = read_location(config.init_location, len(layers), num_experts, num_physical)
    if "physical_to_logical_map" in location:
        phy2log_LP = location["physical_to_logical_map"]
    else:
        phy2log_LP = rebalance_experts(location["logical_count"], num_physical, _num_groups(layers), config.num_nodes,
                                       ctx.ep_size)[0]  # fmt: skip
    moved = sum(move_layer(layer, ctx, new_P) for layer, new_P in zip(layers, phy2log_LP, strict=True))
    if ctx.group_rank_is_first:
        logger.info("EPLB: start-up placement of %d MoE layers from %s (%s); %d expert slots moved between ranks",
                    len(layers), config.init_location, next(iter(location)), moved)  # fmt: skip
