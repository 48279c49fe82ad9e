"""Tiny random-weight Hugging Face checkpoints for tests, saved with transformers' own `save_pretrained`.

Weights are drawn larger than the usual init (std 0.1 instead of 0.02) so that greedy decoding is not decided
by near-ties, and routers' correction biases are random, so each test exercises real routing. Each checkpoint
gets a byte-level tokenizer with a ChatML template, so `pd serve` can load it like any model directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

VOCAB = 512
_BASE: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=0.1, tie_word_embeddings=False,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)

CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_BASE, architectures=["LlamaForCausalLM"], intermediate_size=128, rope_theta=10000.0),
    "mixtral": dict(_BASE, architectures=["MixtralForCausalLM"], intermediate_size=96, num_local_experts=8,
                    num_experts_per_tok=2, rope_theta=1e6),
    "qwen2_moe": dict(_BASE, architectures=["Qwen2MoeForCausalLM"], intermediate_size=128,
                      moe_intermediate_size=48, shared_expert_intermediate_size=96, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                      rope_theta=1e6),
    "qwen3_moe": dict(_BASE, architectures=["Qwen3MoeForCausalLM"], intermediate_size=128, head_dim=32,
                      moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1e6),
    # 4 KV heads: tensor-parallel ranks shard them at TP 2 and 4 (one head each at TP 4), replicate them past that
    "qwen3_moe_gqa": dict(_BASE, architectures=["Qwen3MoeForCausalLM"], num_attention_heads=8, num_key_value_heads=4,
                          intermediate_size=128, head_dim=32, moe_intermediate_size=48, num_experts=8,
                          num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          rope_theta=1e6),
    "deepseek_v2": dict(_BASE, architectures=["DeepseekV2ForCausalLM"], num_key_value_heads=4,
                        intermediate_size=128, moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, topk_method="group_limited_greedy",
                        n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False, rope_theta=10000.0),
    # V3's query/key head dim splits into two tiles (32 + 16, as the real 128 + 64 do), so its prompt forwards read
    # the rope part every head shares apart from the expanded keys; V2's (16 + 8) take the concatenated fallback.
    "deepseek_v3": dict(_BASE, architectures=["DeepseekV3ForCausalLM"], num_hidden_layers=3, num_key_value_heads=4,
                        intermediate_size=128, moe_intermediate_size=48, n_routed_experts=16, n_shared_experts=1,
                        num_experts_per_tok=4, first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32,
                        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=16, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, norm_topk_prob=True,
                        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                        rope_theta=10000.0),
}


def _hf_config(kind: str) -> Any:
    import transformers

    raw = dict(CONFIGS[kind])
    arch = raw.pop("architectures")[0]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    return config_cls(**raw), getattr(transformers, arch)


def write_tokenizer(path: str) -> None:
    """A byte-level tokenizer (256 byte tokens, no merges) plus ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(path)


def make_checkpoint(kind: str, path: str, seed: int = 0) -> str:
    """Writes a tiny `kind` checkpoint (a key of CONFIGS) into `path`; returns `path`."""
    config, model_cls = _hf_config(kind)
    torch.manual_seed(seed)
    model = model_cls(config).float()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.5)
    model.save_pretrained(path)
    write_tokenizer(path)
    # No EOS: greedy runs always produce max_new_tokens tokens on both sides of a comparison.
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True}, f)
    return path


def load_hf(path: str) -> Any:
    """The transformers model of a checkpoint, fp32, eval mode (the oracle)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
