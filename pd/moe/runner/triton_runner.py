"""Triton MoE runner (``--moe-runner-backend triton``, the CUDA default): the experts without a host sync.

run() is five launches up to 128 (token, slot) pairs (decode batches), eight above, whose shapes depend only on the
token count, so a decode step captures into a CUDA graph:

1. align (pd.moe.runner.moe_align, one launch up to 128 pairs, four above): the local (token, slot) pairs sorted
   by expert into blocks of BLOCK_M rows.
2. gate_up grouped GEMM (pd.moe.runner.fused_moe_kernel): [N*K, 2I], one row per local pair.
3. ``_act_and_mul_kernel``: act(gate) * up -> [N*K, I] in the model dtype, the reference's arithmetic.
4. down grouped GEMM with the routing weight multiplied in: [N*K, H].
5. ``_sum_slots_kernel``: per token, 0.0 plus its slots' rows in ascending slot order, float32 accumulation, one
   cast (the reference's post_permute order, so equal rows give equal bits); skipped slots add nothing.

The batched dispatch format (low-latency dispatch: [E_local, max_rows, H] rows already grouped per expert, with
counts on the device) skips the alignment and the sum: the batched grouped GEMM for gate_up, ``_batched_act_and_mul
_kernel``, the batched grouped GEMM for down, three launches over a grid fixed by max_rows whose programs past an
expert's count exit at once; the output [E_local, max_rows, H] is unweighted (combine weights it).

Block-FP8 experts (``scales`` given, float8_e4m3fn weights): the GEMMs' inputs are quantized per token and group of
bk columns first (pd.layers.triton_fp8_gemm.token_group_quant: the hidden rows before gate_up, the act(gate) * up
rows before down; in the batched format only the rows below each count), and both GEMMs multiply fp8 tiles with
their block scales (fused_moe_kernel.BlockFp8). In the standard format no launch is added: the act(gate) * up rows
are quantized by the act-and-mul launch itself (``_act_and_mul_quant_kernel``), and with decode-sized tiles (BLOCK_M
up to QUANTIZE_IN_GEMM_MAX_BLOCK_M) the gate_up GEMM quantizes its hidden tiles itself (larger tiles: one
quantization launch before it); the same bits either way. (Having the down GEMM compute act(gate) * up from the
gate_up rows in its k-steps instead, with no act-and-mul launch, was measured slower on an H200: its 16 column
blocks each redo the activation, +37 us of experts per batch-64 FP8 step against the launch's 19 us.) The batched
format adds two launches. Still no host sync. This adds the activations' e4m3 rounding to the dequantized
reference's arithmetic.

The arithmetic follows pd.moe.runner.torch_ref stage by stage; only the GEMMs' accumulation order differs (float32
in both). Every stage is deterministic: same inputs, same bits.
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from pd.layers.triton_activation import act_mul
from pd.layers.triton_fp8_gemm import FP8_DTYPE, TL_DTYPES, e4m3_groups, kernel_block_k, token_group_quant
from pd.moe.dispatcher.base import CombineInput, DispatchFormat, DispatchOutput
from pd.moe.runner import ExpertScales
from pd.moe.runner.fused_moe_kernel import BlockFp8, get_config, invoke_batched_moe_gemm, invoke_fused_moe_gemm
from pd.moe.runner.moe_align import align_pairs_to_blocks
from pd.moe.runner.torch_ref import get_activation

_BLOCK_COLS = 1024  # columns per program of the two elementwise kernels
_BATCHED_ROWS, _BATCHED_COLS = 16, 256  # the batched act kernel's tile


@triton.jit
def _act_and_mul_kernel(gate_up_ptr, out_ptr, ids_ptr, num_experts, inter, stride_g, stride_o,
                        ACTIVATION: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair)
    if (expert < 0) | (expert >= num_experts):  # a skipped slot: its gate_up row was never written
        return
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < inter
    row = gate_up_ptr + pair.to(tl.int64) * stride_g
    gate = tl.load(row + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(row + inter + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + pair.to(tl.int64) * stride_o + cols, act_mul(gate, up, ACTIVATION, OUT_DTYPE), mask=inside)


@triton.jit
def _act_and_mul_quant_kernel(gate_up_ptr, q_ptr, s_ptr, ids_ptr, num_experts, inter, stride_g, stride_q, stride_s,
                              ACTIVATION: tl.constexpr, OUT_DTYPE: tl.constexpr, GROUPS: tl.constexpr,
                              GROUP: tl.constexpr):  # fmt: skip
    """_act_and_mul_kernel, then token_group_quant of its model-dtype row (the same arithmetic, so the same e4m3
    values and scales as the two launches): GROUPS groups of GROUP columns per program."""
    pair = tl.program_id(0)
    expert = tl.load(ids_ptr + pair)
    if (expert < 0) | (expert >= num_experts):  # a skipped slot: the down GEMM never reads its row
        return
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    inside = cols < inter
    row = gate_up_ptr + pair.to(tl.int64) * stride_g
    gate = tl.load(row + cols, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(row + inter + cols, mask=inside, other=0.0).to(tl.float32)
    q, scale = e4m3_groups(act_mul(gate, up, ACTIVATION, OUT_DTYPE).to(tl.float32), q_ptr.dtype.element_ty)
    tl.store(q_ptr + pair.to(tl.int64) * stride_q + cols, q, mask=inside)
    tl.store(s_ptr + pair.to(tl.int64) * stride_s + groups, scale, mask=groups * GROUP < inter)


@triton.jit
def _batched_act_and_mul_kernel(gate_up_ptr, out_ptr, counts_ptr, max_rows, inter, stride_ge, stride_gm,
                                stride_oe, stride_om, ACTIVATION: tl.constexpr, OUT_DTYPE: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    expert = tl.program_id(2)
    rows_used = tl.minimum(tl.load(counts_ptr + expert), max_rows)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if tl.program_id(0) * BLOCK_R >= rows_used:  # past the expert's rows: its gate_up rows were never written
        return
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < rows_used) & (cols[None, :] < inter)
    src = gate_up_ptr + expert.to(tl.int64) * stride_ge + rows[:, None].to(tl.int64) * stride_gm + cols[None, :]
    gate = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(src + inter, mask=inside, other=0.0).to(tl.float32)
    dst = out_ptr + expert.to(tl.int64) * stride_oe + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(dst, act_mul(gate, up, ACTIVATION, OUT_DTYPE), mask=inside)


@triton.jit
def _sum_slots_kernel(rows_ptr, row_of_pair_ptr, weights_ptr, ids_ptr, out_ptr, num_experts, hidden, stride_r,
                      stride_o, TOP_K: tl.constexpr, OUT_DTYPE: tl.constexpr, BY_ROW_INDEX: tl.constexpr,
                      WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        pair = token * TOP_K + k
        expert = tl.load(ids_ptr + pair)
        use = (expert >= 0) & (expert < num_experts)  # a skipped slot's row was never written: add nothing
        if BY_ROW_INDEX:
            row = tl.load(row_of_pair_ptr + pair, mask=use, other=0)
        else:
            row = pair
        value = tl.load(rows_ptr + row.to(tl.int64) * stride_r + cols, mask=inside & use, other=0.0).to(tl.float32)
        if WEIGHTED:  # weight * row cast to the model dtype per slot, as the reference's arithmetic
            value = (value * tl.load(weights_ptr + pair, mask=use, other=0.0)).to(OUT_DTYPE).to(tl.float32)
        acc += value
    tl.store(out_ptr + token.to(tl.int64) * stride_o + cols, acc.to(OUT_DTYPE), mask=inside)


def sum_slots(rows_XH: torch.Tensor, ids_NK: torch.Tensor, num_experts: int, out_NH: torch.Tensor,
              row_of_pair_P: torch.Tensor | None = None, weights_NK: torch.Tensor | None = None) -> None:  # fmt: skip
    """out[t] = 0.0 plus, in ascending slot order, the row of each slot k of token t whose expert ids_NK[t, k] is in
    [0, num_experts) (others add nothing): row t * K + k of rows_XH, or row row_of_pair_P[t * K + k] when given;
    times weights_NK[t, k] (float32) and cast to out's dtype, slot by slot, when given. Summed in float32, cast
    once."""
    num_tokens, top_k = ids_NK.shape
    hidden = out_NH.shape[1]
    _sum_slots_kernel[(num_tokens, triton.cdiv(hidden, _BLOCK_COLS))](
        rows_XH, row_of_pair_P, weights_NK, ids_NK, out_NH, num_experts, hidden, rows_XH.stride(0), out_NH.stride(0),
        TOP_K=top_k, OUT_DTYPE=TL_DTYPES[out_NH.dtype], BY_ROW_INDEX=row_of_pair_P is not None,
        WEIGHTED=weights_NK is not None, BLOCK=min(_BLOCK_COLS, triton.next_power_of_2(hidden)),
    )  # fmt: skip


def act_and_mul_rows(gate_up_PX: torch.Tensor, expert_P: torch.Tensor, num_experts: int,
                     activation: str) -> torch.Tensor:  # fmt: skip
    """act(gate) * up of each row of gate_up [P, 2I] (gate columns [0, I), up [I, 2I)) -> [P, I] in its dtype; rows
    whose expert_P entry (any int tensor of P entries) is outside [0, num_experts) are skipped, left unwritten."""
    num_rows, inter = gate_up_PX.shape[0], gate_up_PX.shape[1] // 2
    inter_PI = gate_up_PX.new_empty(num_rows, inter)
    if num_rows:
        _act_and_mul_kernel[(num_rows, triton.cdiv(inter, _BLOCK_COLS))](
            gate_up_PX, inter_PI, expert_P, num_experts, inter, gate_up_PX.stride(0), inter_PI.stride(0),
            ACTIVATION=activation, OUT_DTYPE=TL_DTYPES[gate_up_PX.dtype],
            BLOCK=min(_BLOCK_COLS, triton.next_power_of_2(inter)),
        )  # fmt: skip
    return inter_PI


def batched_act_and_mul(gate_up_EMX: torch.Tensor, counts_E: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up of rows [0, counts_E[e]) of each expert's gate_up [E, max_rows, 2I] -> [E, max_rows, I]; the
    rows past the counts are left unwritten."""
    num_experts, max_rows, two_inter = gate_up_EMX.shape
    inter = two_inter // 2
    inter_EMI = gate_up_EMX.new_empty(num_experts, max_rows, inter)
    block_c = min(_BATCHED_COLS, triton.next_power_of_2(inter))
    _batched_act_and_mul_kernel[(triton.cdiv(max_rows, _BATCHED_ROWS), triton.cdiv(inter, block_c), num_experts)](
        gate_up_EMX, inter_EMI, counts_E, max_rows, inter, gate_up_EMX.stride(0), gate_up_EMX.stride(1),
        inter_EMI.stride(0), inter_EMI.stride(1), ACTIVATION=activation, OUT_DTYPE=TL_DTYPES[gate_up_EMX.dtype],
        BLOCK_R=_BATCHED_ROWS, BLOCK_C=block_c,
    )  # fmt: skip
    return inter_EMI


