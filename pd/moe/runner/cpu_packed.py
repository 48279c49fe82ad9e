"""CPU MoE runner on oneDNN-packed per-expert weights (``--moe-runner-backend cpu_packed``, auto on CPU).

Same stages and contract as the torch reference runner (pre-permute, gate_up GEMM, activation, down GEMM,
post-permute; the permutes are the reference's own functions), but each expert's two projections are
reordered once, after loading, into oneDNN's blocked layout. At decode sizes (a few rows per expert) that
streams the weights at close to memory bandwidth, where ``torch._grouped_mm`` and ``F.linear`` on the
plain [N, K] layout reach a fraction of it; results differ from the reference by float rounding only.

Packing keeps a second copy of the local experts' weights (the originals stay for loading and for runners
that read them). Dtypes or devices oneDNN cannot pack run the reference runner instead.
"""

from __future__ import annotations

import logging

import torch

from pd.layers.cpu_packed import mkldnn_packable, pack_weight, packed_linear, tensor_stamp
from pd.moe.dispatcher.base import CombineInput, DispatchOutput
from pd.moe.runner.torch_ref import TorchMoeRunner, get_activation, post_permute, pre_permute

logger = logging.getLogger(__name__)


class CpuPackedMoeRunner:
    """Runner of one MoE layer; holds that layer's packed expert weights after ``prepare_weights``."""

    def __init__(self) -> None:
        self._w13_packed: list[torch.Tensor] = []  # per local expert: packed [2*I, H]
        self._w2_packed: list[torch.Tensor] = []  # per local expert: packed [H, I]
        self._stamp: tuple[tuple[int, int], tuple[int, int]] | None = None
        self._fallback: TorchMoeRunner | None = None

    def prepare_weights(self, w13_EXH: torch.Tensor, w2_EHI: torch.Tensor) -> None:
        """Pack every local expert's weights (call after loading and after any later weight update).

        Args:
            w13_EXH: [E_local, 2*I, H] gate (rows [0:I]) and up (rows [I:2I]), model dtype.
            w2_EHI: [E_local, H, I], model dtype.
        """
        self._stamp = (tensor_stamp(w13_EXH), tensor_stamp(w2_EHI))
        if not mkldnn_packable(w13_EXH.dtype, w13_EXH.device):
            logger.info("oneDNN cannot pack %s experts on %s; using the torch runner", w13_EXH.dtype, w13_EXH.device)
            self._w13_packed, self._w2_packed = [], []
            self._fallback = TorchMoeRunner()
            return
        self._fallback = None
        self._w13_packed = [pack_weight(w) for w in w13_EXH]
        self._w2_packed = [pack_weight(w) for w in w2_EHI]

    def run(
        self,
        dispatch_out: DispatchOutput,
        w13_EXH: torch.Tensor,
        w2_EHI: torch.Tensor,
        activation: str = "silu",
    ) -> CombineInput:
        """Compute this rank's experts for the dispatched tokens (same contract as TorchMoeRunner.run).

        Args:
            dispatch_out: hidden_states [N, H] (model dtype), topk_ids [N, K] int64 local ids (-1 = not on this
                rank), topk_weights [N, K] float32.
            w13_EXH: [E_local, 2*I, H] the weights ``prepare_weights`` packed; if they were modified or replaced
                since, they are packed again here.
            w2_EHI: [E_local, H, I], likewise.
            activation: "silu" or "gelu", applied to the gate half.

        Returns:
            CombineInput with hidden_states [N, H] (model dtype): per token, the sum over its local slots of
            weight * down(act(gate(x)) * up(x)); zeros for tokens with no local slot. The handle is passed on.

        Raises:
            ValueError: unknown activation, or an expert id >= E_local.
        """
        act = get_activation(activation)
        if self._stamp != (tensor_stamp(w13_EXH), tensor_stamp(w2_EHI)):
            self.prepare_weights(w13_EXH, w2_EHI)
        if self._fallback is not None:
            return self._fallback.run(dispatch_out, w13_EXH, w2_EHI, activation)
        assert dispatch_out.hidden_states.dtype == w13_EXH.dtype == w2_EHI.dtype
        perm = pre_permute(dispatch_out, w13_EXH.shape[0])
        # A loop over the experts that received rows, because oneDNN has no grouped GEMM over packed
        # weights; experts without rows cost nothing. The activation runs once over all rows in between.
        hit = [e for e, n in enumerate(perm.sizes_E) if n]
        if not hit:
            return post_permute(dispatch_out, perm, perm.x_MH)
        x_rows = perm.x_MH.split(perm.sizes_E)
        gate_up_MX = torch.cat([packed_linear(x_rows[e], self._w13_packed[e]) for e in hit])
        gate_MI, up_MI = gate_up_MX.chunk(2, dim=-1)
        inter_rows = act(gate_MI).mul_(up_MI).split([perm.sizes_E[e] for e in hit])
        down_MH = torch.cat([packed_linear(rows, self._w2_packed[e]) for e, rows in zip(hit, inter_rows, strict=True)])
        return post_permute(dispatch_out, perm, down_MH)
