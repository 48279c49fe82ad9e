"""Block-FP8 experts in the Triton MoE runner (W8A8: e4m3 weights with block scales, activations quantized per token
and group) against pure-torch oracles on fresh random inputs.

Two oracles, as for the dense GEMM (tests/test_triton_fp8_gemm.py):
- ``w8a8_reference``: the runner's arithmetic in torch, the activations quantized by pd.quant.fp8.token_group_quant
  and every product in float32 (equal up to summation order, and a rare e4m3 tie flipped by it);
- the dequantized model: TorchMoeRunner on the dequantized weights (what FusedMoE runs on CPU), which W8A8 differs
  from by the activations' rounding before both GEMMs: relative L2 error below MOE_W8A8_TOLERANCE.

CPU (CI): Triton's interpreter in a child process (tests/interpreter_child.py). Hidden 40 and intermediate 24 are
off the 16-wide scale blocks, so the gate and up halves of w13 end in partial blocks quantized apart; some experts
get no token, some slots and whole tokens belong to other ranks; the batched format with counts 0 and max_rows and
NaN past them; FusedMoE with the triton runner keeps the experts FP8 and matches the reference layer.
GPU (``pytest.mark.gpu``): DeepSeek-V3 (EP=8) and Qwen3-30B-A3B expert shapes in both formats, no host sync, and a
CUDA-graph replay equal to eager.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from pd.moe.dispatcher.base import DispatchOutput
from pd.moe.runner import ExpertScales
from pd.moe.runner.torch_ref import TorchMoeRunner
from pd.quant.fp8 import FP8_DTYPE, block_dequant, block_quant, token_group_quant
from tests.interpreter_child import InterpreterChild
from tests.test_moe_triton import SMALL, make_batched_case, make_case

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed (the test extra installs it)")  # fmt: skip

# Two quantized GEMMs in a row: the activations' e4m3 rounding before each (about 2.5-3% relative each, see
# tests/test_triton_fp8_gemm.W8A8_TOLERANCE) compounds to 3.5-4% on average at the small CPU shapes. Their few terms
# per dot product spread it widely row by row (one expert's row: 0.4% of 300K draws over 10%, the worst 26%), so a
# check holds the bound over all its rows together (the batched check's: at most 4.4% over 3,000 draws); the tight
# per-case oracle is w8a8_reference.
MOE_W8A8_TOLERANCE = 0.1
# Against w8a8_reference: float32 summation order (and a rare flipped e4m3 tie); bf16 adds its roundings.
EMULATED_TOLERANCE = {"float32": 2e-3, "bfloat16": 1.5e-2}
BLOCK = (16, 16)
# Column blocks of 16 lie inside one 16-row scale block: the kernels' one-scale-per-k-step path (SCALAR_B) for the
# down GEMM (the gate/up split at 24 is off the blocks: the per-column path); SMALL's 32 the per-column path.
SMALL_N16 = dict(SMALL, BLOCK_SIZE_N=16)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, block: tuple[int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor, ExpertScales]:  # fmt: skip
    """Per expert as the loader stores them (FusedMoE.use_fp8): gate and up quantized apart, scale rows of gate
    then up; w2 whole."""
    inter = w13.shape[1] // 2
    q13, s13, q2, s2 = [], [], [], []
    for e in range(w13.shape[0]):
        (gate, gate_s), (up, up_s) = block_quant(w13[e, :inter], block), block_quant(w13[e, inter:], block)
        q13.append(torch.cat([gate, up]))
        s13.append(torch.cat([gate_s, up_s]))
        down, down_s = block_quant(w2[e], block)
        q2.append(down)
        s2.append(down_s)
    return torch.stack(q13), torch.stack(q2), ExpertScales(torch.stack(s13), torch.stack(s2), block)


def dequantize_experts(q13: torch.Tensor, q2: torch.Tensor, scales: ExpertScales, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    inter, rows = q13.shape[1] // 2, scales.w13.shape[1] // 2
    gate = block_dequant(q13[:, :inter], scales.w13[:, :rows], scales.block, dtype)
    up = block_dequant(q13[:, inter:], scales.w13[:, rows:], scales.block, dtype)
    return torch.cat([gate, up], dim=1), block_dequant(q2, scales.w2, scales.block, dtype)


def expert_mlp(x_MH: torch.Tensor, w13_XH: torch.Tensor, w2_HI: torch.Tensor, group: int, activation: str,
               dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """One expert on rows x_MH, W8A8 in torch: quantized rows times float32 weights, the model dtype's roundings
    where the runner rounds (gate_up output, act(gate), act(gate) * up, down output)."""
    act = {"silu": F.silu, "gelu": F.gelu}[activation]
    gate_up = (block_dequant(*token_group_quant(x_MH, group), (1, group), torch.float32) @ w13_XH.T).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    inter = act(gate) * up
    down = block_dequant(*token_group_quant(inter, group), (1, group), torch.float32) @ w2_HI.T
    return down.to(dtype)


def w8a8_reference(dispatched: DispatchOutput, q13: torch.Tensor, q2: torch.Tensor, scales: ExpertScales,
                   activation: str) -> torch.Tensor:  # fmt: skip
    """The standard format: per token, 0.0 plus weight * expert_mlp over its local slots in slot order (float32)."""
    x, ids, weights = dispatched.hidden_states, dispatched.topk_ids, dispatched.topk_weights
    assert ids is not None and weights is not None
    w13, w2 = dequantize_experts(q13, q2, scales, torch.float32)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in range(w13.shape[0]):
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        if token.numel():
            rows = expert_mlp(x[token], w13[e], w2[e], scales.block[1], activation, x.dtype)
            out[token] += (rows.float() * weights[token, slot, None]).to(x.dtype).float()
    return out.to(x.dtype)


# ---- checks run in the interpreter child ----


def check_fp8_runner(dtype_name: str, seed: int) -> None:
    """The FP8 runner in the standard format against both oracles over tokens x top-k x experts; tokens without a
    local slot get exact zeros; reruns equal; an empty batch."""
    from pd.moe.runner.triton_runner import TritonMoeRunner

    dtype = getattr(torch, dtype_name)
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (got, dequantized model's), compared together
    for i, (tokens, top_k, experts) in enumerate(((1, 1, 4), (5, 2, 8), (33, 4, 8), (17, 3, 16))):
        config = SMALL_N16 if i % 2 else SMALL
        runner = TritonMoeRunner(config)
        activation = "gelu" if i == 2 else "silu"
        dispatched, w13, w2 = make_case(seed + i, tokens, top_k, experts, dtype, foreign=0.0 if i == 1 else 0.3)
        q13, q2, scales = quantize_experts(w13, w2, BLOCK)
        out = runner.run(dispatched, q13, q2, activation, scales)
        assert out.handle is dispatched.handle and out.hidden_states.dtype == dtype
        got = out.hidden_states
        where = f"{tokens} tokens, top-{top_k}, {experts} experts, {activation}, {dtype_name}, {config}"
        emulated = w8a8_reference(dispatched, q13, q2, scales, activation)
        assert rel_l2(got, emulated) < EMULATED_TOLERANCE[dtype_name], (where, rel_l2(got, emulated))
        dequantized = TorchMoeRunner().run(dispatched, *dequantize_experts(q13, q2, scales, dtype), activation)
        outputs.append((got, dequantized.hidden_states))
        assert not got[(dispatched.topk_ids < 0).all(dim=1)].any(), "a token without a local slot gets zeros"
        assert torch.equal(runner.run(dispatched, q13, q2, activation, scales).hidden_states, got)
    got_all, dequantized_all = (torch.cat(t) for t in zip(*outputs, strict=True))
    assert rel_l2(got_all, dequantized_all) < MOE_W8A8_TOLERANCE, (dtype_name, rel_l2(got_all, dequantized_all))
    empty = DispatchOutput(torch.empty(0, 40, dtype=dtype), torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2),
                           None)  # fmt: skip
    assert runner.run(empty, q13, q2, scales=scales).hidden_states.shape == (0, 40)


def check_act_and_mul_quant_fusion(device: str, seed: int) -> None:
    """The act-and-mul launch that quantizes its rows against _act_and_mul_kernel then token_group_quant (the two
    launches it replaces): the same e4m3 bytes and scales on every row of a local slot, bit for bit, over scale
    groups that do and do not divide I, rows wider than one program and both activations."""
    import triton

    from pd.layers.triton_fp8_gemm import token_group_quant as quant_kernel
    from pd.moe.runner import triton_runner as tr

    gen = torch.Generator().manual_seed(seed)
    cases = ((5, 40, 16, "float32", "silu"), (7, 96, 32, "bfloat16", "gelu"), (3, 2100, 128, "bfloat16", "silu"),
             (4, 768, 128, "float32", "silu"))  # (pairs, I, group, dtype, activation)
    for pairs, inter, group, dtype_name, activation in cases:
        dtype = getattr(torch, dtype_name)
        gate_up = (torch.randn(pairs, 2 * inter, generator=gen) * 4).to(dtype).to(device)
        ids = torch.randint(-1, 3, (pairs, 1), generator=gen).to(device)  # -1: a skipped slot
        scales = ExpertScales(torch.empty(0), torch.ones(3, 1, triton.cdiv(inter, group)), (group, group))
        assert tr._fuses_quant(group)
        got_q, got_fp8 = tr._act_and_mul_quantized(gate_up, ids, 3, inter, 24, activation, dtype, scales)
        inter_rows = torch.empty(pairs, inter, dtype=dtype, device=device)
        tr._act_and_mul_kernel[(pairs, triton.cdiv(inter, tr._BLOCK_COLS))](
            gate_up, inter_rows, ids, 3, inter, gate_up.stride(0), inter_rows.stride(0), ACTIVATION=activation,
            OUT_DTYPE=tr.TL_DTYPES[dtype], BLOCK=min(tr._BLOCK_COLS, triton.next_power_of_2(inter)),
        )  # fmt: skip
        local = (ids[:, 0] >= 0).cpu()
        want_q, want_scale = quant_kernel(inter_rows, group)
        where = (pairs, inter, group, dtype_name, activation)
        assert got_fp8.split == 24 and got_fp8.block == (group, group) and got_fp8.b_scale is scales.w2, where
        assert got_q.dtype == FP8_DTYPE and got_q.shape == (pairs, inter), where
        assert torch.equal(got_q.cpu()[local].view(torch.uint8), want_q.cpu()[local].view(torch.uint8)), where
        assert torch.equal(got_fp8.a_scale.cpu()[local], want_scale.cpu()[local]), where


def check_gemm_quantizes_a(device: str, seed: int) -> None:
    """The gate_up GEMM quantizing its model-dtype A tiles itself (BlockFp8.a_scale None) against the same GEMM on
    token_group_quant's output: equal bits, over full and partial scale groups and rows without a local slot."""
    from pd.layers.triton_fp8_gemm import token_group_quant as quant_kernel
    from pd.moe.runner.fused_moe_kernel import BlockFp8, invoke_fused_moe_gemm
    from pd.moe.runner.moe_align import align_pairs_to_blocks

    # The interpreter's small blocks; on a GPU fp8 dots need k-steps of 32+, so checkpoints' 128x128 blocks.
    block, scale = (BLOCK, 1) if device == "cpu" else ((128, 128), 8)
    for i, (tokens, top_k, experts, hidden, inter) in enumerate(((5, 2, 4, 48, 32), (19, 3, 8, 40, 16))):
        hidden, inter = hidden * scale, inter * scale  # 40 (320): a partial last scale group
        dispatched, w13, w2 = make_case(seed + i, tokens, top_k, experts, torch.bfloat16, hidden, inter,
                                        foreign=0.3, device=device)  # fmt: skip
        q13, _, scales = quantize_experts(w13.float().cpu(), w2.float().cpu(), block)
        q13, w13_scale = q13.to(device), scales.w13.to(device)
        ids = dispatched.topk_ids
        aligned = align_pairs_to_blocks(ids, experts, 16)
        blocks = (aligned.sorted_ids, aligned.expert_of_block, aligned.num_rows_post_pad)
        config = dict(SMALL, BLOCK_SIZE_K=block[1], BLOCK_SIZE_N=32 * scale)
        x = dispatched.hidden_states
        outs = []
        for a, a_scale in ((x, None), quant_kernel(x, block[1])):
            c = torch.zeros(tokens * top_k, 2 * inter, dtype=x.dtype, device=device)
            invoke_fused_moe_gemm(a, q13, c, *blocks, top_k, False, config,
                                  fp8=BlockFp8(a_scale, w13_scale, block, inter))  # fmt: skip
            outs.append(c.cpu())
        assert torch.equal(outs[0], outs[1]), (tokens, top_k, experts, hidden, inter)
        assert outs[0][(ids >= 0).flatten().cpu()].abs().sum() > 0