class TritonMoeRunner:
    """Fused-MoE runner on Triton kernels; CUDA, or CPU under TRITON_INTERPRET=1 (tests).

    Args:
        config: block sizes (fused_moe_kernel.CONFIG_KEYS) for both GEMMs, overriding the tuned tables and the
            default (tests use small blocks to keep the interpreter fast).
    """

    formats = (DispatchFormat.STANDARD, DispatchFormat.BATCHED)
    block_fp8 = True

    def __init__(self, config: dict[str, int] | None = None) -> None:
        self.config = config
        self._device_names: dict[torch.device, str] = {}

    def run(
        self,
        dispatch_out: DispatchOutput,
        w13_EXH: torch.Tensor,
        w2_EHI: torch.Tensor,
        activation: str = "silu",
        scales: ExpertScales | None = None,
    ) -> CombineInput:
        """Compute this rank's experts for the dispatched tokens. Asynchronous: no host sync.

        Args:
            dispatch_out: standard: hidden_states [N, H] (model dtype: float32, bfloat16 or float16), topk_ids
                [N, K] int64 local ids (-1 = not on this rank), topk_weights [N, K] float32. Batched:
                hidden_states [E_local, max_rows, H] (any strides), expert_counts [E_local] int32 on the device.
            w13_EXH: [E_local, 2*I, H] gate rows [0:I], up rows [I:2I], model dtype (float8_e4m3fn with scales).
            w2_EHI: [E_local, H, I], model dtype (float8_e4m3fn with scales).
            activation: "silu" or "gelu" (exact), applied to the gate half.
            scales: the block scales of float8_e4m3fn weights (W8A8: the activations are quantized per token
                and group of block[1] columns), or None.

        Returns:
            Standard: CombineInput with hidden_states [N, H] (model dtype): per token, the sum over its local slots
            of weight * down(act(gate(x)) * up(x)); zeros for tokens without a local slot. Batched: hidden_states
            [E_local, max_rows, H], row j < count_e of expert e is down(act(gate(x)) * up(x)), unweighted; the
            rows past the counts are left unwritten. The handle is passed on.

        Raises:
            ValueError: unknown activation. Ids >= E_local are NOT detected (that needs a host sync): such
                slots are skipped like -1; nor are counts > max_rows (clamped to max_rows).
        """
        get_activation(activation)  # validates the name
        if dispatch_out.format == DispatchFormat.BATCHED:
            return self._run_batched(dispatch_out, w13_EXH, w2_EHI, activation, scales)
        hidden_NH, ids_NK = dispatch_out.hidden_states, dispatch_out.topk_ids
        assert ids_NK is not None and dispatch_out.topk_weights is not None
        num_tokens, top_k = ids_NK.shape
        num_experts, two_inter, hidden = w13_EXH.shape
        inter = two_inter // 2
        dtype = hidden_NH.dtype
        assert hidden_NH.shape == (num_tokens, hidden) and w2_EHI.shape == (num_experts, hidden, inter)
        _check_weights(dtype, w13_EXH, w2_EHI, scales)
        out_NH = hidden_NH.new_empty(num_tokens, hidden)
        if num_tokens == 0 or top_k == 0:
            return CombineInput(hidden_states=out_NH.zero_(), handle=dispatch_out.handle)

        cfg_up = self._config(num_experts, two_inter, hidden, w13_EXH.dtype, num_tokens, top_k, hidden_NH.device,
                              scales)  # fmt: skip
        cfg_down = self._config(num_experts, hidden, inter, w13_EXH.dtype, num_tokens, top_k, hidden_NH.device,
                                scales)  # fmt: skip
        # One alignment serves both GEMMs, so they share BLOCK_M (the tuner picks tables that agree).
        cfg_down["BLOCK_SIZE_M"] = cfg_up["BLOCK_SIZE_M"]
        ids_NK = ids_NK.contiguous()
        aligned = align_pairs_to_blocks(ids_NK, num_experts, cfg_up["BLOCK_SIZE_M"])
        blocks = (aligned.sorted_ids, aligned.expert_of_block, aligned.num_rows_post_pad)
        num_pairs = num_tokens * top_k

        gate_up_PX = hidden_NH.new_empty(num_pairs, two_inter)
        if scales is not None and _quantizes_in_gemm(cfg_up, scales.block[1]):
            a_NH, fp8_up = hidden_NH.contiguous(), BlockFp8(None, scales.w13, scales.block, inter)
        else:
            a_NH, fp8_up = _quantized(hidden_NH.contiguous(), scales, "w13", inter)
        invoke_fused_moe_gemm(a_NH, w13_EXH, gate_up_PX, *blocks, top_k, False, cfg_up, fp8=fp8_up)
        if scales is not None and _fuses_quant(scales.block[1]):
            a_PI, fp8_down = _act_and_mul_quantized(gate_up_PX, ids_NK, num_experts, inter, hidden, activation,
                                                    dtype, scales)  # fmt: skip
        else:
            a_PI, fp8_down = _quantized(act_and_mul_rows(gate_up_PX, ids_NK, num_experts, activation), scales, "w2",
                                        hidden)  # fmt: skip
        weights_P = dispatch_out.topk_weights.to(torch.float32).contiguous().view(-1)
        down_PH = hidden_NH.new_empty(num_pairs, hidden)
        invoke_fused_moe_gemm(a_PI, w2_EHI, down_PH, *blocks, top_k, True, cfg_down, weights_P, fp8_down)
        sum_slots(down_PH, ids_NK, num_experts, out_NH)
        return CombineInput(hidden_states=out_NH, handle=dispatch_out.handle)

    def _run_batched(self, dispatch_out: DispatchOutput, w13_EXH: torch.Tensor, w2_EHI: torch.Tensor,
                     activation: str, scales: ExpertScales | None) -> CombineInput:  # fmt: skip
        """The batched format: gate_up GEMM, act_and_mul, down GEMM over [E_local, max_rows, ...], no sort."""
        x_EMH, counts_E = dispatch_out.hidden_states, dispatch_out.expert_counts
        assert counts_E is not None
        num_experts, max_rows, hidden = x_EMH.shape
        two_inter = w13_EXH.shape[1]
        inter = two_inter // 2
        dtype = x_EMH.dtype
        assert w13_EXH.shape == (num_experts, two_inter, hidden) and w2_EHI.shape == (num_experts, hidden, inter)
        _check_weights(dtype, w13_EXH, w2_EHI, scales)
        out_EMH = x_EMH.new_empty(num_experts, max_rows, hidden)
        if num_experts * max_rows == 0:
            return CombineInput(hidden_states=out_EMH, handle=dispatch_out.handle)

        # The tables are keyed by the token rows a standard-format batch hands the runner; in the standard format this
        # batch would be max_rows rows (R * C after low-latency dispatch), so that is the key. Without a table the
        # default assumes max_rows / E_local rows per expert (one local slot per row on average).
        cfg_up = self._config(num_experts, two_inter, hidden, w13_EXH.dtype, max_rows, 1, x_EMH.device, scales)
        cfg_down = self._config(num_experts, hidden, inter, w13_EXH.dtype, max_rows, 1, x_EMH.device, scales)
        gate_up_EMX = x_EMH.new_empty(num_experts, max_rows, two_inter)
        a_EMH, fp8_up = _quantized(x_EMH, scales, "w13", inter, counts_E)
        invoke_batched_moe_gemm(a_EMH, w13_EXH, gate_up_EMX, counts_E, cfg_up, fp8_up)
        a_EMI, fp8_down = _quantized(batched_act_and_mul(gate_up_EMX, counts_E, activation), scales, "w2", hidden,
                                     counts_E)  # fmt: skip
        invoke_batched_moe_gemm(a_EMI, w2_EHI, out_EMH, counts_E, cfg_down, fp8_down)
        return CombineInput(hidden_states=out_EMH, handle=dispatch_out.handle)

    def prepare_weights(self, w13_EXH: torch.Tensor, w2_EHI: torch.Tensor) -> None:
        """Nothing to prepare: the kernels read the weights as stored ([E, N, K], any strides)."""

    def _config(self, num_experts: int, n: int, k: int, dtype: torch.dtype, num_tokens: int, top_k: int,
                device: torch.device, scales: ExpertScales | None) -> dict[str, int]:  # fmt: skip
        """The block sizes of one GEMM (B = [E, n, k] of ``dtype``, the weights' dtype); with FP8 scales, k-steps
        that never straddle a scale group."""
        if self.config is not None:
            cfg = dict(self.config)
        else:
            if device not in self._device_names:
                name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
                self._device_names[device] = name
            cfg = get_config(num_experts, n, k, dtype, num_tokens, top_k, self._device_names[device])
        if scales is not None:
            cfg["BLOCK_SIZE_K"] = kernel_block_k(cfg["BLOCK_SIZE_K"], scales.block[1])
        return cfg


