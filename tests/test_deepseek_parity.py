"""DeepSeek-V2/V3 (MLA over a latent KV cache, MoE routing through FusedMoE) through our engine equal transformers.

Besides the stock tiny checkpoints, a V2 variant routes 3 experts out of 2 kept groups (with 2 experts a group,
group-limited greedy then differs from plain greedy) under YaRN with mscale != mscale_all_dim, and a V3 variant
has no q LoRA and the non-interleaved rope layout.
"""

from __future__ import annotations

import json
import logging
import os
import secrets

import pytest
import torch
from safetensors.torch import save_file

from pd.engine.io import SamplingParams
from pd.engine.llm import LLM
from tests.tiny_checkpoints import CONFIGS, load_hf, make_checkpoint

VARIANTS = {
    "deepseek_v2_grouped_yarn": dict(
        CONFIGS["deepseek_v2"], num_experts_per_tok=3, topk_group=2, n_group=4,
        rope_scaling={"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707},
    ),
    "deepseek_v3_no_q_lora_rotate_half": dict(CONFIGS["deepseek_v3"], q_lora_rank=None, rope_interleave=False),
}
KINDS = ["deepseek_v2", "deepseek_v3", *VARIANTS]


@pytest.fixture(params=KINDS)
def checkpoint(request, tmp_path_factory, monkeypatch) -> str:
    """A fresh tiny checkpoint; its seed is drawn from the OS (the engine reseeds torch's global generator)."""
    kind = request.param
    if kind in VARIANTS:
        monkeypatch.setitem(CONFIGS, kind, VARIANTS[kind])
    seed = secrets.randbelow(2**31)
    request.node.add_report_section("setup", "seeds", f"checkpoint seed {seed}")
    return make_checkpoint(kind, str(tmp_path_factory.mktemp(kind)), seed=seed)


def _prompts(lengths: tuple[int, ...]) -> tuple[list[list[int]], int]:
    """Random prompts of the given lengths and the seed that drew them (for failure messages)."""
    seed = secrets.randbelow(2**31)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lengths], seed


def test_deepseek_caches_one_latent_buffer_per_layer_and_skips_mtp_tensors(checkpoint, caplog):
    # A multi-token-prediction layer after the decoder layers, as real V3 checkpoints have.
    with open(os.path.join(checkpoint, "config.json")) as f:
        num_layers = json.load(f)["num_hidden_layers"]
    save_file({f"model.layers.{num_layers}.eh_proj.weight": torch.zeros(4, 4)},
              os.path.join(checkpoint, "model-mtp.safetensors"))
    with caplog.at_level(logging.WARNING, logger="pd.models.loader"):
        llm = LLM(checkpoint, chunked_prefill_size=32, page_size=4, max_total_tokens=64)
    assert "not used by the model" not in caplog.text
    runner = llm.runner
    config = runner.model_config
    width = config.kv_lora_rank + config.qk_rope_head_dim
    assert runner.model.kv_layout() == [(1, width)]
    assert all(len(bufs) == 1 and bufs[0].shape[1:] == (1, width) for bufs in runner.kv_cache.buffers)


def test_deepseek_prefill_logits_match_transformers(checkpoint):
    hf = load_hf(checkpoint)
    llm = LLM(checkpoint, chunked_prefill_size=32, page_size=4)
    prompts, seed = _prompts((7, 45, 90))
    for ids in prompts:
        ours = llm.prefill_logits(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        where = f"prompt len {len(ids)}, prompt seed {seed}"
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0, msg=lambda m, where=where: f"{where}: {m}")


def test_deepseek_greedy_generate_matches_transformers(checkpoint):
    hf = load_hf(checkpoint)
    llm = LLM(checkpoint, chunked_prefill_size=32, page_size=4)
    prompts, seed = _prompts((5, 17, 70, 33))
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=32, temperature=0.0))
    for ids, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        assert out == ref, f"prompt len {len(ids)}, prompt seed {seed}"
