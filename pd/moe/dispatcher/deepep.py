"""The ``deepep`` backend: DeepEP's normal and low-latency buffers behind our Dispatcher contract.

Checked against the ``deep_ep`` the GPU machine runs (PyPI ``tokenspeed-deepep==1.2.1.post20251110``, the
DeepEP legacy API: its ``deep_ep/buffer.py`` and the assertion strings of its ``deep_ep_cpp`` extension), and
against deepseek-ai/DeepEP ``csrc/kernels/intranode.cu``:

- ``Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=, num_qps_per_rank=, explicitly_destroy=)``;
  ``get_dispatch_config`` / ``get_combine_config`` exist for 2, 4, 8, 16, ... ranks only (intranode kernels are
  compiled for 2, 4 and 8), and their ``get_nvl_buffer_size_hint`` / ``get_rdma_buffer_size_hint``.
- ``get_dispatch_layout(topk_idx, num_experts)`` -> (per rank, per RDMA rank or None, per expert, is_token_in_rank,
  event); ``dispatch(x, topk_idx=, topk_weights=, num_tokens_per_rank=, ...)`` -> (recv_x, recv_topk_idx,
  recv_topk_weights, per-local-expert counts as a Python list, handle, event); the kernel rewrites received ids to
  LOCAL ids and -1 for other ranks' slots (weight 0 there). ``combine(x, handle)`` -> (x, weights, event): an
  unweighted sum over ranks, accumulated in float32.
- ``topk_idx`` must have dtype ``deep_ep.topk_idx_t`` (int64 in this build; older releases lack the name and take
  int64), and the received ids come back in it: both are converted here.
- dtypes: intranode dispatch copies rows as raw 16-byte words (with the SM90 kernels a row must be a multiple of
  32 bytes and at most 16368 bytes, half of it staged per warp: hidden <= 8184 in bf16), but combine and both
  low-latency kernels take bfloat16 only, so the model must run in bf16 on this backend.
- ``low_latency_dispatch(x, topk_idx, C, E, use_fp8=False)`` -> (recv_x [E_local, R * C, H], recv_count [E_local]
  int32, handle, event, hook), rows of expert e valid up to recv_count[e]; ``low_latency_combine(x, topk_idx,
  topk_weights, handle)`` -> (combined [T, H], event, hook), weighted.

Run: normal mode on real Buffers, 2x and 4x H200 over NVLink, with that wheel (2026-11-28;
benchmarks/results/gpu_parallel.md and README.md): tests/test_deepep_gpu.py delivered every routed row bit for
bit at EP=2 and EP=4, and the MoE output matched the single-rank reference within bf16 tolerance; `pd serve --tp N
--ep N --moe-a2a-backend deepep --deepep-mode normal` (N = 2, 4; tests/test_gpu_parallel.py -k deepep, bf16, both
models) gave every first token of the one-GPU run and stayed at least as close to it as the torch backend;
benchmarks/bench_dispatch.py timed it as the reference column (dispatch_h200x*.json). float32 is not run: combine
takes bf16 only.
Low-latency mode has not run (DeepEP asserts in its IBGDA setup without InfiniBand NICs, which those machines
lack), so that path is checked only against the documented shapes and the one-rank fake buffer of
tests/test_dispatchers.py. DeepEP-Ascend (sgl-kernel-npu) exposes the same names; it is not checked here.

Mapping onto DispatchOutput:

- normal: DeepEP already returns what our runners take: ``recv_x [N, H]``, ``recv_topk_idx [N, K]`` with LOCAL
  expert ids and -1 for slots of other ranks, ``recv_topk_weights [N, K]`` float32. ``combine`` sums the per-rank
  partials without weights, as our contract (the runner applies the weights) requires.
- low_latency: DeepEP returns an expert-major ``[E_local, R * C, H]`` tensor plus per-expert counts, which is our
  batched format as it is (pd.moe.dispatcher.base), and its combine applies the routing weights itself, as the
  batched contract expects (the runner returns unweighted rows). The runner's ``[E_local, R * C, H]`` output goes
  to ``low_latency_combine`` with the original ids and weights. (Graph capture of this path needs a runner that
  keeps the counts on the device, such as triton: the reference runner reads them on the host.)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pd.moe.context import MoeContext
from pd.moe.dispatcher.base import CombineInput, Dispatcher, DispatchFormat, DispatchOutput
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
    explicitly_destroy: bool = False,
) -> Any:
    """Allocate one ``deep_ep.Buffer`` sized by DeepEP's own hints. Share it across all MoE layers of a process:
    it pins device memory and registers it with every peer, so allocate it once, not per layer.

    Args:
        group: the expert-parallel process group (NCCL / HCCL).
        mode: "normal" (NVLink/RDMA buffers from the dispatch/combine configs) or "low_latency" (RDMA buffer
            from ``get_low_latency_rdma_size_hint``, one QP per local expert, as DeepEP's README does).
        hidden_size: H. num_experts: E. max_tokens_per_rank: low-latency capacity C.
        hidden_bytes_per_elem: bytes per hidden element used for the normal-mode hint (2 for bf16).
        explicitly_destroy: the caller will call ``buffer.destroy()`` (on every rank) instead of leaving the release
            to the destructor, which DeepEP warns can hang Python's exception handling.

    Raises:
        ValueError: normal mode on a rank count DeepEP has no config for (it has 2, 4, 8, then multiples of 8).
    """
    deep_ep = import_deep_ep()
    num_ranks = group.size()
    if mode == "low_latency":
        rdma = deep_ep.Buffer.get_low_latency_rdma_size_hint(max_tokens_per_rank, hidden_size, num_ranks, num_experts)
        return deep_ep.Buffer(
            group,
            0,
            rdma,
            low_latency_mode=True,
            num_qps_per_rank=max(1, num_experts // num_ranks),
            explicitly_destroy=explicitly_destroy,
        )
    try:
        # DeepEP's config tables assert on other rank counts (a KeyError under python -O); fail before any
        # collective, on every rank alike, with what to change.
        configs = (deep_ep.Buffer.get_dispatch_config(num_ranks), deep_ep.Buffer.get_combine_config(num_ranks))
    except (AssertionError, KeyError):
        raise ValueError(
            f"DeepEP normal mode has no config for {num_ranks} ranks (2, 4 and 8 within a node, then multiples of "
            "8); choose another --ep or use --moe-a2a-backend torch"
        ) from None
    hidden_bytes = hidden_size * hidden_bytes_per_elem
    nvl_bytes, rdma_bytes = 0, 0
    for config in configs:
        nvl_bytes = max(nvl_bytes, config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks))
        rdma_bytes = max(rdma_bytes, config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks))
    return deep_ep.Buffer(group, nvl_bytes, rdma_bytes, explicitly_destroy=explicitly_destroy)


@dataclass(frozen=True)
class DeepEPNormalHandle:
    """DeepEP's opaque normal-mode handle and the received count per local expert (host list)."""

    deep_ep_handle: object
    num_recv_tokens_per_expert: list[int]


@dataclass(frozen=True)
class DeepEPLowLatencyHandle:
    """DeepEP's low-latency handle plus what ``low_latency_combine`` needs again: the original
    topk_ids [T, K] (``deep_ep.topk_idx_t``) / topk_weights [T, K] float32, and the received layout's shape
    [E_local, R * C, H]."""

    deep_ep_handle: object
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    layout: tuple[int, int, int]


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
        deep_ep = import_deep_ep()
        # The id dtype DeepEP's kernels are built for (an int64 in the builds seen); releases without the name
        # take int64.
        self.topk_idx_dtype = getattr(deep_ep, "topk_idx_t", torch.int64)
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

    @property
    def output_format(self) -> DispatchFormat:
        """normal: standard rows; low_latency: batched per local expert (DeepEP's own layout)."""
        return DispatchFormat.BATCHED if self.mode == "low_latency" else DispatchFormat.STANDARD

    def dispatch(self, hidden_TH: torch.Tensor, topk: TopKOutput) -> DispatchOutput:
        """Dispatch through DeepEP. Synchronous (async_finish off); normal mode syncs the host once (DeepEP's
        received counts), low_latency does not.

        Args:
            hidden_TH: [T, H] bfloat16 (combine and low_latency take nothing else). topk: ids [T, K] int64 (cast to
                ``deep_ep.topk_idx_t``), weights [T, K] float32.

        Returns:
            normal: standard format, hidden [N, H], local ids [N, K] (-1 = other rank), weights [N, K] float32.
            low_latency: batched format, hidden [E_local, R * C, H] (rows of expert e valid up to its count),
            expert_counts [E_local] int32 (low_latency_combine weights the outputs).

        Raises:
            ValueError: low_latency with T > max_tokens_per_rank.
        """
        # DeepEP asserts contiguous inputs and an exact id dtype rather than converting.
        hidden_TH = hidden_TH.contiguous()
        ids_TK = topk.topk_ids.to(self.topk_idx_dtype).contiguous()
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
        ours = DeepEPNormalHandle(handle, list(recv_per_expert))
        return DispatchOutput(recv_x, recv_ids.long(), recv_weights, ours)

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
        ll_handle = DeepEPLowLatencyHandle(handle, ids_TK, weights_TK, tuple(recv_x.shape))
        return DispatchOutput.batched(recv_x, recv_count.to(torch.int32), ll_handle)  # int32 already: no copy

    def combine(self, combine_input: CombineInput) -> torch.Tensor:
        """Combine through DeepEP. Synchronous. Returns [T, H] in this rank's token order, summed over ranks.

        Args:
            combine_input: normal: hidden_states [N, H] bfloat16 in dispatch's row order. low_latency:
                [E_local, R * C, H] bfloat16, each expert's unweighted outputs for its rows (DeepEP reads only
                the rows within its counts and applies the routing weights).
        """
        handle = combine_input.handle
        x = combine_input.hidden_states.contiguous()
        if isinstance(handle, DeepEPLowLatencyHandle):
            assert tuple(x.shape) == handle.layout, f"combine input {tuple(x.shape)}, dispatched {handle.layout}"
            combined, _, _ = self.buffer.low_latency_combine(x, handle.topk_ids, handle.topk_weights,
                                                             handle.deep_ep_handle)  # fmt: skip
            return combined
        assert isinstance(handle, DeepEPNormalHandle), f"not a deepep handle: {type(handle).__name__}"
        combined, _, _ = self.buffer.combine(x, handle.deep_ep_handle)
        return combined
