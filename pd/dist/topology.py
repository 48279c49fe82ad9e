"""Where one rank sits in an instance: its TP, DP-attention, EP and expert-TP coordinates (pure arithmetic).

An instance has ``tp`` ranks (spread evenly over ``nnodes`` nodes). Attention runs in ``dp`` data-parallel
groups of ``tp // dp`` ranks each (dp == 1 without DP attention): the first rank of a group, its leader, runs
the scheduler and tells the others what to compute. Routed experts are split over ``ep`` expert-parallel
ranks, and each expert's intermediate dimension over ``tp // ep`` ranks (the EP < TP hybrid). Everything
else (embeddings, the LM head, shared experts, routers) is replicated.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankInfo:
    """Coordinates of rank ``rank`` in an instance of ``tp`` ranks.

    Raises:
        ValueError: a size that does not divide tp, or a rank outside [0, tp).
    """

    rank: int = 0
    tp: int = 1
    dp: int = 1
    ep: int = 1
    nnodes: int = 1

    def __post_init__(self) -> None:
        for name, size in (("dp", self.dp), ("ep", self.ep), ("nnodes", self.nnodes)):
            if size < 1 or self.tp % size:
                raise ValueError(f"{name}={size} must divide tp={self.tp}")
        if not 0 <= self.rank < self.tp:
            raise ValueError(f"rank {self.rank} outside [0, {self.tp})")

    @property
    def attn_tp_size(self) -> int:
        return self.tp // self.dp

    @property
    def attn_tp_rank(self) -> int:
        return self.rank % self.attn_tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.attn_tp_size

    @property
    def leader(self) -> int:
        """Global rank of this rank's attention-group leader (the one running the scheduler)."""
        return self.dp_rank * self.attn_tp_size

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    @property
    def attn_group_ranks(self) -> list[int]:
        return list(range(self.leader, self.leader + self.attn_tp_size))

    @property
    def moe_tp_size(self) -> int:
        return self.tp // self.ep

    @property
    def ep_rank(self) -> int:
        """Expert block of this rank: ranks [e * moe_tp, (e + 1) * moe_tp) share expert block e."""
        return self.rank // self.moe_tp_size

    @property
    def moe_tp_rank(self) -> int:
        return self.rank % self.moe_tp_size

    @property
    def ranks_per_node(self) -> int:
        return self.tp // self.nnodes

    @property
    def node_rank(self) -> int:
        return self.rank // self.ranks_per_node

    @property
    def local_rank(self) -> int:
        """Index among this node's ranks (its device index on GPU machines)."""
        return self.rank % self.ranks_per_node

    def of(self, rank: int) -> RankInfo:
        """The same instance seen from another rank."""
        return RankInfo(rank, self.tp, self.dp, self.ep, self.nnodes)
