"""Compile the Triton kernels a call launches for an H100/H200 (sm_90), on a machine without a GPU.

Triton's CPU interpreter runs kernels by executing their Python, so it accepts code the compiler rejects (a
function whose returns differ in type under a constexpr branch, an fp8 dot with K < 32, ...); such a kernel passes
every interpreter test and fails on its first GPU launch. Inside `compile_for_hopper()` a kernel launch
(`kernel[grid](...)`) does not run: its arguments become a signature (tensor dtypes, int widths, constexpr
values, num_warps / num_stages) and Triton compiles it for sm_90 down to a cubin with the ptxas its wheel ships.
Calling a production wrapper with CPU tensors of real shapes inside it compiles exactly the variants that call
would launch; outputs are left unwritten.

Use in a process without TRITON_INTERPRET (the pytest process): JITFunction is the compiler's there.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8e4nv",
          torch.float8_e5m2: "fp8e5", torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
          torch.uint8: "u8", torch.bool: "i1"}  # fmt: skip
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclass
class Compiled:
    """What the launches inside compile_for_hopper() compiled: (kernel name, its constexpr values) of each
    distinct variant, and the failures (kernel name, constexprs, the compiler's message)."""

    ok: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    failed: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)


@contextlib.contextmanager
def compile_for_hopper() -> Iterator[Compiled]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    result = Compiled()
    target = GPUTarget("cuda", 90, 32)

    def compile_instead(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        bound.apply_defaults()
        signature, constexprs = {}, {}
        for param, (name, value) in zip(self.params, bound.arguments.items(), strict=True):
            if param.is_constexpr or value is None:
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + _TYPES[value.dtype]
            elif isinstance(value, TensorDescriptor):  # a host tensor descriptor (TMA): "tensordesc<bf16[64, 64]>"
                signature[name] = mangle_type(value)
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: argument {name} of type {type(value).__name__}")
        key = repr((self.fn.__qualname__, sorted(signature.items()), sorted(constexprs.items(), key=str),
                    sorted(options.items())))  # fmt: skip
        if key in result._seen:
            return
        result._seen.add(key)
        try:
            triton.compile(ASTSource(fn=self, signature=signature, constexprs=constexprs), target=target,
                           options=options)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the message is the finding
            chain, cause = [], e  # a nested function's error comes as the cause of its caller's
            while cause is not None:
                chain.append(f"{type(cause).__name__}: {cause}")
                cause = cause.__cause__ or cause.__context__
            result.failed.append((self.fn.__name__, constexprs, "\n".join(chain)))
        else:
            result.ok.append((self.fn.__name__, constexprs))

    original = JITFunction.run
    JITFunction.run = compile_instead  # type: ignore[method-assign]
    try:
        yield result
    finally:
        JITFunction.run = original  # type: ignore[method-assign]
