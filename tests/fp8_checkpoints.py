"""Tiny block-FP8 checkpoints written the way DeepSeek-V3's are, and the dequantized checkpoint they stand for.

From a tiny Hugging Face checkpoint rounded to bfloat16, every linear weight W [N, K] (attention, dense MLPs,
experts; not the embeddings, the output head or the routers) is cut into blocks of (bn, bk); each block gets
s = max|block| / 448, is stored as float8_e4m3fn(block / s), and the s go to ``<name>_scale_inv``
[ceil(N/bn), ceil(K/bk)] float32. config.json gets DeepSeek's ``quantization_config``. The quantization here is a
plain loop over blocks, written apart from pd.quant so that it can serve as the oracle.

Beside it goes the dequantized checkpoint: the same tensors with every W replaced by fp8(W / s) * s in float32
and no quantization_config, which a correct FP8 loader must reproduce exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from tests.tiny_checkpoints import make_checkpoint

_FP8_MAX = 448.0
# Tensors that stay unquantized, as in DeepSeek-V3's and Qwen3's FP8 releases.
_UNQUANTIZED = ("embed_tokens", "lm_head", "mlp.gate.", "shared_expert_gate", "norm")


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (float8_e4m3fn [N, K], scale_inv float32 [ceil(N/bn), ceil(K/bk)]), block by block."""
    rows, cols = weight.shape
    bn, bk = block
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(math.ceil(rows / bn), math.ceil(cols / bk), dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            tile = weight[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].float()
            s = tile.abs().max() / _FP8_MAX
            s = s if s > 0 else torch.tensor(1.0)
            q[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = (tile / s).to(torch.float8_e4m3fn)
            scale_inv[i, j] = s
    return q, scale_inv


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The float32 weight an FP8 block-quantized tensor stands for."""
    out = q.float()
    bn, bk = block
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] *= scale_inv[i, j]
    return out


def is_quantized_linear(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and name.endswith(".weight") and not any(key in name for key in _UNQUANTIZED)


def _read(path: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def _copy_dir(src: str, dst: str, config: dict[str, object], tensors: dict[str, torch.Tensor]) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if not name.endswith(".safetensors") and not name.endswith(".index.json") and name != "config.json":
            shutil.copy(os.path.join(src, name), dst)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"))


def write_fp8_pair(
    base: str, fp8_dir: str, dequant_dir: str, block: tuple[int, int], not_converted: tuple[str, ...] = (),
    also_quantize: tuple[str, ...] = (),
) -> None:  # fmt: skip
    """From the bf16 checkpoint ``base``, writes its block-FP8 form to ``fp8_dir`` and the dequantized one to
    ``dequant_dir``. ``not_converted`` goes into quantization_config.modules_to_not_convert; ``also_quantize``
    names (substrings) of unquantized-by-default tensors that are quantized all the same."""
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    fp8: dict[str, torch.Tensor] = {}
    dequant: dict[str, torch.Tensor] = {}
    for name, tensor in _read(base).items():
        if is_quantized_linear(name, tensor) or any(key in name for key in also_quantize):
            q, scale_inv = quantize_blocks(tensor, block)
            fp8[name], fp8[name + "_scale_inv"] = q, scale_inv
            dequant[name] = dequantize_blocks(q, scale_inv, block)
        else:
            fp8[name], dequant[name] = tensor, tensor.float()
    _copy_dir(base, dequant_dir, dict(config, torch_dtype="float32"), dequant)
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    if not_converted:
        quant["modules_to_not_convert"] = list(not_converted)
    _copy_dir(base, fp8_dir, dict(config, quantization_config=quant), fp8)


def make_bf16_checkpoint(kind: str, path: str, seed: int) -> str:
    """A tiny ``kind`` checkpoint (tests.tiny_checkpoints) with every tensor rounded to and stored in bfloat16."""
    make_checkpoint(kind, path, seed=seed)
    tensors = {k: v.to(torch.bfloat16) for k, v in _read(path).items()}
    for name in os.listdir(path):
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            os.remove(os.path.join(path, name))
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path
