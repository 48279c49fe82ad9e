"""Block-FP8 checkpoints (DeepSeek-V3's format) and --quantization fp8 on CPU, against the dequantized checkpoint.

The oracle is the checkpoint of the dequantized weights (tests.fp8_checkpoints, quantized by a plain loop over
blocks): loaded in float32 it must give bit-identical logits and the same greedy tokens as the FP8 checkpoint,
whose linears stay FP8 in memory and dequantize on the fly.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pd.dist.tp import TensorParallel, take_shard
from pd.engine.io import SamplingParams
from pd.engine.llm import LLM
from pd.models.config import ModelConfig, ModelConfigError
from pd.models.fp8_loading import Fp8CheckpointError, Fp8Plan, convert_to_fp8, runnable_on
from pd.models.loader import load_model
from pd.moe.context import EplbConfig, MoeContext
from pd.moe.layer import FusedMoE
from pd.moe.topk import TopKConfig
from pd.quant.fp8 import FP8_DTYPE, Fp8Config, Fp8LayoutError, Fp8Linear, block_dequant, block_quant
from pd.server_args import ServerArgs
from tests.fp8_checkpoints import make_bf16_checkpoint, write_fp8_pair

# kind -> (block, modules_to_not_convert, tensors quantized although listed there, seed)
CASES: dict[str, tuple[tuple[int, int], tuple[str, ...], tuple[str, ...], int]] = {
    # Blocks of 16 cut q_lora (48), kv_a (40: a partial edge block) and the experts (48) into several blocks each.
    "deepseek_v3": ((16, 16), (), (), 201),
    # HF's exclusion list; o_proj is listed yet stored FP8, so it must load dequantized into the compute dtype.
    "qwen3_moe": ((32, 16), ("lm_head", "mlp.gate", "o_proj"), ("o_proj",), 202),
}


@pytest.fixture(scope="module", params=list(CASES))
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    kind = request.param
    block, not_converted, also, seed = CASES[kind]
    root = tmp_path_factory.mktemp(kind)
    base = make_bf16_checkpoint(kind, str(root / "bf16"), seed)
    fp8, dequant = str(root / "fp8"), str(root / "dequant")
    write_fp8_pair(base, fp8, dequant, block, not_converted, also)
    return dict(
        kind=kind,
        block=block,
        base=base,
        fp8=fp8,
        dequant=dequant,
        ours=LLM(fp8, page_size=4, chunked_prefill_size=32),
        oracle=LLM(dequant, page_size=4, chunked_prefill_size=32),
    )


def _prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


def test_fp8_checkpoint_linears_stay_fp8_with_float32_scales(ckpt: dict[str, Any]) -> None:
    model, block = ckpt["ours"].runner.model, ckpt["block"]
    tensors = load_file(os.path.join(ckpt["fp8"], "model.safetensors"))
    fp8_linears = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    # Exactly the checkpoint's scaled weights outside modules_to_not_convert are FP8 in memory, bit for bit.
    config = ModelConfig.from_path(ckpt["fp8"]).quantization
    assert config is not None and config.block == block
    expected = {n.removesuffix(".weight_scale_inv") for n in tensors if n.endswith("_scale_inv")
                and ".experts." not in n and not config.skips(n)}  # fmt: skip
    assert set(fp8_linears) == expected and expected
    for name, linear in fp8_linears.items():
        assert linear.weight.dtype == FP8_DTYPE and linear.weight_scale_inv.dtype == torch.float32
        assert torch.equal(linear.weight.view(torch.uint8), tensors[name + ".weight"].view(torch.uint8))
        assert torch.equal(linear.weight_scale_inv, tensors[name + ".weight_scale_inv"])
    # The output head and routers stay in the compute dtype, and so does a listed module stored as FP8.
    assert model.lm_head.weight.dtype == torch.float32
    for name, module in model.named_modules():
        if name.endswith((".gate", "o_proj")) and ckpt["kind"] == "qwen3_moe":
            assert not isinstance(module, Fp8Linear) and module.weight.dtype == torch.float32, name


def test_fp8_experts_dequantize_to_the_oracle_weights(ckpt: dict[str, Any]) -> None:
    ours = [m for m in ckpt["ours"].runner.model.modules() if isinstance(m, FusedMoE)]
    oracle = [m for m in ckpt["oracle"].runner.model.modules() if isinstance(m, FusedMoE)]
    assert ours and len(ours) == len(oracle)
    for mine, ref in zip(ours, oracle, strict=True):
        assert mine.w13_weight.dtype == torch.float32 and not hasattr(mine, "w13_weight_scale_inv")
        assert torch.equal(mine.w13_weight, ref.w13_weight) and torch.equal(mine.w2_weight, ref.w2_weight)


def test_fp8_prefill_logits_equal_dequantized_checkpoint_exactly(ckpt: dict[str, Any]) -> None:
    for ids in _prompts((9, 70), seed=11):  # 70 spans three chunks of 32
        assert torch.equal(ckpt["ours"].prefill_logits(ids), ckpt["oracle"].prefill_logits(ids))


def test_fp8_greedy_tokens_equal_dequantized_checkpoint(ckpt: dict[str, Any]) -> None:
    prompts = _prompts((5, 23, 41), seed=12)
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0)
    ours, oracle = ckpt["ours"].generate(prompts, sampling), ckpt["oracle"].generate(prompts, sampling)
    assert ours == oracle and all(len(o) == 8 for o in ours)


def _load_unfinalized(
    path: str, moe_ctx: MoeContext | None = None, quantization: str = "none", tp: TensorParallel | None = None
) -> nn.Module:
    """The model as loaded, before FusedMoE.finalize_weights (experts still FP8 with their scales)."""
    return load_model(ModelConfig.from_path(path), torch.float32, torch.device("cpu"), moe_ctx or MoeContext(),
                      max_position=256, tp=tp or TensorParallel(), quantization=quantization)  # fmt: skip


@pytest.mark.parametrize("ckpt", ["deepseek_v3"], indirect=True)
def test_quantization_fp8_equals_the_checkpoint_quantized_offline(ckpt: dict[str, Any], tmp_path: Any) -> None:
    """--quantization fp8 on the bf16 checkpoint holds what the offline writer (128-blocks) stores, bit for bit."""
    offline = str(tmp_path / "fp8_128")
    write_fp8_pair(ckpt["base"], offline, str(tmp_path / "dequant_128"), (128, 128))
    online_state = _load_unfinalized(ckpt["base"], quantization="fp8").state_dict()
    offline_state = _load_unfinalized(offline).state_dict()
    assert online_state.keys() == offline_state.keys()
    assert any(t.dtype == FP8_DTYPE for t in online_state.values())
    for name, tensor in online_state.items():
        assert tensor.dtype == offline_state[name].dtype, name
        view = torch.uint8 if tensor.dtype == FP8_DTYPE else tensor.dtype
        assert torch.equal(tensor.view(view), offline_state[name].view(view)), name


@pytest.mark.parametrize("ckpt", ["deepseek_v3"], indirect=True)  # MLA's head-split projections
def test_tp_rank_loads_whole_scale_blocks_of_its_shard(ckpt: dict[str, Any]) -> None:
    model = _load_unfinalized(ckpt["fp8"], tp=TensorParallel(rank=1, size=2))
    tensors = load_file(os.path.join(ckpt["fp8"], "model.safetensors"))
    q_b = model.get_submodule("model.layers.0.self_attn.q_b_proj")  # column-parallel: 4 heads x 48 rows, 2 per rank
    o = model.get_submodule("model.layers.0.self_attn.o_proj")  # row-parallel: 64 columns, 32 per rank
    prefix = "model.layers.0.self_attn."
    rows = tensors[prefix + "q_b_proj.weight"].shape[0]
    blocks = rows // ckpt["block"][0]
    assert rows == 192 and torch.equal(q_b.weight_scale_inv,
                                       tensors[prefix + "q_b_proj.weight_scale_inv"][blocks // 2 :])  # fmt: skip
    assert torch.equal(o.weight_scale_inv, tensors[prefix + "o_proj.weight_scale_inv"][:, 2:4])
    assert torch.equal(q_b.weight.view(torch.uint8),
                       tensors[prefix + "q_b_proj.weight"][rows // 2 :].view(torch.uint8))  # fmt: skip


def test_tp_shard_that_cuts_a_scale_block_is_an_error_naming_the_sizes() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = TensorParallel(rank=1, size=2).column_linear(64, 4, 12, False, "heads")  # rows [24, 48)

    model = Tiny()
    with pytest.raises(Fp8LayoutError, match=r"proj.weight dim 0: the shard \[24, 48\) of 48 cuts .* blocks of 16"):
        convert_to_fp8(model, Fp8Plan(Fp8Config((16, 16)), online=False, modules=frozenset({"proj"})), tp_size=2)
    convert_to_fp8(model, Fp8Plan(Fp8Config((8, 16)), online=False, modules=frozenset({"proj"})), tp_size=2)
    full = torch.arange(6 * 4, dtype=torch.float32).view(6, 4)  # [48 / 8, 64 / 16] scales of the whole weight
    assert torch.equal(take_shard(model.proj.weight_scale_inv, full), full[3:6])


def test_a_kv_head_replicated_over_ranks_takes_the_scale_blocks_of_the_whole_head() -> None:
    """Two ranks share the one KV head (12 rows: a partial scale block of 16), so each holds all of it and its
    scales; the head is not a 1/2 shard of a 24-row tensor."""

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k_proj = TensorParallel(rank=1, size=2).kv_linear(64, 1, 12, False)

    model = Tiny()
    convert_to_fp8(model, Fp8Plan(Fp8Config((16, 16)), online=False, modules=frozenset({"k_proj"})), tp_size=2)
    weight, scale_inv = block_quant(torch.randn(12, 64), (16, 16))
    assert torch.equal(take_shard(model.k_proj.weight, weight).view(torch.uint8), weight.view(torch.uint8))
    assert torch.equal(take_shard(model.k_proj.weight_scale_inv, scale_inv), scale_inv)


def _experts(ctx: MoeContext) -> FusedMoE:
    return FusedMoE(8, 64, 48, TopKConfig(top_k=2), ctx)


def test_expert_slices_and_replicas_carry_their_scales_and_dequantize_to_the_oracle() -> None:
    """Rank 1 of a 2-way expert-TP split (intermediate rows/columns [24, 48)) under an EPLB placement with two
    replicas, loaded from FP8 per-expert tensors, equals the same layer loaded from the dequantized tensors."""
    ctx = MoeContext(moe_tp_rank=1, moe_tp_size=2, eplb=EplbConfig(redundant_experts=2))
    gen = torch.Generator().manual_seed(5)
    ours, oracle, block = _experts(ctx), _experts(ctx), (8, 8)
    ours.use_fp8(block)
    for e in range(8):
        for shard, shape in (("gate", (48, 64)), ("up", (48, 64)), ("down", (64, 48))):
            q, scale_inv = block_quant(torch.randn(shape, generator=gen), block)
            assert ours.load_expert_weight("w", e, shard, q) and ours.load_expert_weight("s", e, shard, scale_inv,
                                                                                          scale_inv=True)  # fmt: skip
            oracle.load_expert_weight("w", e, shard, block_dequant(q, scale_inv, block, torch.float32))
    assert ours.w13_weight.dtype == FP8_DTYPE and ours.w13_weight_scale_inv.shape == (10, 6, 8)
    ours.finalize_weights()
    oracle.finalize_weights()
    assert torch.equal(ours.w13_weight, oracle.w13_weight) and torch.equal(ours.w2_weight, oracle.w2_weight)


def test_expert_share_that_cuts_a_scale_block_is_an_error() -> None:
    with pytest.raises(Fp8LayoutError, match=r"the shard \[24, 48\) of 48 cuts the FP8 scale blocks of 16"):
        _experts(MoeContext(moe_tp_rank=1, moe_tp_size=2)).use_fp8((16, 16))


def test_fp8_tensors_of_unconverted_modules_dequantize_in_either_order_and_need_their_pair() -> None:
    plan = Fp8Plan(Fp8Config((16, 16)), online=False, modules=frozenset({"kept"}))
    q, scale_inv = block_quant(torch.randn(20, 40), (16, 16))
    stream = [
        ("kept.weight", q), ("a.weight_scale_inv", scale_inv), ("a.weight", q), ("b.weight", q),
        ("b.weight_scale_inv", scale_inv), ("kept.weight_scale_inv", scale_inv), ("n.weight", q.float()),
    ]  # fmt: skip
    out = dict(plan.transform(iter(stream)))
    assert out.keys() == {"kept.weight", "kept.weight_scale_inv", "a.weight", "b.weight", "n.weight"}
    assert out["kept.weight"] is q and out["kept.weight_scale_inv"] is scale_inv
    expected = q.float() * scale_inv.repeat_interleave(16, 0).repeat_interleave(16, 1)[:20, :40]
    assert torch.equal(out["a.weight"], expected) and torch.equal(out["b.weight"], expected)
    with pytest.raises(Fp8CheckpointError, match="c.weight"):
        list(plan.transform(iter([("c.weight", q)])))


def test_blocks_the_cuda_kernels_cannot_step_through_load_dequantized_on_cuda_only() -> None:
    """A block width that is no multiple of 32 (the FP8 MMA's least K) makes the plan empty on CUDA, so every FP8
    tensor takes the dequantizing path; 128-blocks, and any block on CPU, keep the plan."""
    modules = frozenset({"model.layers.0.mlp.experts", "model.layers.0.self_attn.o_proj"})
    for block, cuda_keeps in (((16, 16), False), ((128, 48), False), ((16, 32), True), ((128, 128), True)):
        plan = Fp8Plan(Fp8Config(block), online=False, modules=modules)
        assert runnable_on(plan, torch.device("cpu")) is plan
        assert runnable_on(plan, torch.device("cuda")).modules == (modules if cuda_keeps else frozenset()), block


def test_block_quant_maps_each_block_max_to_448_within_e4m3_rounding() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 70, generator=gen) * torch.rand(40, 1, generator=gen)
    q, scale_inv = block_quant(weight, (16, 32))
    assert q.dtype == FP8_DTYPE and scale_inv.shape == (3, 3)
    tiles = q.float().abs()
    assert all(tiles[i * 16 : (i + 1) * 16, j * 32 : (j + 1) * 32].max() == 448 for i in range(3) for j in range(3))
    back = block_dequant(q, scale_inv, (16, 32), torch.float32)
    expanded = scale_inv.repeat_interleave(16, 0).repeat_interleave(32, 1)[:40, :70]
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal spacing 2^-9 below 2^-6.
    assert ((back - weight).abs() <= torch.maximum(weight.abs() / 16, expanded * 2**-10)).all()


@pytest.mark.parametrize(
    ("quant", "message"),
    [({"quant_method": "awq"}, "quant_method 'awq' is not supported"),
     ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "dynamic"),
     ({"quant_method": "fp8", "fmt": "e4m3"}, "per-tensor FP8 checkpoints are not supported")],
)  # fmt: skip
def test_unsupported_quantization_config_is_refused(quant: dict[str, Any], message: str) -> None:
    config = ModelConfig(path="ckpt", raw={"quantization_config": quant})
    with pytest.raises(ModelConfigError, match=message):
        _ = config.quantization


def test_quantization_flag_reaches_the_runner_config() -> None:
    from pd.engine.spec import runner_config

    args = ServerArgs.from_cli(["--model-path", "m", "--device", "cpu", "--quantization", "fp8"])
    assert runner_config(args, "m").quantization == "fp8"
    assert ServerArgs.from_cli(["--model-path", "m", "--device", "cpu"]).quantization == "none"
