"""The ``deepep`` backend: DeepEP's normal and low-latency buffers behind our Dispatcher contract.

Written against DeepEP's documented Python API (deepseek-ai/DeepEP ``deep_ep/buffer.py``: ``Buffer``,
``get_dispatch_layout``, ``dispatch``, ``combine``, ``low_latency_dispatch``, ``low_latency_combine`` and the
buffer-size hints; DeepEP-Ascend in sgl-project/sgl-kernel-npu exposes the same names). NOT RUN in this
repository's CI: ``deep_ep`` needs NVIDIA GPUs with NVSHMEM (or Ascend NPUs with HCCL). What is tested on CPU is
the registry entry and the clear ImportError without the package; the adapters below follow the documented
shapes and have not been executed against a real Buffer.

Mapping onto DispatchOutput:

- normal: DeepEP already returns what our runners take: ``recv_x [N, H]``, ``recv_topk_idx [N, K]`` int64 with
  LOCAL expert ids and -1 for slots of other ranks, ``recv_topk_weights [N, K]`` float32. ``combine`` sums the
  per-rank partials without weights, as our contract (the runner applies the weights) requires.
- low_latency: DeepEP returns an expert-major ``[E_local, R * C, H]`` tensor plus per-expert counts, and its
  combine applies the routing weights itself. We expose each row as a token with one slot: ``topk_ids [E_local *
  R * C, 1]`` = the row's local expert, or -1 beyond that expert's count; ``topk_weights`` = 1. The runner's
  output rows are reshaped back and handed to ``low_latency_combine`` with the original ids and weights.
  (Graph capture of this path needs a masked runner: the reference runner reads its counts on the host.)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pd.moe.context import MoeContext
from pd.moe.dispatcher.base import CombineInput, Dispatcher, DispatchOutput
from pd.moe.dispatcher.routing import expert_group
from pd.moe.topk import TopKOutput

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

MODES = ("normal", "low_latency")


def import_deep_ep() -> Any:
    """The ``deep_ep`` module. Raises ImportError saying how to get it, or which backend to use instead."""
    try:
        return importlib.import_module("deep_ep")
    except ImportError as exc:
        raise ImportError(
            "--moe-a2a-backend deepep needs the deep_ep package (DeepEP on CUDA, or DeepEP-Ascend from "
            "sgl-kernel-npu on NPU); install it, or use --moe-a2a-backend torch"
        ) from exc


def make_deepep_buffer(
    group: ProcessGroup,
    *,
    mode: str,
    hidden_size: int,
    num_experts: int,
    max_tokens_per_rank: int,
    hidden_bytes_per_elem: int = 2,
) -> Any:
    """Allocate one ``deep_ep.Buffer`` sized by DeepEP's own hints. Share it across all MoE layers of a process:
    it pins device memory and registers it with every peer, so allocate it once, not per layer.

    Args:
        group: the expert-parallel process group (NCCL / HCCL).
        mode: "normal" (NVLink/RDMA buffers from the dispatch/combine configs) or "low_latency" (RDMA buffer
            from ``get_low_latency_rdma_size_hint``, one QP per local expert, as DeepEP's README does).
        hidden_size: H. num_experts: E. max_tokens_per_rank: low-latency capacity C.
        hidden_bytes_per_elem: bytes per hidden element used for the normal-mode hint (2 for bf16).
    """
    deep_ep = import_deep_ep()
    num_ranks = group.size()
    if mode == "low_latency":
        rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens_per_rank, hidden_size, num_ranks, num_experts)
        return deep_ep.Buffer(group, 0, rdma, low_latency_mode=True, num_qps_per_rank=max(1, num_experts // num_ranks))
    hidden_bytes = hidden_size * hidden_bytes_per_elem
    nvl_bytes, rdma_bytes = 0, 0
    for config in (deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks)):
        nvl_bytes = max(nvl_bytes, config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks))
        rdma_bytes = max(rdma_bytes, config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks))
    return deep_ep.Buffer(group, nvl_bytes, rdma_bytes)


@dataclass(frozen=True)
class DeepEPNormalHandle:
    """DeepEP's opaque normal-mode handle and the received count per local expert (host list)."""

    deep_ep_handle: object
    num_recv_tokens_per_expert: list[int]


@dataclass(frozen=True)
class DeepEPLowLatencyHandle:
    """DeepEP's low-latency handle plus what ``low_latency_combine`` needs again: the original
    topk_ids [T, K] int64 / topk_weights [T, K] float32 and the received layout [E_local, R * C]."""

    deep_ep_handle: object
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    num_local_experts: int
    rows_per_expert: int


class DeepEPDispatcher(Dispatcher):
    """DeepEP-backed dispatcher (ep_size == tp_size; CUDA or NPU tensors only).

    Args:
        ctx: placement and ``ctx.group``.
        num_experts: E. mode: "normal" or "low_latency". max_tokens_per_rank: low-latency capacity C.
        buffer: a shared ``deep_ep.Buffer`` (see make_deepep_buffer); built here from ``hidden_size`` if None.
        hidden_size: H, needed only when ``buffer`` is None.

    Raises:
        ImportError: deep_ep is not installed.
        ValueError: unknown mode, no buffer and no hidden_size, or a missing/mismatched group.
    """

    def __init__(
        self,
        ctx: MoeContext,
        *,
        num_experts: int,
        mode: str = "normal",
        max_tokens_per_rank: int = 128,
        buffer: Any = None,
        hidden_size: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"deepep dispatcher mode must be one of {MODES}, got {mode!r}")
        import_deep_ep()
        self.mode = mode
        self.num_experts = num_experts
        self.num_local_experts = ctx.num_local(num_experts)
        self.max_tokens_per_rank = max_tokens_per_rank
        group = expert_group(ctx, "deepep")
        if buffer is None:
            if hidden_size is None or group is None:
                raise ValueError("the deepep dispatcher needs a deep_ep buffer, or hidden_size and MoeContext.group")
            buffer = make_deepep_buffer(
                group,
                mode=mode,
                hidden_size=hidden_size,
                num_experts=num_experts,
                max_tokens_per_rank=max_tokens_per_rank,
            )
        self.buffer = buffer

    def dispatch(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        """Dispatch through DeepEP. Synchronous (async_finish off); normal mode syncs the host once (DeepEP's
        received counts), low_latency does not.

        Args:
            hidden_TH: [T, H] bfloat16 (DeepEP's supported dtype). topk: ids [T, K] int64, weights [T, K] float32.

        Returns:
            normal: hidden [N, H], local ids [N, K] (-1 = other rank), weights [N, K] float32.
            low_latency: hidden [E_local * R * C, H], ids [E_local * R * C, 1] (row's local expert, -1 = empty
            row), weights all 1.0 float32 (low_latency_combine weights the outputs).

        Raises:
            ValueError: low_latency with T > max_tokens_per_rank.
        """
        ids_TK = topk.topk_ids.contiguous()
        weights_TK = topk.topk_weights.float().contiguous()
        if self.mode == "low_latency":
            return self._dispatch_low_latency(hidden_TH, ids_TK, weights_TK)
        num_per_rank, num_per_rdma_rank, num_per_expert, is_token_in_rank, _ = self.buffer.get_dispatch_layout(
            ids_TK, self.num_experts
        )
        recv_x, recv_ids, recv_weights, recv_per_expert, handle, _ = self.buffer.dispatch(
            hidden_TH,
            topk_idx=ids_TK,
            topk_weights=weights_TK,
            num_tokens_per_rank=num_per_rank,
            num_tokens_per_rdma_rank=num_per_rdma_rank,
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_per_expert,
        )
        return DispatchOutput(recv_x, recv_ids, recv_weights, DeepEPNormalHandle(handle, list(recv_per_expert)))

    def _dispatch_low_latency(
        self, hidden_TH: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> DispatchOutput:
        if hidden_TH.shape[0] > self.max_tokens_per_rank:
            raise ValueError(
                f"low_latency dispatch got {hidden_TH.shape[0]} tokens but max_tokens_per_rank="
                f"{self.max_tokens_per_rank}; raise it (same value on every rank) or cap the decode batch"
            )
        recv_x, recv_count, handle, _, _ = self.buffer.low_latency_dispatch(
            hidden_TH, ids_TK, self.max_tokens_per_rank, self.num_experts, use_fp8=False
        )
        num_local, rows, hidden = recv_x.shape
        row_E1 = torch.arange(rows, device=recv_x.device).unsqueeze(0)
        expert_E1 = torch.arange(num_local, device=recv_x.device).unsqueeze(1)
        ids_ER = torch.where(row_E1 < recv_count.unsqueeze(1), expert_E1, -1)
        ids_N1 = ids_ER.reshape(num_local * rows, 1).long()
        weights_N1 = torch.ones(num_local * rows, 1, dtype=torch.float32, device=recv_x.device)
        ll_handle = DeepEPLowLatencyHandle(handle, ids_TK, weights_TK, num_local, rows)
        return DispatchOutput(recv_x.view(num_local * rows, hidden), ids_N1, weights_N1, ll_handle)

    def combine(self, combine_input: CombineInput) -> torch.Tensor:
        """Combine through DeepEP. Synchronous. Returns [T, H] in this rank's token order, summed over ranks."""
        handle = combine_input.handle
        x_NH = combine_input.hidden_states
        if isinstance(handle, DeepEPLowLatencyHandle):
            x_ERH = x_NH.view(handle.num_local_experts, handle.rows_per_expert, x_NH.shape[-1])
            combined, _, _ = self.buffer.low_latency_combine(
                x_ERH, handle.topk_ids, handle.topk_weights, handle.deep_ep_handle
            )
            return combined
        assert isinstance(handle, DeepEPNormalHandle), f"not a deepep handle: {type(handle).__name__}"
        combined, _, _ = self.buffer.combine(x_NH, handle.deep_ep_handle)
        return combined
