"""Attention.fuse_qkv (CUDA engines run q/k/v as one GEMM) with q/k/v biases (Qwen2), and with block-FP8 q/k/v (weights
and scales concatenated); DenseMLP.fuse_gate_up (gate and up as one GEMM), plain and block-FP8: on a fresh random
checkpoint an engine whose layers are fused gives the unfused engine's logits and greedy tokens, and the projections
stay views of the fused weight (and scales), so a later load into them reaches the GEMM. (Without biases the fusion
runs in the interpreted whole-model test, tests/test_attention_backends.py, with every other GPU kernel.)

On the CPU engines pack their linears instead of fusing them (pd.engine.model_runner); here the packing is swapped
for the fusion so the fused path runs on this machine. The GPU parity tests (tests/test_gpu_parity.py) run it as
served, against transformers. In Triton's interpreter, input norms that also write the e4m3 rows a fused block-FP8
q/k/v GEMM reads (pd.layers.fp8_rows) leave the logits exactly unchanged, and so do decode attention writing the
e4m3 rows a block-FP8 o_proj reads and the post-attention norm summing o_proj's split-K partials.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from collections.abc import Callable

import pytest
import torch

from pd.engine.io import SamplingParams
from pd.engine.llm import LLM
from pd.models.llama import Attention, DenseMLP
from pd.quant.fp8 import Fp8Linear
from tests.fp8_checkpoints import make_bf16_checkpoint, write_fp8_pair
from tests.tiny_checkpoints import make_checkpoint

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (the test extra installs it)")  # fmt: skip


def _equal_engines(path: str, monkeypatch, fuse: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    """Builds the separate engine of ``path`` and one whose model ``fuse`` changes once loaded, and checks they
    agree; -> the fused engine's model."""
    engine = dict(page_size=4, chunked_prefill_size=32)
    monkeypatch.setattr("pd.engine.model_runner.pack_linears_for_cpu", lambda model: None)
    separate = LLM(path, **engine)
    monkeypatch.setattr("pd.engine.model_runner.pack_linears_for_cpu", fuse)
    fused = LLM(path, **engine)
    gen = torch.Generator().manual_seed(secrets.randbelow(2**31))
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (7, 37)]
    for ids in prompts:
        torch.testing.assert_close(fused.prefill_logits(ids), separate.prefill_logits(ids), atol=1e-5, rtol=1e-5)
    sampling = SamplingParams(max_new_tokens=6, temperature=0.0)
    assert fused.generate(prompts, sampling) == separate.generate(prompts, sampling)
    return fused.runner.model


def _fused_attention(path: str, monkeypatch, fuses: bool) -> Attention:
    """_equal_engines with q/k/v fused in each layer (``fuses``: whether it must take); -> a fused attention."""

    def fuse(model: torch.nn.Module) -> None:
        assert [m.fuse_qkv() for m in model.modules() if isinstance(m, Attention)] == [fuses] * 2

    return next(m for m in _equal_engines(path, monkeypatch, fuse).modules() if isinstance(m, Attention))


def _fused_mlp(path: str, monkeypatch) -> DenseMLP:
    """_equal_engines with every MLP's gate and up fused; -> a fused engine's MLP."""

    def fuse(model: torch.nn.Module) -> None:
        fused = [m.fuse_gate_up() for m in model.modules() if isinstance(m, DenseMLP)]
        assert fused and all(fused), fused

    return next(m for m in _equal_engines(path, monkeypatch, fuse).modules() if isinstance(m, DenseMLP))


def test_fused_gate_up_equals_separate_projections(tmp_path, monkeypatch) -> None:
    path = make_checkpoint("llama", str(tmp_path / "llama"), seed=secrets.randbelow(2**31))
    mlp = _fused_mlp(path, monkeypatch)
    assert mlp._gate_up is not None
    weight = mlp._gate_up[0].weight
    for proj in (mlp.gate_proj, mlp.up_proj):
        assert proj.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    with torch.no_grad():
        mlp.up_proj.weight.zero_()
    assert weight[mlp.gate_proj.out_features :].abs().sum() == 0 and weight[: mlp.gate_proj.out_features].any()


