"""FP8 at load time: which layers of a model hold block-FP8 weights, converting them before the checkpoint is copied
in, and the transforms of the checkpoint stream.

Two sources: an FP8 checkpoint (``quantization_config.quant_method == "fp8"``), whose layers with a
``weight_scale_inv`` load as they are; or ``--quantization fp8`` on an unquantized checkpoint, which quantizes the
same layers block-wise while loading (the output head and the routers stay in the compute dtype, as SGLang's).
Layers named in ``modules_to_not_convert`` stay in the compute dtype either way; FP8 tensors the checkpoint has for
them are dequantized on the way in. Tensor-parallel shards take whole scale blocks (pd.quant.fp8.scale_range).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from pd.dist.tp import ShardSpec, _mark, shard_spec
from pd.models.config import ModelConfig
from pd.moe.layer import FusedMoE
from pd.quant.fp8 import DEFAULT_BLOCK, FP8_DTYPE, Fp8Config, Fp8Linear, block_dequant, block_quant, scale_range

QUANTIZATIONS = ("none", "fp8")
# What --quantization fp8 leaves unquantized: the output head and the routers (Mixtral/Qwen/DeepSeek `gate`,
# Qwen2-MoE's `shared_expert_gate`), whose outputs pick experts and tokens.
ONLINE_SKIPPED = ("lm_head", "gate", "shared_expert_gate")
_SCALE = "_scale_inv"
# The Triton FP8 kernels step through K in pieces of gcd(128, block width) columns, and an FP8 MMA needs at least 32.
KERNEL_MIN_BLOCK_K = 32
log = logging.getLogger(__name__)
_EXPERT_WEIGHT = re.compile(r"^(?P<moe>.+\.experts)\.\d+\.[a-z0-9_]+\.weight$")


class Fp8CheckpointError(ValueError):
    """An FP8 tensor of the checkpoint lacks its scales (or scales their weight)."""


def weight_owner(weight_name: str) -> str:
    """The module that holds checkpoint weight ``weight_name``: the FusedMoE for a per-expert weight
    (``...experts.3.down_proj.weight`` -> ``...experts``), else the linear (``...q_proj.weight`` -> ``...q_proj``)."""
    m = _EXPERT_WEIGHT.match(weight_name)
    return m["moe"] if m else weight_name.rpartition(".")[0]


@dataclass(frozen=True)
class Fp8Plan:
    """config: block size and exclusions; online: quantize the checkpoint's weights while loading; modules: names
    of the nn.Linear and FusedMoE modules that hold FP8 weights."""

    config: Fp8Config
    online: bool
    modules: frozenset[str]

    def transform(self, weights: Iterator[tuple[str, torch.Tensor]], device: torch.device | None = None
                  ) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
        """The checkpoint stream as the converted model takes it: FP8 weights and ``weight_scale_inv`` for its FP8
        modules (quantized here when online, on ``device``: a GPU quantizes a DeepSeek-sized checkpoint in seconds
        where the host takes minutes), FP8 tensors of the other modules dequantized to float32.

        Raises:
            Fp8CheckpointError: an FP8 weight or a scale whose partner never came.
        """
        if self.online:
            return self._quantize(weights, device)
        return self._dequantize_unconverted(weights)

    def _quantize(self, weights: Iterator[tuple[str, torch.Tensor]], device: torch.device | None
                  ) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
        for name, tensor in weights:
            if name.endswith(".weight") and weight_owner(name) in self.modules:
                q, scale_inv = block_quant(tensor.to(device) if device is not None else tensor, self.config.block)
                yield name, q
                yield name + _SCALE, scale_inv
            else:
                yield name, tensor

    def _dequantize_unconverted(
        self, weights: Iterator[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, torch.Tensor] = {}  # by weight name: the FP8 weight or the scales awaiting the other
        for name, tensor in weights:
            is_scale = name.endswith(_SCALE)
            weight_name = name.removesuffix(_SCALE)
            if (not is_scale and tensor.dtype != FP8_DTYPE) or weight_owner(weight_name) in self.modules:
                yield name, tensor
                continue
            other = pending.pop(weight_name, None)
            if other is None:
                pending[weight_name] = tensor
                continue
            weight, scale_inv = (other, tensor) if is_scale else (tensor, other)
            yield weight_name, block_dequant(weight, scale_inv, self.config.block, torch.float32)
        if pending:
            shown = ", ".join(sorted(pending)[:4])
            raise Fp8CheckpointError(f"FP8 weights without weight_scale_inv (or scales without weights): {shown}")


def plan_fp8(model: nn.Module, config: ModelConfig, quantization: str, tensor_names: set[str]) -> Fp8Plan:
    """Which modules of ``model`` hold FP8 weights.

    Args:
        config: the checkpoint's config; its quantization_config, when present, wins over ``quantization``.
        quantization: ``--quantization`` ("none" or "fp8").
        tensor_names: every tensor name of the checkpoint.
    """
    assert quantization in QUANTIZATIONS, quantization
    checkpoint = config.quantization
    online = checkpoint is None
    fp8 = checkpoint or Fp8Config(DEFAULT_BLOCK, ONLINE_SKIPPED)
    # Online: every weight of a linear or an expert; from a checkpoint: those that come with scales.
    suffix = ".weight" if online else ".weight" + _SCALE
    owners = {weight_owner(n.removesuffix(_SCALE)) for n in tensor_names if n.endswith(suffix)}
    modules = frozenset(
        name for name, module in model.named_modules()
        if name in owners and not fp8.skips(name) and (type(module) is nn.Linear or isinstance(module, FusedMoE))
    )  # fmt: skip
    return Fp8Plan(fp8, online, modules)


def runnable_on(plan: Fp8Plan, device: torch.device) -> Fp8Plan:
    """The plan as ``device`` can run it. On CUDA, a checkpoint whose block width the Triton kernels cannot step
    through (not a multiple of KERNEL_MIN_BLOCK_K; DeepSeek's and Qwen's FP8 releases use 128) loads dequantized into
    the compute dtype, with a warning, instead of failing in a kernel compile at the first forward."""
    width = plan.config.block[1]
    if device.type != "cuda" or not plan.modules or width % KERNEL_MIN_BLOCK_K == 0:
        return plan
    log.warning("FP8 blocks of width %d: the Triton FP8 kernels need a multiple of %d; loading those weights "
                "dequantized (no FP8 speed-up, same results as the dequantized checkpoint)", width, KERNEL_MIN_BLOCK_K)
    return replace(plan, modules=frozenset())


def convert_to_fp8(model: nn.Module, plan: Fp8Plan, tp_size: int) -> None:
    """Swaps the plan's linears for empty Fp8Linears and turns its FusedMoE layers FP8 (FusedMoE.use_fp8), in
    place and before loading. A linear's tensor-parallel shard carries over to its scales, in whole blocks.

    Raises:
        Fp8LayoutError: a tensor-parallel shard (tp_size ranks) or an expert's intermediate share cuts a block.
    """
    block = plan.config.block
    for name in sorted(plan.modules):
        module = model.get_submodule(name)
        if isinstance(module, FusedMoE):
            module.use_fp8(block)
            continue
        assert isinstance(module, nn.Linear)
        fp8 = Fp8Linear.like(module, block)
        spec = shard_spec(module.weight)
        if spec is not None:
            _mark(fp8.weight, spec)
            total = spec.total or spec.length * tp_size
            first, count = scale_range(spec.start, spec.length, total, block[spec.dim], f"{name}.weight dim {spec.dim}")
            _mark(fp8.weight_scale_inv, ShardSpec(spec.dim, first, count))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, fp8)
