"""Checkpoint loading: safetensors files -> a model's parameters, with errors that name the tensor.

Our parameter names mirror the Hugging Face names wherever the layout is the same, so most tensors copy
straight across; a model handles the rest (stacked experts, fused projections) in `load_special`. FP8 checkpoints
and --quantization fp8 convert the model's layers first and transform the stream (pd.models.fp8_loading).
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from typing import Protocol

import torch
from safetensors import safe_open
from torch import nn

from pd.dist.tp import SINGLE, TensorParallel, take_shard
from pd.models.base import CausalLM
from pd.models.config import ModelConfig
from pd.models.fp8_loading import convert_to_fp8, plan_fp8, runnable_on
from pd.models.registry import get_model_class
from pd.moe.context import MoeContext

logger = logging.getLogger(__name__)


class WeightLoadError(ValueError):
    """A tensor is missing, mis-shaped or the checkpoint files are unreadable."""


class LoadableModel(Protocol):
    def load_special(self, name: str, tensor: torch.Tensor) -> bool:
        """Consumes a checkpoint tensor that does not copy 1:1 onto a parameter; False if not its own."""

    def ignore_weight(self, name: str) -> bool:
        """True for checkpoint tensors the model does not use (e.g. rotary caches, MTP layers)."""


def _safetensors_files(model_path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {model_path}")
    return files


def tensor_names(model_path: str) -> set[str]:
    """Every tensor name of the checkpoint (read from the file headers, no tensor is loaded)."""
    names: set[str] = set()
    for path in _safetensors_files(model_path):
        with safe_open(path, framework="pt") as f:
            names.update(f.keys())
    return names


def iter_safetensors(model_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in _safetensors_files(model_path):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def copy_param(param: torch.Tensor, name: str, tensor: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise WeightLoadError(
            f"tensor {name!r} has shape {tuple(tensor.shape)} in the checkpoint, the model expects {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(tensor.to(param.dtype))


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]], tied_lm_head: bool) -> None:
    """Copies checkpoint tensors into `model`. Every parameter must be covered, or WeightLoadError names the
    missing ones. Unknown checkpoint tensors are logged and skipped (as transformers does)."""
    # Parameters and persistent buffers (e.g. a router's correction bias), as live tensors to copy into.
    params = dict(model.state_dict(keep_vars=True))
    loaded: set[str] = set()
    special: set[str] = set()
    for name, tensor in weights:
        if name in params:
            copy_param(params[name], name, take_shard(params[name], tensor))
            loaded.add(name)
        elif model.load_special(name, tensor):  # type: ignore[operator]
            special.add(name)
        elif not model.ignore_weight(name):  # type: ignore[operator]
            logger.warning("checkpoint tensor %s is not used by the model", name)
    if tied_lm_head and "lm_head.weight" not in loaded and "lm_head.weight" in params:
        copy_param(params["lm_head.weight"], "lm_head.weight", params["model.embed_tokens.weight"])
        loaded.add("lm_head.weight")
    missing = [n for n in params if n not in loaded and not model.param_loaded_specially(n)]  # type: ignore[operator]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise WeightLoadError(f"checkpoint is missing tensors for: {shown}")


def load_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    moe_ctx: MoeContext,
    max_position: int,
    tp: TensorParallel = SINGLE,
    quantization: str = "none",
) -> CausalLM:
    """Builds the model of `config.architecture` on `device` in `dtype` and loads the checkpoint into it.
    ``tp`` shards attention and dense MLPs (each rank loads only its slice); routed experts follow moe_ctx.

    An FP8 checkpoint loads its FP8 layers as they are; ``quantization="fp8"`` quantizes an unquantized one
    block-wise while loading. The model is built in ``dtype`` and those layers converted before loading, so the
    build briefly holds them in ``dtype``."""
    model_cls = get_model_class(config.architecture)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config, moe_ctx, max_position, tp)
    finally:
        torch.set_default_dtype(previous)
    weights = iter_safetensors(config.path)
    if config.quantization is not None or quantization == "fp8":
        plan = runnable_on(plan_fp8(model, config, quantization, tensor_names(config.path)), torch.device(device))
        convert_to_fp8(model, plan, tp.size)
        weights = plan.transform(weights, torch.device(device))
    load_weights(model, weights, tied_lm_head=bool(config.get("tie_word_embeddings", False)))
    return model.eval().requires_grad_(False)
