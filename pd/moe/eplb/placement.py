"""Where one MoE layer's experts live: logical -> physical routing and the load it records for the balancer.

With redundant experts (``--ep-num-redundant-experts N``) a layer has P = E + N physical expert slots, P / ep
per rank (rank r holds slots [r * P/ep, (r + 1) * P/ep)); a logical expert may have several slots. The router
picks logical experts; `route` turns them into physical slots before dispatch, so dispatchers and runners only
ever see slots. Routing is a gather (graph-capturable, no host synchronisation):
- a token dispatched from one rank (the all-to-all backends): each rank sends all its tokens for an expert to
  one fixed replica, its own when it holds one, else the replicas taken in turn by rank;
- a token every rank sees (the all-reduce backend, "none"): every rank must pick the same replica, so the
  choice depends only on the token's position (replicas taken in turn by token).
"""

from __future__ import annotations

import torch

from pd.moe.eplb.algorithm import log2phy_of
from pd.moe.topk import TopKOutput


def trivial_phy2log(num_experts: int, num_physical: int) -> torch.Tensor:
    """[P] int64: slot s holds expert s mod E (the start-up placement: replicas of the first N experts)."""
    return torch.arange(num_physical, dtype=torch.int64, device="cpu") % num_experts


def dispatch_map(phy2log_P: torch.Tensor, num_experts: int, ep_rank: int, ep_size: int) -> torch.Tensor:
    """[E] int64: the slot this rank sends each logical expert's tokens to.

    A replica on this rank if there is one (no transfer), else replica number (ep_rank + e) mod count among the
    expert's slots in increasing order, which spreads the ranks over the replicas.
    """
    # Host-side placement arithmetic: explicit CPU tensors, whatever device the model is being built under.
    phy2log_P = phy2log_P.cpu()
    slots = phy2log_P.shape[0]
    holds_EP = phy2log_P.unsqueeze(0) == torch.arange(num_experts, device="cpu").unsqueeze(1)
    count_E = holds_EP.sum(dim=1)
    if bool((count_E == 0).any()):
        raise ValueError(f"placement leaves experts {torch.nonzero(count_E == 0).flatten().tolist()} without a slot")
    slot_rank_P = torch.arange(slots, device="cpu") // (slots // ep_size)
    local_EP = holds_EP & (slot_rank_P == ep_rank)
    turn_E = (ep_rank + torch.arange(num_experts, device="cpu")) % count_E
    chosen_EP = holds_EP & (holds_EP.long().cumsum(dim=1) - 1 == turn_E.unsqueeze(1))
    chosen_EP = torch.where(local_EP.any(dim=1, keepdim=True), local_EP, chosen_EP)
    return chosen_EP.long().argmax(dim=1)  # the first chosen slot


class LayerPlacement:
    """One layer's placement on this rank, with the expert load recorded since the last rebalance.

    Attributes:
        phy2log: [P] int64 (CPU): the logical expert of every slot of every rank.
        slot_of: [E] int64 (layer device): where this rank routes each logical expert (see dispatch_map).
        replicas_ER, count_E: each expert's slots (-1 padded) and their count, for tokens on every rank.
        logical_load: [E] int64 (layer device): routed (token, expert) pairs of this rank's tokens per expert.
        physical_load: [P] int64 (layer device): the same pairs per slot they were sent to.
    """

    def __init__(self, phy2log_P: torch.Tensor, num_experts: int, ep_rank: int, ep_size: int, device: torch.device,
                 tokens_on_every_rank: bool = False) -> None:  # fmt: skip
        self.num_experts, self.ep_rank, self.ep_size = num_experts, ep_rank, ep_size
        self.tokens_on_every_rank = tokens_on_every_rank
        self.logical_load = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self.physical_load = torch.zeros(phy2log_P.shape[0], dtype=torch.int64, device=device)
        self.set(phy2log_P)

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.shape[0])

    def local_slots(self) -> torch.Tensor:
        """[P / ep] int64: the logical expert of each of this rank's slots, in slot order."""
        per_rank = self.num_physical // self.ep_size
        return self.phy2log[self.ep_rank * per_rank : (self.ep_rank + 1) * per_rank]

    def set(self, phy2log_P: torch.Tensor) -> None:
        """Adopt a new placement (the weights must already be where it says)."""
        self.phy2log = phy2log_P.detach().to("cpu", torch.int64).clone()
        device = self.logical_load.device
        self.slot_of = dispatch_map(self.phy2log, self.num_experts, self.ep_rank, self.ep_size).to(device)
        self.replicas_ER = log2phy_of(self.phy2log.unsqueeze(0), self.num_experts)[0].to(device)
        self.count_E = (self.replicas_ER >= 0).sum(dim=1)

    def route(self, topk: TopKOutput) -> TopKOutput:
        """Logical expert ids -> physical slots, counting both loads (no host synchronisation)."""
        ids_TK = topk.topk_ids
        if self.tokens_on_every_rank:
            turn_TK = torch.arange(ids_TK.shape[0], device=ids_TK.device).unsqueeze(1) % self.count_E[ids_TK]
            slots_TK = self.replicas_ER[ids_TK, turn_TK]
        else:
            slots_TK = self.slot_of[ids_TK]
        flat_ids, flat_slots = ids_TK.reshape(-1), slots_TK.reshape(-1)
        self.logical_load.index_add_(0, flat_ids, torch.ones_like(flat_ids))
        self.physical_load.index_add_(0, flat_slots, torch.ones_like(flat_slots))
        return topk._replace(topk_ids=slots_TK)

    def take_load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logical [E], physical [P]) counts since the last call, and start counting again from zero."""
        loads = self.logical_load.clone(), self.physical_load.clone()
        self.logical_load.zero_()
        self.physical_load.zero_()
        return loads
