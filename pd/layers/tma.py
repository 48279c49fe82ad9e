"""Whether a GPU and the installed Triton can read a kernel's tiles through host tensor descriptors (TMA)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def has_tma(device: torch.device) -> bool:
    """A CUDA device of compute capability 9+ (Hopper and later) and a Triton with host tensor descriptors (3.4 and
    later; kernels read through pointers otherwise)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True
