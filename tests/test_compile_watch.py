"""The late-compile warning (pd.engine.compile_watch) through the installed Triton's own runtime hooks.

The CPU has no Triton compiler, so the hooks are called the way Triton's JIT calls them (its `_call_hook` keyword
arguments); the GPU side is checked by tests/test_cuda_graphs.py, where a varied workload after the warm-up must
compile nothing."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from pd.engine import compile_watch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _compile(runtime, name: str, is_warmup: bool) -> None:
    class Fn:
        pass

    fn = Fn()
    fn.name = name
    info = {"signature": {"x_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"}, "constants": {(2,): 128},
            "configs": [{(0,): [["tt.divisibility", 16]]}]}  # fmt: skip
    kwargs = dict(key="k", repr=name, fn=fn, compile=info, is_manual_warmup=is_warmup, already_compiled=False)
    assert not runtime.jit_cache_hook(**kwargs)  # falsy: Triton goes on to compile
    runtime.jit_post_compile_hook(**kwargs)


def test_a_compile_after_the_warm_up_is_logged_with_its_specialisation(caplog):
    from triton import knobs

    assert compile_watch.watch_compiles()
    before = compile_watch.compiles_after_warm_up
    with caplog.at_level(logging.WARNING, logger="pd.engine.compile_watch"):
        _compile(knobs.runtime, "_some_kernel", is_warmup=False)
        _compile(knobs.runtime, "_warmed_kernel", is_warmup=True)  # an explicit kernel.warmup(): not a request's wait
    assert compile_watch.compiles_after_warm_up == before + 1
    (record,) = caplog.records
    assert "_some_kernel" in record.message and "x_ptr:*bf16/16, n:i32, BLOCK=128" in record.message