def _check_weights(dtype: torch.dtype, w13_EXH: torch.Tensor, w2_EHI: torch.Tensor,
                   scales: ExpertScales | None) -> None:  # fmt: skip
    """Weights in the model dtype, or float8_e4m3fn with scales."""
    assert dtype in TL_DTYPES, dtype
    weights = FP8_DTYPE if scales is not None else dtype
    assert w13_EXH.dtype == w2_EHI.dtype == weights, (dtype, w13_EXH.dtype, w2_EHI.dtype, scales is not None)


# Up to this BLOCK_SIZE_M (the tables' choice where each expert gets few rows: decode, weight-bound) the gate_up GEMM
# quantizes its A tiles itself, each tile once per column block, rather than after a launch of its own.
QUANTIZE_IN_GEMM_MAX_BLOCK_M = 16


def _quantizes_in_gemm(config: dict[str, int], group: int) -> bool:
    """Whether the gate_up GEMM quantizes the hidden rows itself: weight-bound tiles, one k-step per scale group."""
    return config["BLOCK_SIZE_M"] <= QUANTIZE_IN_GEMM_MAX_BLOCK_M and config["BLOCK_SIZE_K"] == group


def _fuses_quant(group: int) -> bool:
    """Whether _act_and_mul_quant_kernel takes this scale group: a power of two, whole groups per program."""
    return 16 <= group <= _BLOCK_COLS and group & (group - 1) == 0


