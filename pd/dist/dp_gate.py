"""How the leaders of an instance's DP-attention groups agree, each loop turn, on whether anyone computes."""

from __future__ import annotations

import torch
import torch.distributed as dist


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
