"""One rank of an instance: join the groups, build this rank's model shard, and know its role.

The rank with ``RankInfo.is_leader`` runs the scheduler (pd.engine.engine_process); the others follow their
leader's broadcasts (``follow``). With one rank, nothing here communicates.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvtransfer.base import KVSourceHolder, KVTargetHolder
from pd.dist.dp_gate import DPGate
from pd.dist.groups import Groups, init_groups
from pd.dist.step_sync import StepSync
from pd.dist.topology import RankInfo
from pd.dist.tp import SINGLE, TensorParallel
from pd.engine.disagg import DisaggConfig, start_follower_kv
from pd.engine.kv_cache import ReqToToken
from pd.engine.model_runner import ModelRunner
from pd.engine.profiler import StepProfiler
from pd.engine.spec import EngineSpec
from pd.moe.context import MoeContext

logger = logging.getLogger(__name__)


@dataclass
class RankRuntime:
    info: RankInfo
    groups: Groups
    runner: ModelRunner
    sync: StepSync | None
    dp_gate: DPGate | None


def moe_context(moe: MoeContext, info: RankInfo, groups: Groups) -> MoeContext:
    """This rank's expert placement, dispatcher and token layout (see pd.moe.token_layout), from the instance's
    MoE settings (EngineSpec.moe)."""
    if info.tp == 1:
        return moe
    if moe.dispatcher != "none":  # each token dispatched once: split what an attention group holds in common
        layout = "scatter" if info.attn_tp_size > 1 else "as_is"
    else:  # every rank sees every token once
        layout = "gather" if info.dp > 1 else "as_is"
    return dataclasses.replace(moe, ep_rank=info.ep_rank, ep_size=info.ep, group=groups.world,
                               moe_tp_rank=info.moe_tp_rank, moe_tp_size=info.moe_tp_size, token_layout=layout,
                               attn_group=groups.attn)  # fmt: skip


def start_rank(spec: EngineSpec, rank: int, init_method: str | None) -> RankRuntime:
    """Joins the instance (collective: every rank calls it) and loads this rank's shard."""
    info = spec.layout.rank(rank)
    runner_cfg = spec.runner
    if runner_cfg.device == "cuda":
        torch.cuda.set_device(info.local_rank)
        runner_cfg = dataclasses.replace(runner_cfg, device=f"cuda:{info.local_rank}")
    groups = init_groups(info, spec.layout.backend, init_method or "")
    tp = TensorParallel(info.attn_tp_rank, info.attn_tp_size, groups.attn) if info.attn_tp_size > 1 else SINGLE
    sync = None
    if groups.attn is not None and groups.attn_control is not None:
        sync = StepSync(groups.attn_control, groups.attn, info.leader, info.is_leader)

    def agree_pages(num_pages: int) -> int:
        pages = torch.tensor([num_pages], dtype=torch.int64)
        dist.all_reduce(pages, op=dist.ReduceOp.MIN, group=groups.control)
        return int(pages.item())

    runner = ModelRunner(runner_cfg, moe_context(spec.moe, info, groups), tp, sync,
                         agree_pages if groups.control is not None else None)
    gate = DPGate(groups.leaders) if info.dp > 1 and info.is_leader and groups.leaders is not None else None
    return RankRuntime(info, groups, runner, sync, gate)


def follow(runner: ModelRunner, sync: StepSync, max_rows: int, disagg: DisaggConfig | None = None,
           profiler: StepProfiler | None = None) -> None:  # fmt: skip
    """A follower's life: run what the leader says (pd.dist.step_sync's messages) until it says stop (or the
    group breaks, which raises). ``max_rows`` is the leader scheduler's slot-table height (--max-running-requests);
    ``disagg``: a prefill or decode instance's transfer settings (this rank's DP group), None when unified;
    ``profiler``: this rank's, started and stopped with the leader's (/start_profile)."""
    slots = runner.make_slot_table(max_rows, runner.context_length)
    kv = start_follower_kv(runner, sync, disagg) if disagg is not None else None
    profiler = profiler or StepProfiler(runner.device, f"TP-{runner.tp.rank}", sync)
    try:
        _follow(runner, sync, slots, kv, profiler)
    finally:
        if kv is not None:
            kv.close()


def _follow(runner: ModelRunner, sync: StepSync, slots: ReqToToken, kv: KVTargetHolder | None,
            profiler: StepProfiler) -> None:  # fmt: skip
    while True:
        msg = sync.receive()
        op = msg["op"]
        if op == "stop":
            logger.info("leader said stop")
            return
        if op == "ping":
            continue
        if op == "profile":
            profiler.follow(msg)
            continue
        if op == "kv_send":  # a prefill follower's shares of rooms to write (its own transfer thread does)
            assert isinstance(kv, KVSourceHolder), "kv_send to a rank without a KV source"
            if runner.device.type == "cuda":  # the room's last forward has stored its KV before the engine reads it
                torch.cuda.current_stream(runner.device).synchronize()
            for rank, job in msg["jobs"]:
                if rank == runner.tp.rank:
                    kv.submit(job)
            continue
        if op == "idle":
            runner.idle_forward(msg["mode"])
            continue
        assert op == "forward", op
        for row, first, pages in msg["slots"]:
            slots.assign_pages(row, first, pages)
        batch = runner.make_batch(msg["input_ids"], msg["rows"], msg["prefix_lens"], msg["extend_lens"], slots,
                                  msg["logits_index"], msg["mode"])
        runner.forward(batch, logits=False)