def test_fused_fp8_gate_up_concatenates_weights_and_scales(tmp_path, monkeypatch) -> None:
    """DeepSeek-V3's dense MLPs and shared experts (48 intermediate rows) in block FP8 with blocks of 16 rows fuse
    into one FP8 linear each."""
    base = make_bf16_checkpoint("deepseek_v3", str(tmp_path / "bf16"), seed=secrets.randbelow(2**31))
    fp8 = str(tmp_path / "fp8")
    write_fp8_pair(base, fp8, str(tmp_path / "dequant"), (16, 32))
    mlp = _fused_mlp(fp8, monkeypatch)
    fused = mlp._gate_up[0]
    assert isinstance(fused, Fp8Linear) and isinstance(mlp.up_proj, Fp8Linear)
    for name in ("weight", "weight_scale_inv"):
        whole = getattr(fused, name)
        for proj in (mlp.gate_proj, mlp.up_proj):
            assert getattr(proj, name).untyped_storage().data_ptr() == whole.untyped_storage().data_ptr(), name


def test_fused_qkv_with_biases_equals_separate_projections(tmp_path, monkeypatch) -> None:
    path = make_checkpoint("qwen2_moe", str(tmp_path / "qwen2_moe"), seed=secrets.randbelow(2**31))
    attn = _fused_attention(path, monkeypatch, fuses=True)
    assert attn._qkv is not None and attn._qkv[0].bias is not None, "Qwen2's q/k/v carry biases"
    weight = attn._qkv[0].weight
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    with torch.no_grad():
        attn.k_proj.weight.zero_()
    rows = attn.q_proj.out_features
    assert weight[rows : rows + attn.k_proj.out_features].abs().sum() == 0


def test_fused_fp8_qkv_concatenates_weights_and_scales(tmp_path, monkeypatch) -> None:
    """Block-FP8 q/k/v (Qwen3-MoE: 128 query and 64 key rows, blocks of 32 rows) fuse into one FP8 linear."""
    base = make_bf16_checkpoint("qwen3_moe", str(tmp_path / "bf16"), seed=secrets.randbelow(2**31))
    fp8 = str(tmp_path / "fp8")
    write_fp8_pair(base, fp8, str(tmp_path / "dequant"), (32, 16), ("lm_head", "mlp.gate"))
    attn = _fused_attention(fp8, monkeypatch, fuses=True)
    assert attn._qkv is not None
    fused = attn._qkv[0]
    assert isinstance(fused, Fp8Linear) and isinstance(attn.k_proj, Fp8Linear)
    for name in ("weight", "weight_scale_inv"):
        whole = getattr(fused, name)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            assert getattr(proj, name).untyped_storage().data_ptr() == whole.untyped_storage().data_ptr(), name
    with torch.no_grad():
        attn.k_proj.weight_scale_inv.fill_(3.0)
    first = attn.q_proj.weight_scale_inv.shape[0]
    assert (fused.weight_scale_inv[first : first + attn.k_proj.weight_scale_inv.shape[0]] == 3.0).all()


def test_fp8_qkv_whose_blocks_straddle_q_and_k_stays_separate(tmp_path, monkeypatch) -> None:
    """Blocks of 128 rows: the 64 key rows end inside a block, so the scales cannot concatenate; no fusion."""
    base = make_bf16_checkpoint("qwen3_moe", str(tmp_path / "bf16"), seed=secrets.randbelow(2**31))
    fp8 = str(tmp_path / "fp8")
    write_fp8_pair(base, fp8, str(tmp_path / "dequant"), (128, 16), ("lm_head", "mlp.gate"))
    attn = _fused_attention(fp8, monkeypatch, fuses=False)
    assert attn._qkv is None and isinstance(attn.q_proj, Fp8Linear)


def check_norm_quantizing_for_fp8_qkv(tmp: str, seed: int) -> None:
    """In the interpreter child: an engine running the GPU's kernels on a block-FP8 Qwen3-MoE, whose input norms
    write e4m3 rows for the fused q/k/v GEMM (pd.layers.fp8_rows), gives exactly the logits of the same engine
    whose q/k/v GEMM quantizes the norms itself; the copy is read (not just written)."""
    from pd.layers import fp8_rows, fused_kernels
    from pd.layers.norm import RMSNorm

    base = make_bf16_checkpoint("qwen3_moe", os.path.join(tmp, "bf16"), seed=seed)
    fp8 = os.path.join(tmp, "fp8")
    write_fp8_pair(base, fp8, os.path.join(tmp, "dequant"), (32, 16), ("lm_head", "mlp.gate"))
    reads = []
    real_attached = fp8_rows.attached

    def spy(x: torch.Tensor, group: int):  # noqa: ANN202
        found = real_attached(x, group)
        reads.append(found is not None)
        return found

    fp8_rows.attached = spy
    ids = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(seed)).tolist()
    with fused_kernels.on_cpu():
        engine = LLM(fp8, page_size=4, chunked_prefill_size=32, attention_backend="triton", moe_runner="triton")
        norms = [m for name, m in engine.runner.model.named_modules() if name.endswith("input_layernorm")]
        assert norms and all(isinstance(m, RMSNorm) and m.quant_group == 16 for m in norms)
        quantizing = engine.prefill_logits(ids)
        assert any(reads), "no q/k/v GEMM read a norm's e4m3 rows"
        for norm in norms:
            norm.quant_group = None
        reads.clear()
        plain = engine.prefill_logits(ids)
        assert not any(reads)
    assert torch.equal(quantizing, plain)


