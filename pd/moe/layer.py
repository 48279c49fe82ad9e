"""FusedMoE: the routed experts of one MoE layer (topk -> dispatch -> runner -> combine).

Shared experts, the router linear and any shared-expert gate stay in model code, which adds their output.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import torch
from torch import nn

from pd.moe import token_layout
from pd.moe.context import MoeContext
from pd.moe.dispatcher import get_dispatcher
from pd.moe.dispatcher.base import Dispatcher
from pd.moe.eplb.placement import LayerPlacement, trivial_phy2log
from pd.moe.runner import ExpertScales, get_runner
from pd.moe.token_layout import LayoutState
from pd.moe.topk import TopKConfig, TopKOutput, select_experts
from pd.quant.fp8 import FP8_DTYPE, block_dequant, scale_range, scale_shape

_SHARDS = ("gate", "up", "down")


# Backends with separate normal and low-latency paths; the others have one path for every batch.
_MODED_BACKENDS = ("torch", "deepep")


def _build_dispatchers(ctx: MoeContext, num_experts: int, hidden_size: int) -> dict[str, Dispatcher]:
    """One dispatcher per mode this layer may run in: both under a2a_mode "auto", else the one asked for."""
    if ctx.dispatcher not in _MODED_BACKENDS:
        return {"any": get_dispatcher(ctx.dispatcher, ctx, num_experts=num_experts)}
    modes = ("normal", "low_latency") if ctx.a2a_mode == "auto" else (ctx.a2a_mode,)
    dispatchers = {}
    for mode in modes:
        options: dict[str, object] = {"num_experts": num_experts, "max_tokens_per_rank": ctx.max_tokens_per_rank}
        if ctx.dispatcher == "torch":
            options["long_seq"] = ctx.long_seq
        else:
            options["buffer"] = _deepep_buffer(ctx, mode, num_experts, hidden_size)
        dispatchers[mode] = get_dispatcher(ctx.dispatcher, ctx, mode=mode, **options)
    return dispatchers


def _deepep_buffer(ctx: MoeContext, mode: str, num_experts: int, hidden_size: int) -> object:
    """The instance's DeepEP buffer for ``mode``, allocated by the first MoE layer that asks."""

    def make() -> object:
        from pd.moe.dispatcher.deepep import make_deepep_buffer

        assert ctx.group is not None, "the deepep dispatcher runs over the expert-parallel group"
        try:
            return make_deepep_buffer(ctx.group, mode=mode, hidden_size=hidden_size, num_experts=num_experts,
                                      max_tokens_per_rank=ctx.max_tokens_per_rank)
        except (AssertionError, RuntimeError) as e:
            if mode != "low_latency":
                raise
            # DeepEP's low-latency buffers need InfiniBand NICs (IBGDA) even inside one node; say what to do.
            raise RuntimeError(
                f"DeepEP could not set up its low_latency buffer ({type(e).__name__}: {e}); it needs InfiniBand "
                "NICs with IBGDA. Use --deepep-mode normal, or --moe-a2a-backend torch (its low_latency mode runs "
                "over NCCL)"
            ) from e

    return ctx.comm.get(f"deepep-buffer-{mode}", make)


def _overlap_stream(ctx: MoeContext, device: torch.device) -> torch.cuda.Stream:
    """The instance's second CUDA stream for single-batch overlap (one per process, shared by the layers)."""
    return ctx.comm.get(f"sbo-stream-{device}", lambda: torch.cuda.Stream(device=device))


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(tensor.shape)}")


