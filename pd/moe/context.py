"""Expert-parallel placement of one MoE layer: which rank owns which experts, and which backends run it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class MoeContext:
    """Per-rank MoE settings, built once from the server arguments and passed into every MoE layer.

    Experts are placed contiguously: rank ``r`` owns logical experts ``[r * L, (r + 1) * L)`` where
    ``L = num_experts // ep_size``. ``group`` is the expert-parallel process group (rank ``ep_rank`` of
    ``ep_size``) that multi-rank dispatchers communicate over; it is passed in, never looked up globally, and
    left out of equality, hashing and repr (two contexts with the same placement are the same placement).

    Raises:
        ValueError: ``ep_size < 1`` or ``ep_rank`` outside ``[0, ep_size)``.
    """

    ep_rank: int = 0
    ep_size: int = 1
    dispatcher: str = "single_rank"
    runner: str = "torch"
    group: ProcessGroup | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {self.ep_size}")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank must be in [0, {self.ep_size}), got {self.ep_rank}")

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
