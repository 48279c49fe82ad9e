"""Mixtral, Qwen2-MoE and Qwen3-MoE through our engine equal transformers on the same tiny checkpoint.

Besides the stock tiny configs (every layer sparse), two Qwen variants mix dense and sparse layers through
`decoder_sparse_step` and `mlp_only_layers`, so the layer-type rule is checked against the reference too.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from pd.engine.io import SamplingParams
from pd.engine.llm import LLM
from pd.models.config import ModelConfig, ModelConfigError
from pd.models.llama import DenseMLP
from pd.models.loader import WeightLoadError
from pd.models.mixtral import SparseMoeBlock, check_supported
from pd.models.qwen2_moe import qwen_sliding_window
from tests.tiny_checkpoints import CONFIGS, load_hf, make_checkpoint

# name -> (base kind, config overrides, checkpoint seed)
VARIANTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "mixtral": ("mixtral", {}, 101),
    "qwen2_moe": ("qwen2_moe", {}, 102),
    "qwen3_moe": ("qwen3_moe", {}, 103),
    # Layers: dense, sparse, dense (step), dense (mlp_only).
    "qwen2_moe_mixed": ("qwen2_moe", dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]), 104),
    # Layers: dense (mlp_only), sparse, sparse.
    "qwen3_moe_mixed": ("qwen3_moe", dict(num_hidden_layers=3, decoder_sparse_step=1, mlp_only_layers=[0]), 105),
}
CHUNK = 32


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LLM]:
    """(transformers model, our LLM) on one freshly written checkpoint."""
    name = request.param
    kind, overrides, seed = VARIANTS[name]
    path = str(tmp_path_factory.mktemp(name))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(CONFIGS, name, dict(CONFIGS[kind], **overrides))
        make_checkpoint(name, path, seed=seed)
    return load_hf(path), LLM(path, chunked_prefill_size=CHUNK, page_size=4)


def _prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]


def test_layer_types_match_transformers(pair: tuple[Any, LLM]) -> None:
    hf, llm = pair
    ours = llm.runner.model.model.layers
    assert len(ours) == len(hf.model.layers)
    for layer, hf_layer in zip(ours, hf.model.layers, strict=True):
        hf_sparse = hasattr(hf_layer.mlp, "experts")  # transformers names Mixtral's block `mlp` too
        mlp = getattr(layer, layer.mlp_name)
        assert isinstance(mlp, SparseMoeBlock if hf_sparse else DenseMLP)


def test_prefill_logits_match_transformers(pair: tuple[Any, LLM]) -> None:
    hf, llm = pair
    # 45 and 90 span two and three chunks, so later chunks attend to cached pages of earlier ones.
    for ids in _prompts((7, 45, 90), seed=7):
        ours = llm.prefill_logits(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_batched_greedy_matches_transformers_one_by_one(pair: tuple[Any, LLM]) -> None:
    hf, llm = pair
    prompts = _prompts((5, 19, 75, 38), seed=8)
    assert max(map(len, prompts)) > CHUNK
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=32, temperature=0.0))
    for ids, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
        assert out == ref


def test_checkpoint_missing_one_expert_shard_is_rejected(tmp_path) -> None:
    path = make_checkpoint("qwen3_moe", str(tmp_path / "ckpt"), seed=106)
    (file,) = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    tensors = load_file(os.path.join(path, file))
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.mlp\.experts\.w13_weight"):
        LLM(path, chunked_prefill_size=CHUNK, page_size=4)


@pytest.mark.parametrize(
    "raw, window, ok",
    [
        (dict(architectures=["MixtralForCausalLM"], hidden_act="silu"), None, True),
        (dict(architectures=["MixtralForCausalLM"], hidden_act="silu"), 4096, True),  # window covers everything
        (dict(architectures=["MixtralForCausalLM"], hidden_act="silu"), 1024, False),
        (dict(architectures=["Qwen2MoeForCausalLM"], hidden_act="gelu"), None, False),
    ],
)
def test_unsupported_configs_fail_at_build_time(raw: dict[str, Any], window: int | None, ok: bool) -> None:
    config = ModelConfig(path="unused", raw=raw)
    if ok:
        check_supported(config, max_position=4096, sliding_window=window)
    else:
        with pytest.raises(ModelConfigError):
            check_supported(config, max_position=4096, sliding_window=window)


def test_qwen_sliding_window_is_read_from_either_config_generation() -> None:
    assert qwen_sliding_window(ModelConfig("unused", dict(use_sliding_window=False, sliding_window=0))) is None
    assert qwen_sliding_window(ModelConfig("unused", dict(use_sliding_window=True, sliding_window=512))) == 512
    layer_types = ["sliding_attention", "full_attention"]
    assert qwen_sliding_window(ModelConfig("unused", dict(layer_types=layer_types, sliding_window=256))) == 256