class FusedMoE(nn.Module):
    """Routed experts of one layer, holding only this rank's experts.

    With ``ctx.eplb`` the layer has P = E + redundant physical expert slots, P / ep per rank, filled and routed
    by ``placement`` (pd.moe.eplb.placement); E_local below is then this rank's slot count.

    Parameters (dtype and device follow the ambient torch defaults, like nn.Linear; filled by the loaders):
        w13_weight: [E_local, 2*I, H] gate rows [0:I], up rows [I:2I]; I = this rank's share of the
            intermediate size (the whole of it unless ctx.moe_tp_size > 1).
        w2_weight: [E_local, H, I].
        e_score_correction_bias (buffer, only with has_correction_bias): [E] float32, used for selection only.
        w13_weight_scale_inv, w2_weight_scale_inv (after use_fp8; dropped at finalize_weights unless the runner
            computes with FP8 weights, ``runner.block_fp8``): the block scales of float8_e4m3fn w13/w2 (see use_fp8).

    Raises:
        ValueError: ctx.ep_size does not divide the physical expert count, an unknown dispatcher/runner name, or a
            runner that does not take the dispatcher's output format (pd.moe.dispatcher.base.DispatchFormat).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        topk: TopKConfig,
        ctx: MoeContext,
        activation: str = "silu",
        has_correction_bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.topk_config = topk
        self.ctx = ctx
        self.activation = activation
        redundant = ctx.eplb.redundant_experts if ctx.eplb is not None else 0
        self.num_physical_experts = num_experts + redundant
        if redundant and self.num_physical_experts % ctx.ep_size:
            raise ValueError(
                f"{num_experts} experts + {redundant} redundant = {self.num_physical_experts} physical experts, not a "
                f"multiple of --ep-size {ctx.ep_size}; choose --ep-num-redundant-experts so that it is"
            )
        self.num_local_experts = ctx.num_local(self.num_physical_experts)
        # The slice of each expert's intermediate rows this rank holds (all of them unless EP < TP).
        self.local_intermediate = ctx.local_intermediate(intermediate_size)
        self.inter_start = ctx.moe_tp_rank * self.local_intermediate
        self.dispatchers = _build_dispatchers(ctx, self.num_physical_experts, hidden_size)
        self.runner = get_runner(ctx.runner)
        for mode, dispatcher in self.dispatchers.items():
            if dispatcher.output_format not in self.runner.formats:
                raise ValueError(
                    f"--moe-runner-backend {ctx.runner} takes {', '.join(f.value for f in self.runner.formats)} "
                    f"dispatch outputs, but --moe-a2a-backend {ctx.dispatcher} ({mode} mode) produces "
                    f"{dispatcher.output_format.value} ones; choose a runner that takes them"
                )

        n_local, inter = self.num_local_experts, self.local_intermediate
        self.w13_weight = nn.Parameter(torch.empty(n_local, 2 * inter, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(n_local, hidden_size, inter), requires_grad=False)
        self.fp8_block: tuple[int, int] | None = None  # set by use_fp8 while the experts are FP8 in memory
        self.e_score_correction_bias: torch.Tensor | None
        if has_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.placement: LayerPlacement | None = None
        if ctx.eplb is not None:
            device = self.w13_weight.device
            self.placement = LayerPlacement(trivial_phy2log(num_experts, self.num_physical_experts), num_experts,
                                            ctx.ep_rank, ctx.ep_size, device,
                                            tokens_on_every_rank=ctx.dispatcher == "none")  # fmt: skip

    def forward(
        self,
        hidden_TH: torch.Tensor,
        router_logits_TE: torch.Tensor,
        shared: Callable[[], torch.Tensor] | None = None,
        mode: str = "normal",
    ) -> torch.Tensor:
        """Weighted sum of the routed experts' outputs, plus the shared experts' when given.

        Args:
            hidden_TH: [T, H] model dtype.
            router_logits_TE: [T, E] router logits (routing runs in float32 whatever their dtype).
            shared: computes the shared experts' [T, H] output from this rank's tokens, without collectives.
                With ctx.single_batch_overlap on CUDA it runs on a second stream while the routed experts
                dispatch, compute and combine; otherwise after them. Either way the result is routed + shared.
            mode: this forward's dispatch mode ("normal" | "low_latency", a field of the batch: every rank of the
                instance runs the same); it picks the dispatcher under --deepep-mode auto, else is ignored.

        Returns:
            [T, H] model dtype (routed weights renormalised and scaled per the TopKConfig).
        """
        if shared is None:
            return self._routed(hidden_TH, router_logits_TE, mode)
        if not (self.ctx.single_batch_overlap and hidden_TH.is_cuda):
            return self._routed(hidden_TH, router_logits_TE, mode) + shared()
        main = torch.cuda.current_stream()
        side = _overlap_stream(self.ctx, hidden_TH.device)
        side.wait_stream(main)  # the shared experts read what the main stream produced
        with torch.cuda.stream(side):
            shared_TH = shared()
        routed_TH = self._routed(hidden_TH, router_logits_TE, mode)
        main.wait_stream(side)
        shared_TH.record_stream(main)  # freed later on the main stream: keep the allocator from reusing it early
        return routed_TH + shared_TH

    def _routed(self, hidden_TH: torch.Tensor, router_logits_TE: torch.Tensor, mode: str) -> torch.Tensor:
        hidden_NH, topk, state = self._enter(hidden_TH, router_logits_TE)
        dispatcher = self.dispatcher(mode)
        dispatched = dispatcher.dispatch(hidden_NH, topk)
        combine_input = self.runner.run(dispatched, self.w13_weight, self.w2_weight, self.activation,
                                        self.expert_scales())  # fmt: skip
        return self._leave(dispatcher.combine(combine_input), state)

    def _enter(
        self, hidden_TH: torch.Tensor, router_logits_TE: torch.Tensor
    ) -> tuple[torch.Tensor, TopKOutput, LayoutState]:
        """This rank's tokens in the dispatcher's layout, and their routing (physical slots under EPLB)."""
        ctx = self.ctx
        hidden_NH, router_logits_NE, state = token_layout.enter(ctx.token_layout, ctx.group, ctx.attn_group,
                                                                hidden_TH, router_logits_TE)  # fmt: skip
        topk = select_experts(router_logits_NE, self.topk_config, self.e_score_correction_bias)
        if self.placement is not None:
            topk = self.placement.route(topk)
        return hidden_NH, topk, state

    def _leave(self, combined_NH: torch.Tensor, state: LayoutState) -> torch.Tensor:
        return token_layout.leave(self.ctx.token_layout, self.ctx.group, self.ctx.attn_group, combined_NH, state)

    def stages(
        self,
        hidden_TH: torch.Tensor,
        router_logits_TE: torch.Tensor,
        shared: Callable[[], torch.Tensor] | None = None,
        mode: str = "normal",
    ) -> Generator[None, None, torch.Tensor]:
        """forward in three steps for two-batch overlap: it yields once dispatch has started and once combine has
        started, so another micro-batch's work runs while the tokens travel; returns what forward returns (the
        shared experts run in order here). The collectives are forward's, in the same order."""
        hidden_NH, topk, state = self._enter(hidden_TH, router_logits_TE)
        dispatcher = self.dispatcher(mode)
        finish_dispatch = dispatcher.dispatch_start(hidden_NH, topk)
        yield
        combine_input = self.runner.run(finish_dispatch(), self.w13_weight, self.w2_weight, self.activation,
                                        self.expert_scales())  # fmt: skip
        finish_combine = dispatcher.combine_start(combine_input)
        yield
        routed_TH = self._leave(finish_combine(), state)
        return routed_TH if shared is None else routed_TH + shared()

    def dispatcher(self, mode: str) -> Dispatcher:
        """The dispatcher of a forward in ``mode`` (the only one unless --deepep-mode auto)."""
        if len(self.dispatchers) == 1:
            return next(iter(self.dispatchers.values()))
        return self.dispatchers[mode]

    def expert_scales(self) -> ExpertScales | None:
        """The block scales the runner computes with, while the experts are FP8 in memory; else None."""
        if self.fp8_block is None:
            return None
        return ExpertScales(self.w13_weight_scale_inv, self.w2_weight_scale_inv, self.fp8_block)

    def use_fp8(self, block: tuple[int, int]) -> None:
        """Holds the experts as block-FP8 (call before loading; see finalize_weights): w13_weight and w2_weight
        become float8_e4m3fn, with float32 scales w13_weight_scale_inv [E_local, 2 * ceil(I/bn), ceil(H/bk)]
        (gate's blocks, then up's) and w2_weight_scale_inv [E_local, ceil(H/bn), ceil(I/bk)], I this rank's share.

        Raises:
            Fp8LayoutError: this rank's share of the intermediate size cuts a scale block.
        """
        n_local, inter, hidden = self.num_local_experts, self.local_intermediate, self.hidden_size
        total = self.intermediate_size
        scale_range(self.inter_start, inter, total, block[0], "MoE intermediate rows (gate/up)")
        scale_range(self.inter_start, inter, total, block[1], "MoE intermediate columns (down)")
        self.compute_dtype = self.w13_weight.dtype
        device = self.w13_weight.device

        def param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)

        self.w13_weight = param(n_local, 2 * inter, hidden, dtype=FP8_DTYPE)
        self.w2_weight = param(n_local, hidden, inter, dtype=FP8_DTYPE)
        rows, cols = scale_shape(inter, hidden, block)
        self.w13_weight_scale_inv = param(n_local, 2 * rows, cols, dtype=torch.float32)
        self.w2_weight_scale_inv = param(n_local, *scale_shape(hidden, inter, block), dtype=torch.float32)
        self.fp8_block = block

    @torch.no_grad()
    def finalize_weights(self) -> None:
        """Let the runner prepare its view of the weights (e.g. packed copies). Call once the checkpoint is
        loaded, and again after changing the expert weights in place.

        FP8 experts (use_fp8) stay FP8 in memory with their scales when the runner computes with them
        (``runner.block_fp8``: the Triton runner); for the others (the torch and cpu_packed runners, the reference
        path) they are dequantized here to the compute dtype, once, and their FP8 tensors and scales dropped."""
        if self.fp8_block is not None and not self.runner.block_fp8:
            # gate and up were quantized apart: a block never spans both halves, even when I is not a multiple.
            inter, rows = self.local_intermediate, self.w13_weight_scale_inv.shape[1] // 2
            w13, s13 = self.w13_weight, self.w13_weight_scale_inv
            halves = [block_dequant(w13[:, :inter], s13[:, :rows], self.fp8_block, self.compute_dtype),
                      block_dequant(w13[:, inter:], s13[:, rows:], self.fp8_block, self.compute_dtype)]  # fmt: skip
            self.w13_weight = nn.Parameter(torch.cat(halves, dim=1), requires_grad=False)
            self.w2_weight = nn.Parameter(block_dequant(self.w2_weight, self.w2_weight_scale_inv, self.fp8_block,
                                                        self.compute_dtype), requires_grad=False)  # fmt: skip
            del self.w13_weight_scale_inv, self.w2_weight_scale_inv
            self.fp8_block = None
        self.runner.prepare_weights(self.w13_weight, self.w2_weight)

    @torch.no_grad()
    def load_expert_weight(
        self, name: str, expert_id: int, shard: str, tensor: torch.Tensor, scale_inv: bool = False
    ) -> bool:
        """Copy one expert's projection (or, with ``scale_inv``, its FP8 block scales) from a per-expert checkpoint
        tensor.

        Args:
            name: checkpoint tensor name, used in error messages.
            expert_id: logical expert id in [0, num_experts).
            shard: "gate" ([I, H], Mixtral w1), "up" ([I, H], Mixtral w3) or "down" ([H, I], Mixtral w2).
            tensor: the weight in nn.Linear layout (out_features, in_features), any float dtype (float8_e4m3fn
                after use_fp8); with ``scale_inv`` its scales [ceil(out/bn), ceil(in/bk)] float32.

        Returns:
            True if this rank owns the expert and copied it, False if it belongs to another rank.

        Raises:
            ValueError: unknown shard, expert id out of range, or a shape that does not match.
        """
        if shard not in _SHARDS:
            raise ValueError(f"{name}: shard must be one of {_SHARDS}, got {shard!r}")
        slots = self._local_slots_of(expert_id)
        if not slots:
            return False
        if scale_inv:
            self._load_expert_scales(name, slots, shard, tensor)
            return True
        if self.fp8_block is not None and tensor.dtype != FP8_DTYPE:
            raise ValueError(f"{name}: a {tensor.dtype} weight for FP8 experts (expected float8_e4m3fn and its scales)")
        inter, hidden = self.intermediate_size, self.hidden_size
        part = slice(self.inter_start, self.inter_start + self.local_intermediate)
        n = self.local_intermediate
        _check_shape(name, tensor, (hidden, inter) if shard == "down" else (inter, hidden))
        for local in slots:  # several when this rank holds replicas of the expert
            if shard == "down":
                self.w2_weight[local].copy_(tensor[:, part])
            else:
                rows = slice(0, n) if shard == "gate" else slice(n, 2 * n)
                self.w13_weight[local, rows].copy_(tensor[part])
        return True

    def _load_expert_scales(self, name: str, slots: list[int], shard: str, scale: torch.Tensor) -> None:
        if self.fp8_block is None:
            raise ValueError(f"{name}: FP8 scales for experts that were not built as FP8 (FusedMoE.use_fp8)")
        block, inter, hidden = self.fp8_block, self.intermediate_size, self.hidden_size
        if shard == "down":
            _check_shape(name, scale, scale_shape(hidden, inter, block))
            first, count = scale_range(self.inter_start, self.local_intermediate, inter, block[1], name)
            for local in slots:
                self.w2_weight_scale_inv[local].copy_(scale[:, first : first + count])
            return
        _check_shape(name, scale, scale_shape(inter, hidden, block))
        first, count = scale_range(self.inter_start, self.local_intermediate, inter, block[0], name)
        offset = 0 if shard == "gate" else count
        for local in slots:
            self.w13_weight_scale_inv[local, offset : offset + count].copy_(scale[first : first + count])

    def _local_slots_of(self, expert_id: int) -> list[int]:
        """This rank's slots holding logical ``expert_id`` (several with replicas on one rank; none elsewhere)."""
        if self.placement is None:
            local = self.ctx.local_expert_index(expert_id, self.num_experts)
            return [] if local is None else [local]
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert id {expert_id} outside [0, {self.num_experts})")
        return torch.nonzero(self.placement.local_slots() == expert_id).flatten().tolist()

    @property
    def num_local_logical_experts(self) -> int:
        """Distinct logical experts this rank holds (fewer than its slots when it holds two replicas of one)."""
        if self.placement is None:
            return self.num_local_experts
        return int(self.placement.local_slots().unique().numel())

    @torch.no_grad()
    def load_fused(self, gate_up_EXH: torch.Tensor, down_EHI: torch.Tensor, prefix: str = "experts") -> None:
        """Copy this rank's experts from transformers' fused expert tensors.

        transformers 5.x stores ``experts.gate_up_proj`` as [E, 2*I, H] with gate rows [0:I] and up rows [I:2I]
        concatenated (not interleaved, not transposed) and ``experts.down_proj`` as [E, H, I]; the checkpoint
        converters for Mixtral, Qwen2/3-MoE and DeepSeek-V2/V3 produce exactly this, which is also our layout.

        Args:
            gate_up_EXH: [E, 2*I, H] for all E logical experts.
            down_EHI: [E, H, I] for all E logical experts.
            prefix: checkpoint name prefix for error messages.

        Raises:
            ValueError: either tensor has the wrong shape.
        """
        if self.fp8_block is not None:
            raise ValueError(f"{prefix}: fused expert tensors cannot be loaded as FP8 (per-expert tensors only)")
        num, inter, hidden = self.num_experts, self.intermediate_size, self.hidden_size
        _check_shape(f"{prefix}.gate_up_proj", gate_up_EXH, (num, 2 * inter, hidden))
        _check_shape(f"{prefix}.down_proj", down_EHI, (num, hidden, inter))
        # Contiguous experts are a slice (a view, no copy); a placement's slots are gathered.
        local: slice | torch.Tensor = (slice(*self.ctx.local_expert_range(num)) if self.placement is None
                                       else self.placement.local_slots().to(gate_up_EXH.device))  # fmt: skip
        part = slice(self.inter_start, self.inter_start + self.local_intermediate)
        gate_up = gate_up_EXH[local]
        self.w13_weight.copy_(torch.cat((gate_up[:, :inter][:, part], gate_up[:, inter:][:, part]), dim=1))
        self.w2_weight.copy_(down_EHI[local][:, :, part])

    @torch.no_grad()
    def load_correction_bias(self, name: str, bias_E: torch.Tensor) -> None:
        """Copy DeepSeek-V3's ``e_score_correction_bias`` [E] (kept in float32).

        Raises:
            ValueError: the layer has no correction bias, or the shape is not [E].
        """
        if self.e_score_correction_bias is None:
            raise ValueError(f"{name}: this MoE layer was built without has_correction_bias")
        _check_shape(name, bias_E, (self.num_experts,))
        self.e_score_correction_bias.copy_(bias_E)
