"""How an attention group's leader drives its followers: one broadcast message per forward.

The leader runs the scheduler; the other ranks of its attention group hold the same model shards' peers and
must run every forward with the same inputs, in the same order. Before each forward the leader broadcasts a
msgpack message over the group's gloo side (never pickle); followers rebuild the batch from it and run the
forward too (pd.engine.rank.follow). Slot-table changes travel as a journal, so each message carries only what
changed.

Messages (leader -> followers):
    {"op": "forward", "input_ids", "rows", "prefix_lens", "extend_lens", "logits_index", "slots", "mode"}
        "slots": [[row, first_page_index, pages], ...] slot-table assignments since the previous message.
    {"op": "idle", "mode"}: a forward without tokens (DP attention: another group computes, experts are shared).
    {"op": "ping"}: an idle leader's liveness check (a dead follower makes the broadcast fail).
    {"op": "profile", "action": "start", "request"} / {"op": "profile", "action": "stop"}: record the next forwards
        with torch.profiler, or stop, write the trace and ``gather`` where it went (pd.engine.profiler).
    {"op": "stop"}

Once at start-up a disaggregated instance's ranks also exchange their KV transfer endpoints (``gather``): each
decode rank receives its own pages from prefill, so the leader registers every rank's memory with each room.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class StepSync:
    """The broadcast channel of one attention group. ``leader`` is a global rank."""

    def __init__(self, control: ProcessGroup, device: ProcessGroup, leader: int, is_leader: bool) -> None:
        self.control, self.device, self.leader, self.is_leader = control, device, leader, is_leader

    def send(self, msg: dict[str, Any]) -> None:
        assert self.is_leader
        payload = torch.frombuffer(bytearray(msgpack.packb(msg, use_bin_type=True)), dtype=torch.uint8)
        dist.broadcast(torch.tensor([payload.numel()], dtype=torch.int64), self.leader, group=self.control)
        dist.broadcast(payload, self.leader, group=self.control)

    def receive(self) -> dict[str, Any]:
        assert not self.is_leader
        size = torch.empty(1, dtype=torch.int64)
        dist.broadcast(size, self.leader, group=self.control)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(payload, self.leader, group=self.control)
        msg: dict[str, Any] = msgpack.unpackb(payload.numpy().tobytes(), raw=False)
        return msg

    def gather(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's ``msg``, in group rank order, on every rank: a collective over the group's gloo side (every
        rank of the group calls it at the same point: at start-up, and at the end of a profile)."""
        payload = torch.frombuffer(bytearray(msgpack.packb(msg, use_bin_type=True)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(self.control))]
        dist.all_gather(sizes, size, group=self.control)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: payload.numel()] = payload
        parts = [torch.empty(longest, dtype=torch.uint8) for _ in sizes]
        dist.all_gather(parts, padded, group=self.control)
        return [msgpack.unpackb(p[: int(n.item())].numpy().tobytes(), raw=False) for p, n in zip(parts, sizes,
                                                                                                strict=True)]
