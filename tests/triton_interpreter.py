"""Triton's CPU interpreter, made to compute like compiled Triton where it does not (Triton 3.x).

Call `patch_interpreter()` in a process started with TRITON_INTERPRET=1 (Triton reads the variable when its
functions are defined, its own library included, so kernels cannot be interpreted in a process that imported
Triton without it): the tests run their kernel checks in such a child, and tests/interpreter_site/sitecustomize.py
patches server processes that tests start.

- A scalar comparison against a plain int argument stays int32 data, and masked load/store reject a mask combined
  from it.
- tl.dot multiplies bf16 operands as their raw uint16 storage: widen them to float32 first (exact).
- tl.dot hands its operands to numpy's matmul as they are laid out, and BLAS sums a transposed view in another
  order than a contiguous array (a tile loaded through a descriptor and permuted differs in its last bit from the
  same tile loaded through pointers): make both contiguous, so a dot's bits depend on its values only, as on a GPU.
- float32 -> bf16 casts truncate; compiled Triton rounds to nearest even, as torch does.
- float32 -> float8e4nv casts convert through an integer cast (or, with a rounding mode, misround); compiled
  Triton rounds to nearest even (cvt.rn.satfinite), as torch's float8_e4m3fn does for values within +-448.
"""

from __future__ import annotations

import os
from typing import Any


def patch_interpreter() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run in a child with TRITON_INTERPRET=1"
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_pd_patched", False):
        return
    load, store = builder.create_masked_load, builder.create_masked_store
    dot, cast, fp_to_fp = builder.create_dot, builder.cast_impl, builder.create_fp_to_fp

    def as_bool(mask: Any) -> Any:
        return interpreter.TensorHandle(np.asarray(mask.data).astype(np.bool_), mask.dtype)

    def widen(h: Any) -> Any:
        if h.dtype.scalar != tl.bfloat16:
            return interpreter.TensorHandle(np.ascontiguousarray(h.data), h.dtype)
        wide = (np.asarray(h.data).astype(np.uint32) << 16).view(np.float32)
        return interpreter.TensorHandle(np.ascontiguousarray(wide), tl.float32)

    def to_e4m3(src: Any) -> Any:
        f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        return interpreter.TensorHandle(f32.to(torch.float8_e4m3fn).view(torch.uint8).numpy(), tl.float8e4nv)

    def cast_rne(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            f32 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return interpreter.TensorHandle(f32.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16),
                                            tl.bfloat16)  # fmt: skip
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            return to_e4m3(src)
        return cast(self, src, dst_type)

    def fp_to_fp_rne(self: Any, src: Any, dst_type: Any, rounding_mode: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            return to_e4m3(src)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    builder.create_masked_load = lambda self, p, m, *a, **k: load(self, p, as_bool(m), *a, **k)
    builder.create_masked_store = lambda self, p, v, m, *a, **k: store(self, p, v, as_bool(m), *a, **k)
    builder.create_dot = lambda self, a, b, *rest: dot(self, widen(a), widen(b), *rest)
    builder.cast_impl = cast_rne
    builder.create_fp_to_fp = fp_to_fp_rne
    builder._pd_patched = True
