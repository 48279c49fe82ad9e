"""Programmatic dependent launch (PDL, compute capability 9 and up) for the FP8 decode linears.

A kernel launched with PDL may start while the kernel before it in the stream still runs, once every program of
that kernel has signalled it (``let_consumer_start``, at their start). Until it calls ``wait_for_producer`` it may
only touch memory the kernel before it does not write: the split-K FP8 GEMM asks L2 for its own weight lines there
(``prefetch_l2``), so the weight read that bounds a decode linear overlaps the norm or the attention merge that
produces its activations; after the wait it reads those activations as usual. A wait returns only once the kernel
before has finished and its writes are visible, and that kernel had itself passed its own wait (or was launched
plainly), so every earlier kernel has finished too: the order of writes and reads is the plain launch's.

Off unless PD_PDL=1: the overlap has not been measured yet (benchmarks/profile_decode_step.py with PD_PDL=0 and 1
compares the step's time).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pd.env_choice import env_choice


def enabled(device: torch.device) -> bool:
    """Whether launches on ``device`` use PDL: PD_PDL=1, a CUDA device of compute capability 9+, and a Triton that
    has grid dependency control."""
    return env_choice("PD_PDL", "0", ("0", "1")) == "1" and device.type == "cuda" and _supported(device)


@functools.cache
def _supported(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")


@triton.jit
def wait_for_producer():
    """Blocks until the kernel before this one has finished and its writes are visible (a no-op without PDL)."""
    tl.extra.cuda.gdc_wait()


@triton.jit
def let_consumer_start():
    """Lets the next kernel, if launched with PDL, start once every program of this one has called this."""
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Asks L2 for the 128-byte line of each pointer of ``ptrs`` (any shape, valid addresses); nothing is loaded into
    registers and nothing waits for it."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


# Bytes per L2 line: one prefetch each.
LINE_BYTES = 128