def _act_and_mul_quantized(gate_up_PX: torch.Tensor, ids_NK: torch.Tensor, num_experts: int, inter: int,
                           hidden: int, activation: str, dtype: torch.dtype, scales: ExpertScales
                           ) -> tuple[torch.Tensor, BlockFp8]:  # fmt: skip
    """act(gate) * up quantized for the down GEMM in one launch (what _act_and_mul_kernel then _quantized(.., "w2")
    give, bit for bit): e4m3 [P, I] and the BlockFp8 of w2."""
    group = scales.block[1]
    num_pairs = gate_up_PX.shape[0]
    groups = triton.cdiv(inter, group)
    per_program = min(_BLOCK_COLS // group, triton.next_power_of_2(groups))
    a_q = torch.empty(num_pairs, inter, dtype=FP8_DTYPE, device=gate_up_PX.device)
    a_scale = torch.empty(num_pairs, groups, dtype=torch.float32, device=gate_up_PX.device)
    _act_and_mul_quant_kernel[(num_pairs, triton.cdiv(groups, per_program))](
        gate_up_PX, a_q, a_scale, ids_NK, num_experts, inter, gate_up_PX.stride(0), a_q.stride(0), a_scale.stride(0),
        ACTIVATION=activation, OUT_DTYPE=TL_DTYPES[dtype], GROUPS=per_program, GROUP=group,
    )  # fmt: skip
    return a_q, BlockFp8(a_scale, scales.w2, scales.block, hidden)


def _quantized(a: torch.Tensor, scales: ExpertScales | None, which: Literal["w13", "w2"], split: int,
               counts_E: torch.Tensor | None = None) -> tuple[torch.Tensor, BlockFp8 | None]:  # fmt: skip
    """A GEMM's A operand as the kernel takes it: ``a`` itself without scales; else its e4m3 quantization per row and
    group of block[1] columns, with the BlockFp8 of weight ``which`` ("w13": gate and up quantized apart at
    ``split`` = I; "w2": whole, ``split`` = H)."""
    if scales is None:
        return a, None
    a_q, a_scale = token_group_quant(a if a.stride(-1) == 1 else a.contiguous(), scales.block[1], counts_E)
    return a_q, BlockFp8(a_scale, getattr(scales, which), scales.block, split)
