"""Attention.fuse_qkv (CUDA engines run q/k/v as one GEMM) with q/k/v biases (Qwen2): on a fresh random checkpoint
an engine whose layers are fused gives the unfused engine's logits and greedy tokens, and the three projections stay
views of the fused weight, so a later load into them reaches the GEMM. (Without biases the fusion runs in the
interpreted whole-model test, tests/test_attention_backends.py, with every other GPU kernel.)

On the CPU engines pack their linears instead of fusing them (pd.engine.model_runner); here the packing is swapped
for the fusion so the fused path runs on this machine. The GPU parity tests (tests/test_gpu_parity.py) run it as
served, against transformers.
"""

from __future__ import annotations

import secrets

import torch

from pd.engine.io import SamplingParams
from pd.engine.llm import LLM
from pd.models.llama import Attention
from tests.tiny_checkpoints import make_checkpoint


def _fuse_instead_of_packing(model: torch.nn.Module) -> None:
    assert all(m.fuse_qkv() for m in model.modules() if isinstance(m, Attention))


def test_fused_qkv_with_biases_equals_separate_projections(tmp_path, monkeypatch) -> None:
    arch = "qwen2_moe"
    path = make_checkpoint(arch, str(tmp_path / arch), seed=secrets.randbelow(2**31))
    engine = dict(page_size=4, chunked_prefill_size=32)
    monkeypatch.setattr("pd.engine.model_runner.pack_linears_for_cpu", lambda model: None)
    separate = LLM(path, **engine)
    monkeypatch.setattr("pd.engine.model_runner.pack_linears_for_cpu", _fuse_instead_of_packing)
    fused = LLM(path, **engine)
    gen = torch.Generator().manual_seed(secrets.randbelow(2**31))
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 40)]
    for ids in prompts:
        torch.testing.assert_close(fused.prefill_logits(ids), separate.prefill_logits(ids), atol=1e-5, rtol=1e-5)
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0)
    assert fused.generate(prompts, sampling) == separate.generate(prompts, sampling)

    attn = next(m for m in fused.runner.model.modules() if isinstance(m, Attention))
    assert attn._qkv is not None and attn._qkv[1] is not None, "Qwen2's q/k/v carry biases"
    weight = attn._qkv[0]
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    with torch.no_grad():
        attn.k_proj.weight.zero_()
    rows = attn.q_proj.out_features
    assert weight[rows : rows + attn.k_proj.out_features].abs().sum() == 0
