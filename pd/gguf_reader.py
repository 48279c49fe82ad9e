"""Read a llama-architecture GGUF file as dequantised Hugging Face Llama tensors.

llama.cpp's GGUF stores each weight under its own name (`blk.N.attn_q.weight`), possibly quantised (Q4_1,
Q8_0, ...), and with the rows of `attn_q`/`attn_k` permuted so that its rope kernel can rotate adjacent pairs.
This module undoes all three: it maps names to the Hugging Face Llama layout, dequantises to float32 with
`gguf.quants.dequantize`, and applies the inverse row permutation (the same one transformers' GGUF loader uses),
so the result loads into `LlamaForCausalLM` unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize


class GGUFFormatError(ValueError):
    """The file is not a readable llama GGUF, or lacks a tensor or metadata key the conversion needs."""


@dataclass(frozen=True)
class LlamaGGUFConfig:
    """The hyper-parameters and tokenizer metadata of a llama GGUF, named as in a Hugging Face config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    chat_template: str | None


# GGUF per-layer suffix -> Hugging Face Llama per-layer suffix.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def open_gguf(path: str) -> GGUFReader:
    """Open `path` as a GGUF file (memory-mapped), turning any parse failure into a GGUFFormatError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    # The reader fails in many ways on a damaged file (bad magic, truncated arrays, bad enum values);
    # whichever it is, the user needs to hear that this file is unreadable, not a numpy traceback.
    except Exception as e:
        raise GGUFFormatError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field(reader: GGUFReader, key: str) -> Any:
    """The decoded value of a metadata key, or None when the key is absent."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _required(reader: GGUFReader, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise GGUFFormatError(f"GGUF metadata key {key!r} is missing")
    return value


def _optional_int(reader: GGUFReader, key: str) -> int | None:
    value = _field(reader, key)
    return None if value is None else int(value)


def read_llama_config(reader: GGUFReader) -> LlamaGGUFConfig:
    """Hyper-parameters from the GGUF metadata (`llama.*`, `tokenizer.*` keys); raises GGUFFormatError if absent."""
    arch = _required(reader, "general.architecture")
    if arch != "llama":
        raise GGUFFormatError(f"expected a llama-architecture GGUF, got general.architecture={arch!r}")
    scaling = _field(reader, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFFormatError(f"rope scaling {scaling!r} is not supported by this converter")
    hidden = int(_required(reader, "llama.embedding_length"))
    heads = int(_required(reader, "llama.attention.head_count"))
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:  # older converters only store the token list
        vocab = len(_required(reader, "tokenizer.ggml.tokens"))
    template = _field(reader, "tokenizer.chat_template")
    return LlamaGGUFConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_required(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_required(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=_optional_int(reader, "llama.attention.head_count_kv") or heads,
        head_dim=_optional_int(reader, "llama.attention.key_length") or hidden // heads,
        max_position_embeddings=int(_required(reader, "llama.context_length")),
        rms_norm_eps=float(_required(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base") or 10000.0),
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        bos_token_id=_optional_int(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_optional_int(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_optional_int(reader, "tokenizer.ggml.padding_token_id"),
        chat_template=None if template is None else str(template),
    )


def hf_llama_name(gguf_name: str) -> str:
    """Map a GGUF tensor name to its Hugging Face Llama name (`blk.3.attn_q.weight` -> `model.layers.3....`)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise GGUFFormatError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: [n_head * head_dim, hidden] -> same shape, HF rotate-half order.

    llama.cpp's converter reshapes rows to (n_head, 2, head_dim // 2) and swaps the last two axes; swapping them
    back in the transposed order is the exact inverse.
    """
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def expected_shapes(cfg: LlamaGGUFConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the GGUF must provide, with its [out, in] shape."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (cfg.num_key_value_heads * d, h),
        "self_attn.v_proj.weight": (cfg.num_key_value_heads * d, h),
        "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_hidden_layers):
        shapes.update({f"model.layers.{n}.{k}": v for k, v in layer.items()})
    return shapes


def iter_llama_tensors(reader: GGUFReader, cfg: LlamaGGUFConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, float32 tensor in HF [out, in] layout) for every GGUF tensor, in file order.

    Checks up front that every expected tensor is present, so a damaged file fails before any work is done.
    Raises GGUFFormatError on a missing, unknown or mis-shaped tensor.
    """
    shapes = expected_shapes(cfg)
    names = {t.name: hf_llama_name(t.name) for t in reader.tensors}
    missing = sorted(set(shapes) - set(names.values()))
    if missing:
        raise GGUFFormatError(f"GGUF lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    for tensor in reader.tensors:
        name = names[tensor.name]
        weight = dequantize(tensor.data, tensor.tensor_type)
        if tuple(weight.shape) != shapes[name]:
            raise GGUFFormatError(f"GGUF tensor {tensor.name} has shape {tuple(weight.shape)}, expected {shapes[name]}")
        if name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, cfg.num_key_value_heads)
        # A copy: F32 tensors come back as views of the read-only memory map.
        yield name, torch.from_numpy(np.array(weight, dtype=np.float32))
