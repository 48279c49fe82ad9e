"""One rank of an instance: join the groups, build this rank's model shard, and know its role.

The rank with ``RankInfo.is_leader`` runs the scheduler (pd.engine.engine_process); the others follow their
leader's broadcasts (pd.dist.step_sync.follow). With one rank, nothing here communicates.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pd.dist.groups import Groups, init_groups
from pd.dist.step_sync import StepSync
from pd.dist.topology import RankInfo
from pd.dist.tp import SINGLE, TensorParallel
from pd.engine.model_runner import ModelRunner, RunnerConfig
from pd.moe.context import EplbConfig, MoeContext
from pd.moe.long_seq import long_seq_config_from_env
from pd.server_args import ServerArgs

logger = logging.getLogger(__name__)


def rank_info(args: ServerArgs, rank: int) -> RankInfo:
    return RankInfo(rank, args.tp_size, args.attn_dp_size, args.ep_size, args.nnodes)


def moe_context(args: ServerArgs, info: RankInfo, groups: Groups) -> MoeContext:
    """This rank's expert placement, dispatcher and token layout (see pd.moe.token_layout)."""
    if info.tp == 1:
        return MoeContext(runner=args.moe_runner_backend, single_batch_overlap=args.enable_single_batch_overlap)
    a2a = args.moe_a2a_backend != "none"
    if a2a:  # each token dispatched once: split what an attention group holds in common
        layout = "scatter" if info.attn_tp_size > 1 else "as_is"
    else:  # every rank sees every token once
        layout = "gather" if info.dp > 1 else "as_is"
    return MoeContext(
        ep_rank=info.ep_rank,
        ep_size=info.ep,
        dispatcher=args.moe_a2a_backend,
        runner=args.moe_runner_backend,
        group=groups.world,
        moe_tp_rank=info.moe_tp_rank,
        moe_tp_size=info.moe_tp_size,
        a2a_mode=args.deepep_mode,
        # A decode-only batch holds at most max_running_requests tokens per rank (fewer after a scatter).
        max_tokens_per_rank=args.max_running_requests,
        long_seq=long_seq_config_from_env() if args.moe_a2a_backend == "torch" else None,
        token_layout=layout,
        attn_group=groups.attn,
        eplb=eplb_config(args),
        single_batch_overlap=args.enable_single_batch_overlap,
    )


def eplb_config(args: ServerArgs) -> EplbConfig | None:
    """Physical expert placement (pd.moe.eplb) when EPLB or redundant experts are asked for, else None."""
    if not args.enable_eplb and args.ep_num_redundant_experts == 0 and args.init_expert_location is None:
        return None
    # EP ranks are laid out node after node, so they span every node when their count splits over the nodes.
    nodes = args.nnodes if args.ep_size % args.nnodes == 0 else 1
    return EplbConfig(redundant_experts=args.ep_num_redundant_experts,
                      rebalance_every=args.eplb_rebalance_num_iterations if args.enable_eplb else 0,
                      num_nodes=nodes, layers_per_chunk=args.eplb_rebalance_layers_per_chunk or 0,
                      init_location=args.init_expert_location, dump_dir=args.expert_distribution_dir,
                      min_balancedness=args.eplb_min_rebalancing_utilization_threshold)  # fmt: skip


@dataclass
class RankRuntime:
    info: RankInfo
    groups: Groups
    runner: ModelRunner
    sync: StepSync | None
    dp_gate: DPGate | None


class DPGate:
    """Under DP attention every leader has its own scheduler, but MoE layers are collective: each loop turn the
    leaders agree whether anyone computes (then all do, idle ones with no tokens) and in which dispatch mode."""

    def __init__(self, control: dist.ProcessGroup) -> None:
        self.control = control

    def agree(self, wants_forward: bool, has_prefill: bool, stopping: bool = False) -> tuple[bool, bool, bool]:
        """(anyone computes, any prompt tokens, anyone stops). A leader whose front is gone says so here, so
        that every leader leaves the loop at the same turn instead of one blocking in the next collective."""
        flags = torch.tensor([int(wants_forward), int(has_prefill), int(stopping)], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flags[0]), bool(flags[1]), bool(flags[2])


def start_rank(runner_cfg: RunnerConfig, args: ServerArgs, rank: int, init_method: str | None) -> RankRuntime:
    """Joins the instance (collective: every rank calls it) and loads this rank's shard."""
    info = rank_info(args, rank)
    if args.is_cuda:
        torch.cuda.set_device(info.local_rank)
        runner_cfg = dataclasses.replace(runner_cfg, device=f"cuda:{info.local_rank}")
    groups = init_groups(info, args.dist_backend, init_method or "")
    tp = TensorParallel(info.attn_tp_rank, info.attn_tp_size, groups.attn) if info.attn_tp_size > 1 else SINGLE
    sync = None
    if groups.attn is not None and groups.attn_control is not None:
        sync = StepSync(groups.attn_control, groups.attn, info.leader, info.is_leader)

    def agree_pages(num_pages: int) -> int:
        pages = torch.tensor([num_pages], dtype=torch.int64)
        dist.all_reduce(pages, op=dist.ReduceOp.MIN, group=groups.control)
        return int(pages.item())

    runner = ModelRunner(runner_cfg, moe_context(args, info, groups), tp, sync,
                         agree_pages if groups.control is not None else None)
    gate = DPGate(groups.leaders) if info.dp > 1 and info.is_leader and groups.leaders is not None else None
    return RankRuntime(info, groups, runner, sync, gate)
