"""Whether the fused Triton kernels (RMSNorm and the residual add, rotary with q/k norms and the KV store, the router,
the q/k/v GEMM, the dense MLP's silu(gate) * up) run for a tensor: on CUDA whenever Triton is installed; on the CPU
only inside `on_cpu()` in a process running Triton's interpreter, where tests put a whole CPU model through the
kernels a GPU runs.

PD_FUSED_KERNELS=0 in the environment turns them off on CUDA too (the reference torch code runs instead): for
telling a fused kernel's fault or cost from the rest when one is suspected, not for serving."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Triton installed and the kernels not switched off (read once, at import).
_USABLE = importlib.util.find_spec("triton") is not None and os.environ.get("PD_FUSED_KERNELS", "1") != "0"
_on_cpu = False


def enabled(x: torch.Tensor) -> bool:
    return enabled_on(x.device)


def enabled_on(device: torch.device) -> bool:
    return _USABLE and (device.type == "cuda" or (_on_cpu and device.type == "cpu"))


@contextmanager
def on_cpu() -> Iterator[None]:
    """CPU tensors take the fused kernels too while inside (Triton's interpreter runs them; slow, for tests).

    Raises:
        RuntimeError: the process does not run Triton's interpreter (TRITON_INTERPRET=1 before Triton's import).
    """
    global _on_cpu
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("fused kernels on the CPU need Triton's interpreter (TRITON_INTERPRET=1)")
    before, _on_cpu = _on_cpu, True
    try:
        yield
    finally:
        _on_cpu = before
