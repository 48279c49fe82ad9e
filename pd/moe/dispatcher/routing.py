"""Routing arithmetic shared by the multi-rank dispatchers: which rank owns an expert, and its local id there.

Experts are placed contiguously (see MoeContext): rank ``r`` owns global ids ``[r * L, (r + 1) * L)``.
Everything here is a pure tensor function without host synchronisation, so low-latency paths can use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pd.moe.context import MoeContext

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def expert_group(ctx: MoeContext, backend: str) -> ProcessGroup | None:
    """The process group a dispatcher talks over, checked against the context's placement.

    Returns:
        ``ctx.group``; None only when ``ep_size == 1`` and no group was given (nothing to communicate).

    Raises:
        ValueError: ``ep_size > 1`` without a group, or a group whose size/rank differ from ep_size/ep_rank.
    """
    group = ctx.group
    if group is None:
        if ctx.ep_size * ctx.moe_tp_size > 1:
            raise ValueError(
                f"the {backend!r} dispatcher with ep_size={ctx.ep_size} needs MoeContext.group "
                "(the expert-parallel process group)"
            )
        return None
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    expected = (ctx.ep_size * ctx.moe_tp_size, ctx.ep_rank * ctx.moe_tp_size + ctx.moe_tp_rank)
    if (size, rank) != expected:
        raise ValueError(
            f"MoeContext says ep_rank={ctx.ep_rank} of ep_size={ctx.ep_size} (x moe_tp {ctx.moe_tp_size}), "
            f"but its group has rank {rank} of {size}"
        )
    return group


def owner_rank(topk_ids_TK: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """[T, K] int64 rank owning each selected expert; -1 where the slot selects no expert (id -1)."""
    return torch.where(topk_ids_TK >= 0, topk_ids_TK.div(num_local_experts, rounding_mode="floor"), -1)


def token_rank_mask(owner_TK: torch.Tensor, ep_size: int) -> torch.Tensor:
    """[T, R] bool: True where at least one of the token's slots is owned by rank r (the dedupe unit)."""
    num_tokens = owner_TK.shape[0]
    # Column 0 collects unrouted slots (-1) and is dropped, so no data-dependent filtering is needed.
    hits = torch.zeros(num_tokens, ep_size + 1, dtype=torch.bool, device=owner_TK.device)
    hits.scatter_(1, owner_TK + 1, True)
    return hits[:, 1:]


def local_ids_for(
    topk_ids_TK: torch.Tensor, owner_TK: torch.Tensor, dest_rank: torch.Tensor | int, num_local_experts: int
) -> torch.Tensor:
    """Local expert ids as seen by ``dest_rank``: ``id - dest * L`` where dest owns the slot, else -1.

    Args:
        topk_ids_TK: [..., K] int64 global ids (-1 = no expert).
        owner_TK: [..., K] int64 from ``owner_rank``.
        dest_rank: an int, or an int64 tensor broadcastable to [..., 1] (one destination per row).
        num_local_experts: L.

    Returns:
        [..., K] int64 local ids in [0, L) or -1.
    """
    return torch.where(owner_TK == dest_rank, topk_ids_TK - dest_rank * num_local_experts, -1)
