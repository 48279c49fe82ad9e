"""Process groups of one rank, created once at start-up and passed to whatever communicates."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from pd.dist.topology import RankInfo

logger = logging.getLogger(__name__)

# A peer that stops answering ends a collective with an error after this long instead of hanging forever.
# Steps are short; the first collectives wait for every rank to finish loading its weights, hence the margin.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Groups:
    """world: every rank (device backend: MoE dispatch and the EP all-reduce). control: every rank on gloo
    (host-side agreement). attn / attn_control: this rank's attention group on the device
    backend (TP all-reduce) and on gloo (the leader's step broadcast). None where the group has one rank."""

    world: dist.ProcessGroup | None
    control: dist.ProcessGroup | None
    attn: dist.ProcessGroup | None
    attn_control: dist.ProcessGroup | None
    leaders: dist.ProcessGroup | None = None  # gloo, the attention groups' leaders (DP attention)


def init_groups(info: RankInfo, backend: str, init_method: str) -> Groups:
    """Joins the instance's default group and builds every subgroup (each rank must call this, in step).

    Args:
        info: this rank's coordinates.
        backend: "gloo", "nccl" or "hccl".
        init_method: "tcp://host:port" of rank 0's store.
    """
    if info.tp == 1:
        return Groups(None, None, None, None)
    dist.init_process_group(backend, init_method=init_method, rank=info.rank, world_size=info.tp,
                            timeout=COLLECTIVE_TIMEOUT)
    world = dist.group.WORLD
    control = world if backend == "gloo" else dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    attn = attn_control = None
    # new_group is collective over the whole world: every rank creates every attention group, keeps its own.
    for dp_rank in range(info.dp):
        ranks = info.of(dp_rank * info.attn_tp_size).attn_group_ranks
        if len(ranks) == 1:
            continue
        if len(ranks) == info.tp:
            group, group_control = world, control
        else:
            group = dist.new_group(ranks, timeout=COLLECTIVE_TIMEOUT)
            group_control = group if backend == "gloo" else dist.new_group(
                ranks, backend="gloo", timeout=COLLECTIVE_TIMEOUT)
        if info.rank in ranks:
            attn, attn_control = group, group_control
    leaders = None
    if info.dp > 1:
        leader_ranks = [info.of(d * info.attn_tp_size).leader for d in range(info.dp)]
        leaders = control if len(leader_ranks) == info.tp else dist.new_group(
            leader_ranks, backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    logger.info("rank %d/%d joined (%s): attention group %s, expert block %d of %d", info.rank, info.tp, backend,
                info.attn_group_ranks, info.ep_rank, info.ep)
    return Groups(world, control, attn, attn_control, leaders)
