"""CPU MoE runner on packed expert weights (``--moe-runner-backend cpu_packed``, auto on CPU).

Same contract as the torch reference runner; the expert weights are reordered once, after loading, into
layouts that stream at close to memory bandwidth. Three ways to compute a batch, picked per call:

- grouped GEMV (decode-sized batches, float32, when the C kernel of ``pd.layers.cpu_grouped_gemv`` builds on
  this machine): the reference's pre-permute, then one kernel call per projection that reads each hit
  expert's weights once and does only the routed FLOPs, then the reference's post-permute. Taken while the
  experts get at most ``_GEMV_MAX_ROWS_PER_EXPERT`` rows each on average.
- per expert (the general path, prefill): the pre-permute, then two oneDNN-packed GEMMs for each expert that
  received rows, then the post-permute.
- dense (small batches that hit nearly every expert, when the kernel is unavailable or the dtype is bf16):
  every token through every local expert in two oneDNN GEMMs, gate_up against all experts' rows stacked,
  and down against all experts side by side along K, with each token's inputs for experts it did not pick
  scaled by a routing weight of exactly zero. That is E/K times the routed FLOPs, which turns these GEMMs
  compute-bound on a few cores, but it beats two oneDNN calls per expert (~13 us each) and the permutes.

Results differ from the reference by float rounding only. Packing keeps extra copies of the local experts
(per expert, plus the grouped-GEMV panels or the dense layout); the originals stay for loading and for
repacking. Dtypes or devices oneDNN cannot pack run the reference runner instead, and so does the batched
dispatch format (low-latency dispatch, rows already grouped per expert: the reference's masked expert loop).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pd.layers import cpu_grouped_gemv
from pd.layers.cpu_packed import mkldnn_packable, pack_weight, packed_linear, tensor_stamp
from pd.moe.dispatcher.base import CombineInput, DispatchFormat, DispatchOutput
from pd.moe.runner import ExpertScales
from pd.moe.runner.torch_ref import PermutedRows, TorchMoeRunner, get_activation, post_permute, pre_permute

logger = logging.getLogger(__name__)

# Largest batch the dense path takes: a [T, K] x [K, N] GEMM does T/2 FLOPs per fp32 weight byte, which on a
# few AVX-512 cores stays below the FLOP/byte balance up to about 16-20 rows (measured crossover: T ~ 20).
_DENSE_MAX_TOKENS = 16
# Grouped GEMV while the average expert gets at most this many rows: it then reads each weight once at
# close to bandwidth; beyond, oneDNN's per-expert GEMMs compute faster (measured crossover: 4-6 rows).
_GEMV_MAX_ROWS_PER_EXPERT = 4
PATHS = ("gemv", "per_expert", "dense")


class CpuPackedMoeRunner:
    """Runner of one MoE layer; holds that layer's packed expert weights after ``prepare_weights``.

    Args:
        path: "gemv", "per_expert" or "dense" forces that path ("gemv" needs float32 and the kernel). None
            picks, with the kernel: gemv while this rank's rows are at most 4 * E_local, else per expert;
            without it: dense when T <= 16 and T * top_k >= E_local (nearly every expert is hit), else per
            expert.
    """

    formats = (DispatchFormat.STANDARD, DispatchFormat.BATCHED)
    block_fp8 = False  # computes in the model dtype: FusedMoE dequantizes FP8 experts for it

    def __init__(self, path: str | None = None) -> None:
        if path not in (None, *PATHS):
            raise ValueError(f"unknown cpu_packed path {path!r}; expected one of {PATHS} or None")
        self.path = path
        self._w13_packed: list[torch.Tensor] = []  # per local expert: packed [2*I, H]
        self._w2_packed: list[torch.Tensor] = []  # per local expert: packed [H, I]
        self._w13_dense: torch.Tensor | None = None  # packed [E*2*I, H]: all experts' gate/up rows stacked
        self._w2_dense: torch.Tensor | None = None  # packed [H, E*I]: all experts' down side by side along K
        self._w13_panels: torch.Tensor | None = None  # grouped-GEMV panels of gate_up [2I/16, E, H, 16]
        self._w2_panels: torch.Tensor | None = None  # grouped-GEMV panels of down [H/16, E, I, 16]
        self._stamp: tuple[tuple[int, int], tuple[int, int]] | None = None
        self._fallback: TorchMoeRunner | None = None

    def prepare_weights(self, w13_EXH: torch.Tensor, w2_EHI: torch.Tensor) -> None:
        """Pack every local expert's weights (call after loading and after any later weight update).

        Args:
            w13_EXH: [E_local, 2*I, H] gate (rows [0:I]) and up (rows [I:2I]), model dtype.
            w2_EHI: [E_local, H, I], model dtype.
        """
        self._stamp = (tensor_stamp(w13_EXH), tensor_stamp(w2_EHI))
        self._w13_packed, self._w2_packed, self._w13_dense, self._w2_dense = [], [], None, None
        self._w13_panels = self._w2_panels = None
        if not mkldnn_packable(w13_EXH.dtype, w13_EXH.device):
            logger.info("oneDNN cannot pack %s experts on %s; using the torch runner", w13_EXH.dtype, w13_EXH.device)
            self._fallback = TorchMoeRunner()
            return
        self._fallback = None
        num_experts, two_inter, hidden = w13_EXH.shape
        self._w13_packed = [pack_weight(w) for w in w13_EXH]
        self._w2_packed = [pack_weight(w) for w in w2_EHI]
        use_panels = (
            self.path in (None, "gemv")
            and cpu_grouped_gemv.supports(w13_EXH)
            and cpu_grouped_gemv.supports(w2_EHI)
            and cpu_grouped_gemv.available()
        )
        if self.path == "gemv" and not use_panels:
            raise ValueError("the gemv path needs float32 experts with 2*I and H multiples of 16 and the grouped "
                             "GEMV kernel built (see the log)")
        if use_panels:
            self._w13_panels = cpu_grouped_gemv.pack(w13_EXH)
            self._w2_panels = cpu_grouped_gemv.pack(w2_EHI)
        # the grouped GEMV takes every batch the dense layout would, so that copy is made only without it
        if self.path == "dense" or (self.path is None and not use_panels):
            self._w13_dense = pack_weight(w13_EXH.reshape(num_experts * two_inter, hidden))
            self._w2_dense = pack_weight(w2_EHI.permute(1, 0, 2).reshape(hidden, num_experts * (two_inter // 2)))

    def run(
        self,
        dispatch_out: DispatchOutput,
        w13_EXH: torch.Tensor,
        w2_EHI: torch.Tensor,
        activation: str = "silu",
        scales: ExpertScales | None = None,
    ) -> CombineInput:
        """Compute this rank's experts for the dispatched tokens (same contract as TorchMoeRunner.run).

        Args:
            dispatch_out: hidden_states [N, H] (model dtype), topk_ids [N, K] int64 local ids (-1 = not on this
                rank), topk_weights [N, K] float32; or the batched format, which the reference runner computes.
            w13_EXH: [E_local, 2*I, H] the weights ``prepare_weights`` packed; if they were modified or replaced
                since, they are packed again here.
            w2_EHI: [E_local, H, I], likewise.
            activation: "silu" or "gelu", applied to the gate half.
            scales: None (block_fp8 is False).

        Returns:
            CombineInput with hidden_states [N, H] (model dtype): per token, the sum over its local slots of
            weight * down(act(gate(x)) * up(x)); zeros for tokens with no local slot. The handle is passed on.
            Batched: as TorchMoeRunner.run.

        Raises:
            ValueError: unknown activation, or an expert id >= E_local.
        """
        act = get_activation(activation)
        assert scales is None, "FP8 experts are dequantized for this runner (block_fp8 = False)"
        if dispatch_out.format == DispatchFormat.BATCHED:
            return TorchMoeRunner().run(dispatch_out, w13_EXH, w2_EHI, activation)
        if self._stamp != (tensor_stamp(w13_EXH), tensor_stamp(w2_EHI)):
            self.prepare_weights(w13_EXH, w2_EHI)
        if self._fallback is not None:
            return self._fallback.run(dispatch_out, w13_EXH, w2_EHI, activation)
        assert dispatch_out.hidden_states.dtype == w13_EXH.dtype == w2_EHI.dtype
        assert dispatch_out.topk_ids is not None
        num_tokens, top_k = dispatch_out.topk_ids.shape
        num_experts = w13_EXH.shape[0]
        path = self.path
        if path is None and self._w13_panels is None:
            dense_fits = self._w13_dense is not None and num_tokens <= _DENSE_MAX_TOKENS
            path = "dense" if dense_fits and num_tokens * top_k >= num_experts else "per_expert"
        if path == "dense":
            return self._run_dense(dispatch_out, num_experts, w13_EXH.shape[1], act)
        perm = pre_permute(dispatch_out, num_experts)
        if path is None:  # the rows this rank got decide between grouped GEMV and per-expert GEMMs
            path = "gemv" if perm.num_rows <= _GEMV_MAX_ROWS_PER_EXPERT * num_experts else "per_expert"
        if path == "gemv":
            return self._run_gemv(dispatch_out, perm, act)

        # A loop over the experts that received rows, because oneDNN has no grouped GEMM over packed
        # weights; experts without rows cost nothing. The activation runs once over all rows in between.
        hit = [e for e, n in enumerate(perm.sizes_E) if n]
        if not hit:
            return post_permute(dispatch_out, perm, perm.x_MH)
        x_rows = perm.x_MH.split(perm.sizes_E)
        gate_up_MX = torch.cat([packed_linear(x_rows[e], self._w13_packed[e]) for e in hit])
        gate_MI, up_MI = gate_up_MX.chunk(2, dim=-1)
        inter_rows = act(gate_MI).mul_(up_MI).split([perm.sizes_E[e] for e in hit])
        down_MH = torch.cat(
            [packed_linear(rows, self._w2_packed[e]) for e, rows in zip(hit, inter_rows, strict=True)]
        )
        return post_permute(dispatch_out, perm, down_MH)

    def _run_gemv(
        self,
        dispatch_out: DispatchOutput,
        perm: PermutedRows,
        act: Callable[[torch.Tensor], torch.Tensor],
    ) -> CombineInput:
        """Two grouped-GEMV calls over the permuted rows (each hit expert's weights read once)."""
        assert self._w13_panels is not None and self._w2_panels is not None
        row_offsets = torch.zeros(len(perm.sizes_E) + 1, dtype=torch.int64)
        torch.cumsum(perm.counts_E, 0, out=row_offsets[1:])
        gate_up_MX = cpu_grouped_gemv.grouped_gemv(perm.x_MH, self._w13_panels, row_offsets)
        gate_MI, up_MI = gate_up_MX.chunk(2, dim=-1)
        inter_MI = act(gate_MI).mul_(up_MI)
        down_MH = cpu_grouped_gemv.grouped_gemv(inter_MI, self._w2_panels, row_offsets)
        return post_permute(dispatch_out, perm, down_MH)

    def _run_dense(
        self,
        dispatch_out: DispatchOutput,
        num_experts: int,
        two_inter: int,
        act: Callable[[torch.Tensor], torch.Tensor],
    ) -> CombineInput:
        """Every token through every local expert; routing weights of unpicked experts are exactly zero."""
        assert self._w13_dense is not None and self._w2_dense is not None
        hidden_NH, ids_NK, weights_NK = dispatch_out.hidden_states, dispatch_out.topk_ids, dispatch_out.topk_weights
        assert ids_NK is not None and weights_NK is not None
        num_tokens = hidden_NH.shape[0]
        if num_tokens and int(ids_NK.max()) >= num_experts:
            raise ValueError(f"topk_ids hold a local expert id >= num_local_experts={num_experts}")
        gate_up_NEX = packed_linear(hidden_NH, self._w13_dense).view(num_tokens, num_experts, two_inter)
        gate_NEI, up_NEI = gate_up_NEX.chunk(2, dim=-1)
        inter_NEI = act(gate_NEI).mul_(up_NEI)
        # [N, E] routing weights in float32 (like the reference's scaling); foreign slots (-1) land in an extra
        # column that is dropped, and a repeated id adds up as the reference's per-slot sum does. Scaling
        # before the down GEMM lets that GEMM sum a token's experts.
        weights_NE = torch.zeros(num_tokens, num_experts + 1, dtype=torch.float32, device=hidden_NH.device)
        weights_NE.scatter_add_(1, ids_NK.masked_fill(ids_NK < 0, num_experts), weights_NK.float())
        scaled_NEI = (inter_NEI * weights_NE[:, :num_experts, None]).to(hidden_NH.dtype)
        out_NH = packed_linear(scaled_NEI.view(num_tokens, num_experts * (two_inter // 2)), self._w2_dense)
        return CombineInput(hidden_states=out_NH, handle=dispatch_out.handle)