def check_fp8_batched(dtype_name: str, seed: int) -> None:
    """The batched format (rows per expert with counts, 0 and max_rows among them, NaN past them) against both
    oracles, expert by expert."""
    from pd.moe.runner.triton_runner import TritonMoeRunner

    dtype = getattr(torch, dtype_name)
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (got, dequantized model's) rows, compared together
    for i, (experts, max_rows) in enumerate(((1, 5), (3, 19), (6, 33))):
        batched, w13, w2 = make_batched_case(seed + i, experts, max_rows, dtype)
        q13, q2, scales = quantize_experts(w13, w2, BLOCK)
        got = TritonMoeRunner(SMALL_N16 if i % 2 else SMALL).run(batched, q13, q2, scales=scales).hidden_states
        assert got.shape == batched.hidden_states.shape and got.dtype == dtype
        w13_f, w2_f = dequantize_experts(q13, q2, scales, torch.float32)
        dequantized = TorchMoeRunner().run(batched, *dequantize_experts(q13, q2, scales, dtype)).hidden_states
        for e, n in enumerate(batched.expert_counts.tolist()):
            if n == 0:
                continue
            rows = batched.hidden_states[e, :n]
            emulated = expert_mlp(rows, w13_f[e], w2_f[e], BLOCK[1], "silu", dtype)
            where = f"{experts}x{max_rows} expert {e} ({n} rows) {dtype_name}"
            assert rel_l2(got[e, :n], emulated) < EMULATED_TOLERANCE[dtype_name], (where, rel_l2(got[e, :n], emulated))
            outputs.append((got[e, :n], dequantized[e, :n]))
    got_all, dequantized_all = (torch.cat(t) for t in zip(*outputs, strict=True))
    assert rel_l2(got_all, dequantized_all) < MOE_W8A8_TOLERANCE, (dtype_name, rel_l2(got_all, dequantized_all))


def check_fp8_layer(seed: int) -> None:
    """FusedMoE with --moe-runner-backend triton keeps FP8 experts in memory (weights and scales) after
    finalize_weights and, under an EPLB placement with replicas, matches the same layer on the reference runner
    (which dequantizes at finalize) within MOE_W8A8_TOLERANCE; in the low_latency (batched) mode too."""
    from pd.moe.context import EplbConfig, MoeContext
    from pd.moe.layer import FusedMoE
    from pd.moe.topk import TopKConfig

    gen = torch.Generator().manual_seed(seed)
    shapes = (("gate", (24, 40)), ("up", (24, 40)), ("down", (40, 24)))
    tensors = [(e, shard, block_quant(torch.randn(shape, generator=gen) / 7, BLOCK))
               for e in range(8) for shard, shape in shapes]  # fmt: skip
    eplb = EplbConfig(redundant_experts=2)
    contexts = {"reference": MoeContext(eplb=eplb), "triton": MoeContext(runner="triton", eplb=eplb),
                "low_latency": MoeContext(runner="triton", dispatcher="torch", a2a_mode="low_latency",
                                          max_tokens_per_rank=16)}  # fmt: skip
    layers = {}
    for name, ctx in contexts.items():
        layer = FusedMoE(8, 40, 24, TopKConfig(top_k=3), ctx)
        layer.use_fp8(BLOCK)
        for e, shard, (q, scale) in tensors:
            layer.load_expert_weight("w", e, shard, q)
            layer.load_expert_weight("s", e, shard, scale, scale_inv=True)
        layer.finalize_weights()
        if name != "reference":
            layer.runner.config = SMALL  # type: ignore[attr-defined]
        layers[name] = layer
    assert layers["reference"].w13_weight.dtype == torch.float32 and layers["reference"].expert_scales() is None
    for name in ("triton", "low_latency"):
        scales = layers[name].expert_scales()
        assert layers[name].w13_weight.dtype == layers[name].w2_weight.dtype == FP8_DTYPE and scales is not None
        assert scales.w13.shape[1:] == (4, 3) and scales.w2.shape[1:] == (3, 2)
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}  # both batch sizes compared together
    for tokens in (1, 16):
        x, logits = torch.randn(tokens, 40, generator=gen), torch.randn(tokens, 8, generator=gen)
        for name, layer in layers.items():
            outputs[name].append(layer(x, logits))
    reference = torch.cat(outputs["reference"])
    for name in ("triton", "low_latency"):
        assert rel_l2(torch.cat(outputs[name]), reference) < MOE_W8A8_TOLERANCE, name