@needs_triton
def test_norms_quantizing_for_fp8_qkv_give_the_same_logits_in_interpreter(tmp_path, interpreter) -> None:
    interpreter.run(__name__, "check_norm_quantizing_for_fp8_qkv", str(tmp_path), secrets.randbelow(2**31),
                    timeout_s=600)  # fmt: skip


def check_fp8_o_proj_fusions(tmp: str, seed: int) -> None:
    """In the interpreter child: decode steps of an engine running the GPU's kernels on a block-FP8 Qwen3-MoE give
    exactly the same logits with each of o_proj's fusions on or off: the decode attention also writing e4m3 rows
    for o_proj (pd.layers.fp8_rows), and o_proj's split-K partials summed by the post-attention add-and-norm
    (pd.layers.split_k_parts). Each fusion is used when on (the copy read, the partials reaching the norm)."""
    import pd.layers.triton_rmsnorm as triton_rmsnorm
    from pd.layers import fp8_rows, fused_kernels
    from pd.layers.split_k_parts import SplitKParts

    base = make_bf16_checkpoint("qwen3_moe", os.path.join(tmp, "bf16"), seed=seed)
    fp8 = os.path.join(tmp, "fp8")
    write_fp8_pair(base, fp8, os.path.join(tmp, "dequant"), (32, 16), ("lm_head", "mlp.gate"))
    used = {"rows": 0, "parts": 0}
    real_attached, real_norm = fp8_rows.attached, triton_rmsnorm.add_rms_norm

    def spy_attached(x: torch.Tensor, group: int):  # noqa: ANN202
        found = real_attached(x, group)
        used["rows"] += found is not None and x.shape[-1] == attentions[0].o_proj.in_features  # o_proj's input
        return found

    def spy_norm(x, delta, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        used["parts"] += isinstance(delta, SplitKParts)
        return real_norm(x, delta, *args, **kwargs)

    fp8_rows.attached, triton_rmsnorm.add_rms_norm = spy_attached, spy_norm
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    with fused_kernels.on_cpu():
        engine = LLM(fp8, page_size=4, chunked_prefill_size=32, attention_backend="triton", moe_runner="triton")
        runner, sched = engine.runner, engine.scheduler
        attentions = [m for m in runner.model.modules() if isinstance(m, Attention)]
        assert attentions and all(m._o_proj_fp8 is not None and m.o_proj_unsummed for m in attentions)
        assert attentions[0].o_proj.in_features != attentions[0].o_proj.out_features  # tells o_proj's input apart
        rows = []
        for prompt in prompts:
            pages, row = sched.pool.alloc(sched._pages_for(len(prompt) + 4)), sched.slots.alloc_row()
            sched.slots.assign_pages(row, 0, pages)
            rows.append(row)
            runner.forward(runner.build_batch(prompt, [row], [0], [len(prompt)], sched.slots))
        lens = [len(p) for p in prompts]
        step = [int(t) for t in torch.randint(0, 256, (len(rows),), generator=gen)]
        settings = [(m._o_proj_fp8, m.o_proj_unsummed) for m in attentions]

        def decode(quantize: bool, unsummed: bool) -> torch.Tensor:
            """One decode step (again and again: it rewrites the same KV slots with the same values)."""
            for m, (fp8_setting, _) in zip(attentions, settings, strict=True):
                m._o_proj_fp8, m.o_proj_unsummed = (fp8_setting if quantize else None), unsummed
            used.update(rows=0, parts=0)
            logits = runner.forward(runner.build_batch(step, rows, lens, [1] * len(rows), sched.slots)).clone()
            assert (used["rows"] > 0) == quantize and (used["parts"] > 0) == unsummed, (quantize, unsummed, used)
            return logits

        both = decode(True, True)
        for quantize, unsummed in ((False, False), (True, False), (False, True)):
            assert torch.equal(decode(quantize, unsummed), both), (quantize, unsummed)


@needs_triton
def test_fp8_o_proj_fusions_give_the_same_logits_in_interpreter(tmp_path, interpreter) -> None:
    interpreter.run(__name__, "check_fp8_o_proj_fusions", str(tmp_path), secrets.randbelow(2**31), timeout_s=600)
