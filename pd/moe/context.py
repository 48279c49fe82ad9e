"""Expert-parallel placement of one MoE layer: which rank owns which experts, and which backends run it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pd.moe.dispatcher.comm_resources import CommResources
from pd.moe.token_layout import TOKEN_LAYOUTS

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from pd.moe.long_seq import LongSeqConfig

A2A_MODES = ("normal", "low_latency", "auto")


@dataclass(frozen=True)
class EplbConfig:
    """Expert placement with redundant experts (pd.moe.eplb).

    Attributes:
        redundant_experts: N extra physical expert slots per MoE layer (P = E + N, P / ep per rank).
        rebalance_every: forwards between rebalances from the recorded load; 0 = keep the start-up placement.
        num_nodes: nodes the EP ranks span (the hierarchical policy keeps an expert group on one node).
        layers_per_chunk: MoE layers whose experts move per forward once a new placement is computed (0 = all
            at once); spreads a large model's weight moves over several forwards instead of one long stall.
    """

    redundant_experts: int = 0
    rebalance_every: int = 0
    num_nodes: int = 1
    layers_per_chunk: int = 0
    init_location: str | None = None  # --init-expert-location: a start-up placement (pd.moe.eplb.location)
    dump_dir: str | None = None  # --expert-distribution-dir: each rebalance writes the load it used there
    # --eplb-min-rebalancing-utilization-threshold: skip a rebalance while the measured balancedness is above it
    min_balancedness: float = 1.0

    def __post_init__(self) -> None:
        if min(self.redundant_experts, self.rebalance_every, self.layers_per_chunk) < 0 or self.num_nodes < 1:
            raise ValueError(f"invalid {self}")


@dataclass(frozen=True)
class MoeContext:
    """Per-rank MoE settings, built once from the server arguments and passed into every MoE layer.

    Experts are placed contiguously: rank ``r`` owns logical experts ``[r * L, (r + 1) * L)`` where
    ``L = num_experts // ep_size``. With ``moe_tp_size > 1`` (the EP < TP hybrid) each expert's intermediate
    dimension is further split over the ``moe_tp_size`` ranks of an expert block; this rank holds slice
    ``moe_tp_rank``. ``group`` is the process group multi-rank dispatchers communicate over (``ep_size x
    moe_tp_size`` ranks, this one being ``ep_rank * moe_tp_size + moe_tp_rank``); it is passed in, never looked
    up globally, and left out of equality, hashing and repr (two contexts with the same placement are the same
    placement).

    ``token_layout`` says how a forward's tokens reach the dispatcher across ranks (pd.moe.token_layout);
    ``attn_group`` is the ranks holding the same tokens as this one (None when they are its own).
    With ``eplb`` set, each layer holds E + redundant_experts physical slots placed by pd.moe.eplb instead
    (the contiguous helpers below then describe slots, not logical experts).
    ``a2a_mode`` is the dispatch mode of the "torch" and "deepep" backends ("auto": per forward, the batch's
    ``moe_mode``); ``max_tokens_per_rank`` their low-latency capacity; ``long_seq`` the normal-mode rounds.

    Raises:
        ValueError: a size < 1, a rank outside its range, or an unknown mode.
    """

    ep_rank: int = 0
    ep_size: int = 1
    dispatcher: str = "single_rank"
    runner: str = "torch"
    group: ProcessGroup | None = field(default=None, compare=False, hash=False, repr=False)
    moe_tp_rank: int = 0
    moe_tp_size: int = 1
    a2a_mode: str = "normal"
    max_tokens_per_rank: int = 128
    long_seq: LongSeqConfig | None = None
    token_layout: str = "as_is"
    attn_group: ProcessGroup | None = field(default=None, compare=False, hash=False, repr=False)
    eplb: EplbConfig | None = None  # None: expert e on rank e // (E / ep), no load recorded
    # Shared experts on a second CUDA stream while the routed experts dispatch, compute and combine (SBO).
    single_batch_overlap: bool = False
    # The communication resources every MoE layer built from this context shares (symmetric-memory buffers and
    # graphs, DeepEP's buffers, the overlap stream): one owner per context, never passed in, so a context made by
    # dataclasses.replace (a rank's from the instance's settings) starts with its own.
    comm: CommResources = field(default_factory=CommResources, init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        for name, rank, size in (("ep", self.ep_rank, self.ep_size), ("moe_tp", self.moe_tp_rank, self.moe_tp_size)):
            if size < 1:
                raise ValueError(f"{name}_size must be >= 1, got {size}")
            if not 0 <= rank < size:
                raise ValueError(f"{name}_rank must be in [0, {size}), got {rank}")
        if self.a2a_mode not in A2A_MODES:
            raise ValueError(f"a2a_mode must be one of {A2A_MODES}, got {self.a2a_mode!r}")
        if self.token_layout not in TOKEN_LAYOUTS:
            raise ValueError(f"unknown token_layout {self.token_layout!r}")

    @property
    def group_rank_is_first(self) -> bool:
        """Whether this is the EP group's first rank (the one that logs and writes for the whole instance)."""
        return self.ep_rank == 0 and self.moe_tp_rank == 0

    def local_intermediate(self, intermediate_size: int) -> int:
        """This rank's share of an expert's intermediate size. Raises ValueError unless moe_tp_size divides it."""
        if intermediate_size % self.moe_tp_size:
            raise ValueError(
                f"the experts' intermediate size {intermediate_size} is not divisible by tp/ep = {self.moe_tp_size}; "
                "choose --tp and --ep so that it is"
            )
        return intermediate_size // self.moe_tp_size

    def num_local(self, num_experts: int) -> int:
        """Number of experts this rank holds. Raises ValueError unless ep_size divides num_experts."""
        if num_experts < 1 or num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_experts={num_experts} must be a positive multiple of ep_size={self.ep_size}; "
                "choose an --ep that divides the model's expert count"
            )
        return num_experts // self.ep_size

    def local_expert_range(self, num_experts: int) -> tuple[int, int]:
        """Half-open range ``[start, end)`` of the logical expert ids this rank owns."""
        n = self.num_local(num_experts)
        return self.ep_rank * n, (self.ep_rank + 1) * n

    def local_expert_index(self, expert_id: int, num_experts: int) -> int | None:
        """Local slot of logical ``expert_id`` on this rank, or None when another rank owns it.

        Raises:
            ValueError: ``expert_id`` outside ``[0, num_experts)``.
        """
        if not 0 <= expert_id < num_experts:
            raise ValueError(f"expert id {expert_id} outside [0, {num_experts})")
        start, end = self.local_expert_range(num_experts)
        return expert_id - start if start <= expert_id < end else None
