"""MoE runner registry (``--moe-runner-backend``): name -> implementation, imported only when asked for."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import torch

from pd.moe.dispatcher.base import CombineInput, DispatchFormat, DispatchOutput


@dataclass(frozen=True)
class ExpertScales:
    """Block scales of float8_e4m3fn expert weights (pd.quant.fp8's layout), for a runner that computes with them.

    w13: [E_local, 2 * ceil(I / bn), ceil(H / bk)] float32: gate's scale rows, then up's (quantized apart, so a
        block never spans both halves).
    w2: [E_local, ceil(H / bn), ceil(I / bk)] float32.
    block: (bn, bk).
    """

    w13: torch.Tensor
    w2: torch.Tensor
    block: tuple[int, int]


class MoeRunner(Protocol):
    """Computes the local experts on dispatched tokens (pre-permute, grouped GEMMs, post-permute).

    ``formats``: the dispatch formats ``run`` takes (pd.moe.dispatcher.base.DispatchFormat); FusedMoE refuses,
    at construction, a dispatcher whose output format is not among them.
    ``block_fp8``: whether ``run`` takes float8_e4m3fn weights with their ExpertScales; FusedMoE dequantizes FP8
    experts to the model dtype once, at finalize_weights, for a runner that does not.
    """

    formats: tuple[DispatchFormat, ...]
    block_fp8: bool

    def run(
        self,
        dispatch_out: DispatchOutput,
        w13_EXH: torch.Tensor,
        w2_EHI: torch.Tensor,
        activation: str = "silu",
        scales: ExpertScales | None = None,
    ) -> CombineInput: ...

    def prepare_weights(self, w13_EXH: torch.Tensor, w2_EHI: torch.Tensor) -> None:
        """Derive whatever the runner keeps from the loaded weights (e.g. packed copies); called after loading
        and after any later in-place weight update, with the tensors ``run`` will receive."""


# name -> (module, class); GPU runners join here and stay unimported on machines without their kernels.
_RUNNERS: dict[str, tuple[str, str]] = {
    "torch": ("pd.moe.runner.torch_ref", "TorchMoeRunner"),
    "cpu_packed": ("pd.moe.runner.cpu_packed", "CpuPackedMoeRunner"),
    "triton": ("pd.moe.runner.triton_runner", "TritonMoeRunner"),
    "deep_gemm": ("pd.moe.runner.deep_gemm_runner", "DeepGemmMoeRunner"),
}


def runner_names() -> tuple[str, ...]:
    """Names accepted by get_runner."""
    return tuple(_RUNNERS)


def get_runner(name: str) -> MoeRunner:
    """Build the runner registered under ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _RUNNERS:
        raise ValueError(f"unknown MoE runner {name!r}; known: {', '.join(_RUNNERS)}")
    module_name, class_name = _RUNNERS[name]
    runner: MoeRunner = getattr(importlib.import_module(module_name), class_name)()
    return runner