# ---- CPU tests (CI) ----


def _seed() -> int:
    return int(torch.randint(0, 2**31, ()).item())


@needs_triton
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_fp8_triton_runner_matches_w8a8_and_dequantized_references_in_interpreter(
        dtype_name: str, interpreter: InterpreterChild) -> None:  # fmt: skip
    interpreter.run(__name__, "check_fp8_runner", dtype_name, _seed())


@needs_triton
def test_act_and_mul_quantizes_as_the_two_launches_in_interpreter(interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_act_and_mul_quant_fusion", "cpu", _seed())


@needs_triton
def test_gate_up_gemm_quantizing_its_rows_equals_prequantized_rows_in_interpreter(
        interpreter: InterpreterChild) -> None:  # fmt: skip
    interpreter.run(__name__, "check_gemm_quantizes_a", "cpu", _seed())


@needs_triton
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_fp8_triton_batched_format_matches_references_in_interpreter(dtype_name: str,
                                                                     interpreter: InterpreterChild) -> None:
    interpreter.run(__name__, "check_fp8_batched", dtype_name, _seed())


@needs_triton
def test_fused_moe_keeps_fp8_experts_for_triton_and_matches_reference_layer_in_interpreter(
        interpreter: InterpreterChild) -> None:  # fmt: skip
    interpreter.run(__name__, "check_fp8_layer", _seed())


@needs_triton
def test_fp8_runner_refuses_weights_and_scales_that_do_not_fit() -> None:
    """Shape and dtype checks run before any launch (no interpreter needed to reach them)."""
    from pd.moe.runner.triton_runner import TritonMoeRunner

    dispatched, w13, w2 = make_case(0, 4, 2, 4, torch.float32)
    q13, q2, scales = quantize_experts(w13, w2, BLOCK)
    with pytest.raises(AssertionError):  # bf16 weights given with scales
        TritonMoeRunner(SMALL).run(dispatched, w13, w2, scales=scales)
    with pytest.raises(AssertionError):  # FP8 weights without their scales
        TritonMoeRunner(SMALL).run(dispatched, q13, q2)


# ---- GPU tests ----

GPU_CASES = [
    # tokens, top_k, experts, hidden, inter, foreign share
    (64, 8, 128, 2048, 768, 0.0),  # Qwen3-30B-A3B decode
    (4096, 8, 128, 2048, 768, 0.0),  # Qwen3-30B-A3B prefill
    (64, 8, 32, 7168, 2048, 0.875),  # DeepSeek-V3 decode at EP=8
    (2048, 8, 32, 7168, 2048, 0.875),  # DeepSeek-V3 prefill at EP=8
    (300, 6, 16, 1000, 384, 0.2),  # hidden off the 128 block
]
# At real widths (K of 768-7168) the rounding errors average further than at the CPU shapes: over a whole batch
# 3.5-4%. One expert's few rows spread more (4.5% seen for 6 rows), so a per-expert check uses the emulated
# oracle (same roundings) and the dequantized model is compared over all rows at once.
GPU_MOE_TOLERANCE = 0.045


def _fp8_case(case: tuple[int, ...], seed: int) -> tuple[DispatchOutput, torch.Tensor, torch.Tensor, ExpertScales]:
    tokens, top_k, experts, hidden, inter, foreign = case
    dispatched, w13, w2 = make_case(seed, tokens, top_k, experts, torch.bfloat16, hidden, inter, foreign,
                                    device="cuda")  # fmt: skip
    return dispatched, *quantize_experts(w13.float(), w2.float(), (128, 128))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_fp8_triton_runner_matches_dequantized_bf16_within_tolerance(case: tuple[int, ...]) -> None:
    from pd.moe.runner.triton_runner import TritonMoeRunner

    dispatched, q13, q2, scales = _fp8_case(case, int(torch.randint(0, 2**31, ()).item()))
    got = TritonMoeRunner().run(dispatched, q13, q2, scales=scales).hidden_states
    reference = TorchMoeRunner().run(dispatched, *dequantize_experts(q13, q2, scales, torch.bfloat16)).hidden_states
    assert rel_l2(got, reference) < GPU_MOE_TOLERANCE, rel_l2(got, reference)
    assert not got[(dispatched.topk_ids < 0).all(dim=1)].any()


@pytest.mark.gpu
def test_gpu_act_and_mul_quantizes_as_the_two_launches() -> None:
    check_act_and_mul_quant_fusion("cuda", int(torch.randint(0, 2**31, ()).item()))


@pytest.mark.gpu
def test_gpu_gate_up_gemm_quantizing_its_rows_equals_prequantized_rows() -> None:
    check_gemm_quantizes_a("cuda", int(torch.randint(0, 2**31, ()).item()))


GPU_BATCHED_CASES = [(32, 1024, 7168, 2048), (128, 128, 2048, 768)]  # DeepSeek-V3 EP=8, Qwen3-30B-A3B decode


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_BATCHED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_fp8_triton_batched_format_matches_dequantized_bf16_within_tolerance(case: tuple[int, ...]) -> None:
    from pd.moe.runner.triton_runner import TritonMoeRunner

    experts, max_rows, hidden, inter = case
    batched, w13, w2 = make_batched_case(experts + max_rows, experts, max_rows, torch.bfloat16, hidden, inter,
                                         device="cuda")  # fmt: skip
    q13, q2, scales = quantize_experts(w13.float(), w2.float(), (128, 128))
    got = TritonMoeRunner().run(batched, q13, q2, scales=scales).hidden_states
    reference = TorchMoeRunner().run(batched, *dequantize_experts(q13, q2, scales, torch.bfloat16)).hidden_states
    w13_f, w2_f = dequantize_experts(q13, q2, scales, torch.float32)
    counts = batched.expert_counts.tolist()
    for e, n in enumerate(counts):
        if n:
            emulated = expert_mlp(batched.hidden_states[e, :n], w13_f[e], w2_f[e], 128, "silu", torch.bfloat16)
            assert rel_l2(got[e, :n], emulated) < EMULATED_TOLERANCE["bfloat16"], (e, n, rel_l2(got[e, :n], emulated))
    valid = (
        torch.cat([got[e, :n] for e, n in enumerate(counts)]),
        torch.cat([reference[e, :n] for e, n in enumerate(counts)]),
    )
    assert rel_l2(*valid) < GPU_MOE_TOLERANCE, rel_l2(*valid)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_fp8_runner_has_no_host_sync_and_replays_in_a_cuda_graph() -> None:
    from pd.moe.runner.triton_runner import TritonMoeRunner

    runner = TritonMoeRunner()
    static, q13, q2, scales = _fp8_case((64, 8, 128, 2048, 768, 0.5), 0)
    eager = runner.run(static, q13, q2, scales=scales).hidden_states  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = runner.run(static, q13, q2, scales=scales).hidden_states
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(again, eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = runner.run(static, q13, q2, scales=scales).hidden_states
    for seed in (1, 2):
        fresh, *_ = _fp8_case((64, 8, 128, 2048, 768, 0.25 * seed), seed)
        static.hidden_states.copy_(fresh.hidden_states)
        static.topk_ids.copy_(fresh.topk_ids)
        static.topk_weights.copy_(fresh.topk_weights)
        graph.replay()
        assert torch.equal(captured, runner.run(fresh, q13, q2, scales=scales).hidden_states)
