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


@dataclass(frozen=True)
class InstanceLayout:
    """Where an instance's ranks run and how they meet: all that spawning them and joining their groups needs.

    Attributes:
        tp, dp, ep, nnodes: as in RankInfo (``dp``: attention groups, 1 without DP attention).
        node_rank: the node this process runs on; it spawns ranks ``local_ranks``.
        backend: torch.distributed backend of the device groups ("gloo", "nccl" or "hccl").
        init_addr: ``host:port`` of rank 0's rendezvous store when the instance spans nodes (--dist-init-addr);
            node 0's host, where the HTTP front and the PD bootstrap server run. "" on one node.

    Raises:
        ValueError: sizes RankInfo refuses, or a node_rank outside [0, nnodes).
    """

    tp: int = 1
    dp: int = 1
    ep: int = 1
    nnodes: int = 1
    node_rank: int = 0
    backend: str = "gloo"
    init_addr: str = ""

    def __post_init__(self) -> None:
        self.rank(0)  # validates the sizes
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} outside [0, {self.nnodes})")

    def rank(self, rank: int) -> RankInfo:
        return RankInfo(rank, self.tp, self.dp, self.ep, self.nnodes)

    @property
    def local_ranks(self) -> range:
        """Global ranks of this node's processes."""
        per_node = self.tp // self.nnodes
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node)

    @property
    def remote_leaders(self) -> list[int]:
        """Global ranks of the DP-attention leaders on nodes other than 0 (they reach the front over TCP)."""
        return [r for r in range(self.tp) if self.rank(r).is_leader and self.rank(r).node_rank != 0]
