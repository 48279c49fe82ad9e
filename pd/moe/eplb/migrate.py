"""Move expert weights between ranks when a layer's placement changes (point-to-point over the EP group).

Every rank computes the same plan from the old and new placements: a new slot takes its expert from a slot of
its own rank when one held it, else from the lowest slot that held it anywhere. Each (source, destination) pair
then exchanges one message carrying all the experts it moves, in plan order, so both sides agree on the layout
without any metadata. With experts split over moe_tp ranks (EP < TP) each rank trades with the ranks holding the
same slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MovePlan:
    """For one destination rank: for each of its new slots, (source rank, slot index on the source)."""

    sources: list[list[tuple[int, int]]]  # [ep_rank][new local slot] -> (source ep rank, old local slot)

    @property
    def num_moved(self) -> int:
        """Slots filled from another rank."""
        return sum(src != dst for dst, row in enumerate(self.sources) for src, _ in row)


def plan_moves(old_P: torch.Tensor, new_P: torch.Tensor, ep_size: int) -> MovePlan:
    """Where each rank's new slots come from (see the module docstring); a pure function of the placements."""
    old, new = old_P.tolist(), new_P.tolist()
    per_rank = len(old) // ep_size
    first_anywhere: dict[int, int] = {}
    for slot, expert in enumerate(old):
        first_anywhere.setdefault(expert, slot)
    sources = []
    for rank in range(ep_size):
        block = old[rank * per_rank : (rank + 1) * per_rank]
        own = {expert: i for i, expert in reversed(list(enumerate(block)))}  # first local slot per expert
        row = []
        for expert in new[rank * per_rank : (rank + 1) * per_rank]:
            if expert in own:
                row.append((rank, own[expert]))
            else:
                slot = first_anywhere[expert]
                row.append((slot // per_rank, slot % per_rank))
        sources.append(row)
    return MovePlan(sources)


def migrate(weights: list[torch.Tensor], plan: MovePlan, ep_rank: int, moe_tp_rank: int, moe_tp_size: int,
            group: dist.ProcessGroup | None) -> list[torch.Tensor]:  # fmt: skip
    """This rank's weights under the new placement.

    Args:
        weights: tensors [P/ep, ...] indexed by this rank's old local slots (e.g. w13 and w2, and with FP8 experts
            their float32 scales beside the float8_e4m3fn weights), any dtypes: they travel as raw bytes.
        plan: plan_moves of the old and new placements (the same on every rank).
        group: the EP group (ranks ep_rank * moe_tp_size + moe_tp_rank); None with one rank.

    Returns:
        New tensors [P/ep, ...] indexed by the new local slots; the inputs are left as they were.
    """
    device = weights[0].device
    # Each tensor as bytes [P/ep, bytes per slot]: one message carries tensors of several dtypes.
    raw = [w.contiguous().view(torch.uint8).reshape(w.shape[0], -1) for w in weights]
    sizes = [r.shape[1] for r in raw]

    def peer(ep: int) -> int:
        assert group is not None
        return dist.get_global_rank(group, ep * moe_tp_size + moe_tp_rank)

    ops, received = [], {}
    for dst, row in enumerate(plan.sources):  # what this rank sends, one message per destination
        if dst == ep_rank:
            continue
        mine = [old for src, old in row if src == ep_rank]
        if mine:
            index = torch.tensor(mine, device=device)
            payload = torch.cat([r.index_select(0, index) for r in raw], dim=1)
            ops.append(dist.P2POp(dist.isend, payload, peer(dst), group))
    my_row = plan.sources[ep_rank]
    for src in sorted({s for s, _ in my_row} - {ep_rank}):  # what it receives, one message per source
        count = sum(s == src for s, _ in my_row)
        received[src] = torch.empty(count, sum(sizes), dtype=torch.uint8, device=device)
        ops.append(dist.P2POp(dist.irecv, received[src], peer(src), group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    new = [torch.empty(w.shape, dtype=w.dtype, device=device) for w in weights]
    new_raw = [w.view(torch.uint8).reshape(w.shape[0], -1) for w in new]  # views: writing them fills ``new``
    taken = dict.fromkeys(received, 0)
    for slot, (src, old) in enumerate(my_row):
        if src == ep_rank:
            for out, r in zip(new_raw, raw, strict=True):
                out[slot].copy_(r[old])
            continue
        flat = received[src][taken[src]]
        taken[src] += 1
        for out, part in zip(new_raw, flat.split(sizes), strict=True):
            out[slot].copy_(part)
    return new
